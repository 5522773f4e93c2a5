"""``POST /instance``: which model to launch, and with which plan (an index into the previews, or a plan)."""

from __future__ import annotations

from typing import Any, Literal

from exo_lab.api.schema import NonNegativeInt, PositiveInt, RequestModel


class LaunchRequest(RequestModel):
    """Launch ``model_id`` with ``plan``: an index into ``GET /instance/previews`` (with the same filters), a plan
    object from it, or none for the best plan."""

    model_id: str
    plan: NonNegativeInt | dict[str, Any] | None = None
    name: str | None = None
    max_batch: PositiveInt = 16
    max_queue: PositiveInt = 256
    sharding: str | None = None
    min_nodes: PositiveInt | None = None
    node_ids: list[str] | str | None = None
    objective: Literal["decode", "ttft"] = "decode"
    context: PositiveInt = 4096
    prompt_tokens: PositiveInt | None = None
    batch: PositiveInt = 1
