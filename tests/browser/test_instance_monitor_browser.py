"""The instance monitor's front end in headless Chromium: state, progress, chart and requests drawn; screenshots."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.monitor_harness import FakeInstance, busy_history, monitor_state, write_monitor_harness
from tests.helpers.paths import ARTIFACTS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]


def open_page(browser, path: Path, errors: list[str]):
    page = browser.new_page(viewport={"width": 920, "height": 600})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page


def test_loading_then_ready_with_requests(browser, tmp_path: Path) -> None:
    inst = FakeInstance()
    inst.load(0.5)
    errors: list[str] = []
    page = open_page(browser, write_monitor_harness(tmp_path / "loading.html", monitor_state(inst)), errors)
    try:
        assert page.locator(".exo-im-state").get_attribute("data-state") == "loading"
        done, total = sum(d for d, _ in inst.progress.values()), sum(t for _, t in inst.progress.values())
        assert page.locator(".exo-im-progress-text").inner_text() == f"{done} / {total} layers"
        assert page.locator(".exo-im-rank").count() == len(inst.plan.ranks)
        assert "Tokens/s appear here" in page.locator(".exo-im-chart-box").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "instance-monitor-loading.png"), full_page=True)

        # what the sampler pushes once the instance is ready and has served requests
        inst.load(1.0)
        inst.state = "ready"
        inst.pending = 3
        busy_history(inst)
        state = monitor_state(inst)
        for key, value in state.items():
            page.evaluate("([k, v]) => window.fakeModel.set(k, v)", [key, value])
        assert page.locator(".exo-im-state").get_attribute("data-state") == "ready"
        assert page.locator(".exo-im-progress-text").inner_text() == f"{total} / {total} layers loaded"
        assert page.locator(".exo-im-point").count() == len(inst.usage_history)
        assert page.locator(".exo-im-predicted").count() == 1  # the plan's prediction is in range
        assert page.locator(".exo-im-requests tbody tr").count() == 6
        assert page.locator(".exo-im-busy").inner_text() == "generating 3 requests…"
        last = inst.usage_history[-1][1]
        assert f"{last.generation_tps:.1f}" in page.locator(".exo-im-tile").nth(1).inner_text()
        page.screenshot(path=str(ARTIFACTS / "instance-monitor-ready.png"), full_page=True)
        assert errors == []
    finally:
        page.close()


def test_failed_instance_in_the_dark_theme(browser, tmp_path: Path) -> None:
    inst = FakeInstance()
    inst.load(1.0)
    busy_history(inst, n=5)
    inst.state = "failed"
    inst.error = "rank 1 exited with code -9: the node workstation of rank 1 is unreachable"
    errors: list[str] = []
    page = open_page(browser, write_monitor_harness(tmp_path / "failed.html", monitor_state(inst), dark=True), errors)
    try:
        assert page.locator(".exo-im-state").get_attribute("data-state") == "failed"
        assert "exited with code -9" in page.locator(".exo-im-error").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "instance-monitor-failed-dark.png"), full_page=True)
        assert errors == []
    finally:
        page.close()
