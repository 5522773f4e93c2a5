"""Headless Debian chromium (through Playwright, never `playwright install`) for the browser tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers.browser import CHROMIUM_FLAGS


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian chromium, one per test module: Playwright's sync API holds an event loop while it runs,
    which must be gone before the async tests that follow (Jupyter server, kernels) start their own."""
    from playwright.sync_api import sync_playwright

    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield b
        b.close()
