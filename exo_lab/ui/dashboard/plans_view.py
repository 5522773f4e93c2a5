"""The dashboard's placement preview: ranked plans for a model on these nodes, and launching one (through the
cluster's :class:`~exo_lab.control.Control`: the launch returns at once, the instance loads in the Instances card)."""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from typing import Any

import pandas as pd
import panel as pn

from exo_lab.engine.backend import Backend
from exo_lab.placement.plan import Plans
from exo_lab.ui.dashboard.frames import typed_frame
from exo_lab.ui.dashboard.source import error_text
from exo_lab.ui.dashboard.theme import card, card_title, html_pane


def plans_frame(plans: Any) -> pd.DataFrame:
    """Ranked plans as a table."""
    rows = []
    for i, p in enumerate(plans.plans):
        mem = max(
            (p.memory_bytes.get(n, 0) / p.memory_capacity_bytes[n] for n in p.nodes if p.memory_capacity_bytes.get(n)),
            default=0.0,
        )
        rows.append(
            {
                "#": i,
                "plan": p.describe(),
                "nodes": p.num_nodes,
                "decode tok/s": round(p.decode_tps, 1),
                "TTFT (ms)": round(p.ttft_s * 1000, 1),
                "prefill tok/s": round(p.prefill_tps, 1),
                "peak memory": f"{100 * mem:.0f}%",
                "bottleneck": p.bottleneck,
            }
        )
    return typed_frame(
        rows,
        {
            "#": int,
            "plan": str,
            "nodes": int,
            "decode tok/s": float,
            "TTFT (ms)": float,
            "prefill tok/s": float,
            "peak memory": str,
            "bottleneck": str,
        },
    )


#: the sharding filter's choices (label: the API's ``sharding`` value; "" for any)
SHARDING_CHOICES = {
    "any": "",
    "single node": "single",
    "pipeline": "pipeline",
    "tensor": "tensor",
    "pipeline + tensor": "pipeline-tensor",
}


class PlansView:
    """The preview card: pick a model and a request shape, rank the plans, launch the selected one."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.plans: Any = None
        self._model = ""  # the model as named when the plans were made (a path, hub id, served name, ...)
        self._launched: str | None = None  # the plan this page launched last, and what it shows about it
        self._launch_status = ""
        self.model = pn.widgets.AutocompleteInput(
            label="model",
            options=source.model_suggestions(),
            restrict=False,
            min_characters=2,
            case_sensitive=False,
            search_strategy="includes",
            placeholder="a model name, path, hub id, synthetic:<preset> or a config.json",
            sizing_mode="stretch_width",
        )
        if source.registry is not None and source.registry.names():
            first: Backend = source.instances()[0][1]
            self.model.value = str(first.path) if first.path is not None else ""
        self.context = pn.widgets.IntInput(label="context", value=4096, start=16, step=1024, width=110)
        self.prompt = pn.widgets.IntInput(label="prompt tokens", value=512, start=1, step=128, width=110)
        self.objective = pn.widgets.Select(
            label="rank by", options={"decode tok/s": "decode", "time to first token": "ttft"}, width=160
        )
        self.sharding = pn.widgets.Select(label="sharding", options=SHARDING_CHOICES, width=150)
        self.min_nodes = pn.widgets.IntInput(label="min nodes", value=1, start=1, step=1, width=90)
        self.preview_button = pn.widgets.Button(label="Preview", color="primary", width=100, align="end")
        self.preview_button.on_click(self._on_preview)
        self.table = pn.widgets.Tabulator(
            plans_frame(Plans([])),
            show_index=False,
            disabled=True,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            theme="simple",
            selectable=1,
            pagination="local",
            page_size=8,
            visible=False,
        )
        self.table.param.watch(self._on_plan_selected, "selection")
        self.note = html_pane(
            "<div class='exo-hint'>Pick a model and press Preview to rank the ways to run it on these nodes.</div>"
        )
        self.launch_button = pn.widgets.Button(
            label="Launch selected plan", color="success", width=180, disabled=True, visible=source.control is not None
        )
        self.launch_button.on_click(self._on_launch)
        self.card = card(
            html_pane(card_title("Placement preview", "ranked plans for a model on these nodes")),
            pn.Row(
                self.model,
                self.context,
                self.prompt,
                self.objective,
                self.sharding,
                self.min_nodes,
                self.preview_button,
                margin=0,
            ),
            self.note,
            self.table,
            self.launch_button,
        )

    def update(self) -> None:
        """Show how the launch this page started is going."""
        if self._launched is None:
            return
        status = self.source.launches.get(self._launched)
        if status and status != self._launch_status:
            self._launch_status = status
            cls = "exo-error" if status.startswith("launch failed") else "exo-note"
            self.note.object = f"<div class='{cls}'>{html.escape(self._launched)}: {html.escape(status)}</div>"
            if not status.startswith("launching"):  # done (or failed): another launch may follow
                self.launch_button.disabled = not self._can_launch()

    async def _on_preview(self, _event: Any = None) -> None:
        model = (self.model.value_input or self.model.value or "").strip()
        if not model:
            self.note.object = "<div class='exo-error'>Name a model first.</div>"
            return
        self.preview_button.disabled = True
        self.note.object = f"<div class='exo-hint'>Planning {html.escape(model)}…</div>"
        try:
            context, prompt = self.context.value, self.prompt.value
            if context is None or prompt is None:
                raise ValueError("context and prompt tokens need a value")
            plans = await asyncio.to_thread(
                self.source.preview,
                model,
                int(context),
                int(prompt),
                self.objective.value,
                self.sharding.value or None,
                self.min_nodes.value or 1,
            )
        except Exception as exc:
            self.plans = None
            self.table.visible = False
            self.launch_button.disabled = True
            self.note.object = f"<div class='exo-error'>{html.escape(error_text(exc))}</div>"
            return
        finally:
            self.preview_button.disabled = False
        self.plans, self._model = plans, model
        self.table.value = plans_frame(plans)
        self.table.visible = bool(plans.plans)
        self.table.selection = [0] if plans.plans else []
        self._describe_selected()

    def _on_plan_selected(self, _event: Any = None) -> None:
        self._describe_selected()

    def _describe_selected(self) -> None:
        plans = self.plans
        if plans is None:
            return
        if not plans.plans:
            reasons = "; ".join(sorted({p.reason or "" for p in plans.infeasible})[:3])
            self.note.object = f"<div class='exo-error'>No plan fits: {html.escape(reasons)}</div>"
            self.launch_button.disabled = True
            return
        sel = self.table.selection
        i = sel[0] if sel else 0
        p = plans.plans[i]
        head = (
            f"<b>{len(plans.plans)}</b> feasible plan{'s' if len(plans.plans) != 1 else ''} for "
            f"<b>{html.escape(plans.model)}</b>"
            + (f", {len(plans.infeasible)} infeasible" if plans.infeasible else "")
            + f". Plan #{i}: {html.escape(p.explanation or p.describe())}"
        )
        status = self.source.launches.get(p.describe())
        if status:
            head += f" <b>{html.escape(status)}</b>"
        self.note.object = f"<div class='exo-note'>{head}</div>"
        self.launch_button.disabled = not self._can_launch()

    def _selected(self) -> Any:
        plans = self.plans
        if plans is None or not plans.plans:
            return None
        sel = self.table.selection
        return plans.plans[sel[0] if sel and sel[0] < len(plans.plans) else 0]

    def _can_launch(self) -> bool:
        p = self._selected()
        return self.source.control is not None and p is not None and p.strategy != "pipeline-tensor" and p.feasible

    def _instance_name(self, model: str) -> str:
        """A short, unused name for an instance of ``model``: the directory's name for a path."""
        base = Path(model).name if "/" in model else model
        taken = self.source.instance_names()
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def _on_launch(self, _event: Any = None) -> None:
        p = self._selected()
        if p is None:
            return
        model = self._model or p.model_ref or self.plans.model
        self._launched, self._launch_status = p.describe(), ""
        try:
            self.source.launch(p, name=self._instance_name(self.plans.model), model=model)
        except Exception as exc:
            self.note.object = f"<div class='exo-error'>{html.escape(error_text(exc))}</div>"
            return
        self.launch_button.disabled = True
