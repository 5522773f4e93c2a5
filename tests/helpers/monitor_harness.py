"""Fake instances for the InstanceMonitor tests, and a standalone page that runs its ESM (browser tests).

The page is :mod:`tests.topology_harness`'s, with the monitor's ESM, CSS and traits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from exo_lab.cluster.topology import Topology
from exo_lab.engine.backend import Backend
from exo_lab.engine.generation import Chunk, Generation, Usage
from exo_lab.instance import Instance
from exo_lab.models.card import card_from_config
from exo_lab.placement import Plan, plan
from exo_lab.ui.instance_monitor import _STATIC, InstanceMonitor
from tests.helpers.paths import SPECS
from tests.helpers.topology_harness import _PAGE, DARK

LLAMA_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "model_type": "llama",
    "torch_dtype": "bfloat16",
}


def pipeline_plan(nodes: int = 2) -> Plan:
    """A pipeline plan of a Llama-8B-shaped model over ``nodes`` nodes of the home-lab what-if spec."""
    plans = plan(Topology.load(SPECS / "home-lab-mixed.json"), card_from_config(LLAMA_8B, "llama-3.1-8b"))
    return next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == nodes)


class FakeInstance(Instance):
    """An :class:`~exo_lab.instance.Instance` that launches nothing: what the monitor reads, settable by hand."""

    def __init__(self, p: Plan | None = None, name: str = "llama-3.1-8b") -> None:
        Backend.__init__(self, name)  # not Instance.__init__: that resolves the model and starts workers
        self.cluster = None
        self.model = name
        self.path = Path(name)  # no files: nothing is loaded
        self.plan = p or pipeline_plan()
        self.auto_replace = False
        self.state = "loading"
        self.error = None
        self.replacements = 0
        self.progress = {r.rank: (0, r.layers[1] - r.layers[0]) for r in self.plan.ranks}
        self.controls = {}
        self._inflight = set()

    @property
    def pending(self) -> int:
        return self._pending

    @pending.setter
    def pending(self, n: int) -> None:  # by hand: requests decoding together or waiting
        self._pending = n

    @property
    def stats(self) -> dict[str, int]:
        return {"decode_steps": 0, "peak_batch": 0}

    def _enqueue(self, gen: Generation) -> None:
        self._finish(gen, Chunk("", finish_reason="error", error=f"{self.name} is a fake: it generates nothing"))

    def close(self) -> None:
        self.state = "stopped"

    delete = close

    def load(self, fraction: float) -> None:
        for rank, (_, total) in self.progress.items():
            skew = 1.0 if fraction >= 1 else 1.3 if rank == 0 else 0.8  # rank 0 loads first, as it does
            self.progress[rank] = (min(total, round(total * fraction * skew)), total)

    def finish_request(self, t: float, completion: int, decode_tps: float, ttft_s: float, prompt: int = 40) -> None:
        total = ttft_s + (completion - 1) / decode_tps
        self.usage_history.append((t, Usage(prompt, completion, ttft_s, prompt / ttft_s, decode_tps, total)))
        self.requests_completed += 1  # as Backend._finish counts each finished request


def busy_history(inst: FakeInstance, n: int = 14, start: float | None = None) -> None:
    """``n`` finished requests over the last minutes, decode speed drifting around the prediction."""
    start = start if start is not None else time.time() - 240
    for i in range(n):
        tps = 19.5 + 2.2 * ((i * 7) % 5 - 2) / 2 - (3.5 if i == 9 else 0)
        inst.finish_request(
            start + i * 17 + (i % 3) * 4, 64 + (i * 37) % 200, tps, 0.42 + 0.05 * (i % 4), prompt=30 + (i * 53) % 400
        )


def monitor_state(inst: Backend) -> dict[str, Any]:
    """The traits a real :class:`InstanceMonitor` would sync for ``inst``."""
    w = InstanceMonitor()
    w.instance = inst
    w.sample()
    state = {k: getattr(w, k) for k in ("summary", "progress", "requests", "stats")}
    w.close()
    return state


def write_monitor_harness(path: Path, state: dict[str, Any], *, dark: bool = False, width: int = 860) -> Path:
    """Write a page that renders the monitor with ``state`` (see :func:`monitor_state`) and return it."""
    theme = "; ".join(f"{k}: {v}" for k, v in DARK.items()) if dark else ""
    page = _PAGE.format(
        page_bg=DARK["--jp-layout-color1"] if dark else "#ffffff",
        width=width,
        theme=theme,
        css=(_STATIC / "instance_monitor.css").read_text(),
        esm=json.dumps((_STATIC / "instance_monitor.js").read_text()).replace("</", "<\\/"),
        state=json.dumps(state).replace("</", "<\\/"),
    ).replace("exo_lab topology widget", "exo_lab instance monitor")
    path.write_text(page)
    return path
