"""An instance on a node counts as serving from the renewal that says it has requests in flight until it has been
quiet for ``SERVING_QUIET_S``; whatever else a coordinator puts in its status leaves that alone."""

from __future__ import annotations

import time

import pytest

from exo_lab.cluster import workers
from exo_lab.cluster.workers import LocalInstance


def test_serving_lasts_from_a_busy_renewal_until_the_quiet_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "SERVING_QUIET_S", 0.3)
    inst = LocalInstance("i", reserved_bytes=0)
    assert not inst.serving
    inst.renew({"state": "ready", "requests": 0})
    assert not inst.serving
    inst.renew({"state": "ready", "requests": 3})
    assert inst.serving
    inst.renew({"state": "ready", "requests": 0})  # quiet now, but not for long enough
    assert inst.serving
    time.sleep(0.35)
    assert not inst.serving
    inst.renew()  # a renewal without a status says nothing of requests
    assert not inst.serving


@pytest.mark.parametrize("requests", [None, "2", -1, 1.5, [1], {"n": 1}])
def test_a_status_without_a_positive_count_is_not_serving(requests: object) -> None:
    inst = LocalInstance("i", reserved_bytes=0)
    inst.renew({"state": "ready", "requests": requests})
    assert not inst.serving and inst.status["requests"] == requests
