"""Instances over HTTP, with exo's route names: previews, launch, list, get, delete, state and events.

- ``GET /instance/previews?model_id=M`` (filters ``sharding``, ``min_nodes``, ``node_ids``, ``objective``,
  ``context``, ``prompt_tokens``, ``batch``): ranked plans, each with its ``index``, for a model served here
  or available on this machine (nothing is downloaded or built; one 404 for anything else, see
  :mod:`exo_lab.models.local`);
- ``POST /instance`` ``{"model_id", "plan": index | plan JSON, "name", "max_batch", "max_queue", filters}``:
  launch (201, the instance as it starts loading);
- ``GET /instances``, ``GET /instance/{id}``, ``DELETE /instance/{id}``: any instance of the cluster;
- ``GET /state``: nodes, links, instances, models on disk; ``GET /events``: SSE of state changes.

The server's :class:`ClusterControl` (``exo_lab.control.Control``, above this layer) does the work
on a thread; without one (``exo-lab serve``), previews plan on this machine and the other routes
answer 404 saying the server is not a cluster member.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import IOLoop

from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.schema.control import LaunchRequest

Event = dict[str, Any]


class ClusterControl(Protocol):
    """What the API needs from the coordinator it runs in (implemented by ``exo_lab.control.Control``)."""

    def previews(self, model: str, **filters: Any) -> Any: ...
    def launch(self, model: str, plan: Any = None, **options: Any) -> Any: ...
    def instances(self) -> list[dict[str, Any]]: ...
    def instance(self, instance_id: str) -> dict[str, Any]: ...
    def delete(self, instance_id: str) -> dict[str, Any]: ...
    def state(self) -> dict[str, Any]: ...
    def route(self, model: str) -> str | None: ...
    def route_owner(self, model: str) -> dict[str, Any] | None: ...
    def models(self) -> list[dict[str, Any]]: ...
    def subscribe(self, callback: Callable[[Event], object]) -> Callable[[], None]: ...


def _not_member() -> ApiError:
    return ApiError(
        404,
        "This API serves its models without a cluster (exo-lab serve); instances are cluster state: "
        "start the node with 'exo-lab up' to manage them.",
        code="not_a_cluster_member",
    )


class ControlHandler(ApiHandler):
    """Runs the control's (blocking) calls on a thread and answers errors as JSON."""

    @property
    def control(self) -> ClusterControl | None:
        return self.settings.get("control")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await IOLoop.current().run_in_executor(None, lambda: fn(*args, **kwargs))

    def query_int(self, name: str, default: int | None, minimum: int = 1) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise bad_request(f"'{name}' must be an integer, got {raw!r}.", name) from None
        if value < minimum:
            raise bad_request(f"'{name}' must be at least {minimum}.", name)
        return value

    def require_control(self) -> ClusterControl:
        if self.control is None:
            raise _not_member()
        return self.control


def _filters(get: Callable[[str], Any], get_int: Callable[[str, int | None], int | None]) -> dict[str, Any]:
    """The plan filters and sizes of a preview, from query arguments or a JSON body."""
    context = get_int("context", 4096) or 4096
    prompt = get_int("prompt_tokens", min(512, context)) or min(512, context)
    if prompt > context:
        raise bad_request("'prompt_tokens' must not exceed 'context'.", "prompt_tokens")
    objective = get("objective") or "decode"
    if objective not in ("decode", "ttft"):
        raise bad_request("'objective' must be 'decode' or 'ttft'.", "objective")
    node_ids = get("node_ids")
    if isinstance(node_ids, str):
        node_ids = [n.strip() for n in node_ids.split(",") if n.strip()]
    if node_ids is not None and not (isinstance(node_ids, list) and all(isinstance(n, str) for n in node_ids)):
        raise bad_request("'node_ids' must be node ids (a list, or comma-separated).", "node_ids")
    sharding = get("sharding")
    if sharding is not None and not isinstance(sharding, str):
        raise bad_request("'sharding' must be a string.", "sharding")
    return {
        "sharding": sharding,
        "min_nodes": get_int("min_nodes", None),
        "node_ids": node_ids or None,
        "objective": objective,
        "context": context,
        "prompt_tokens": prompt,
        "batch": get_int("batch", 1) or 1,
    }


def indexed(plans_json: dict[str, Any]) -> dict[str, Any]:
    """Plans JSON with each plan's ``index`` (what ``POST /instance`` takes as ``plan``)."""
    for i, p in enumerate(plans_json.get("plans", [])):
        p["index"] = i
    return plans_json


class PreviewsHandler(ControlHandler):
    """``GET /instance/previews``: ranked plans for a model on the cluster (or, without one, this machine)."""

    def initialize(self, registry, topology_source=None) -> None:
        super().initialize(registry)
        self.topology_source = topology_source

    async def get(self) -> None:
        try:
            model = self.get_query_argument("model_id", None)
            if not model:
                raise bad_request(
                    "Missing required query parameter: 'model_id'.", "model_id", "missing_required_parameter"
                )
            filters = _filters(lambda k: self.get_query_argument(k, None), self.query_int)
            if self.control is not None:
                plans = await self.call(self.control.previews, model, **filters)
            else:
                plans = await self.call(self._this_machine, model, filters)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(indexed(plans.to_json()))

    def _this_machine(self, model: str, f: dict[str, Any]) -> Any:
        from exo_lab.models import ModelNotFoundError
        from exo_lab.placement.preview import preview, this_machine

        if model in self.registry.names():  # a served model: plan for its files
            model = str(self.registry.get(model).path or model)
        topology = self.topology_source() if self.topology_source else this_machine()
        try:  # only what is here: nothing downloaded or built, one 404 for the rest (exo_lab.models.local)
            return preview(
                topology, model, f["context"], f["prompt_tokens"], f["batch"], f["objective"], download=False
            )
        except ModelNotFoundError as exc:
            raise ApiError(404, str(exc), param="model_id", code="model_not_found") from exc


class LaunchHandler(ControlHandler):
    """``POST /instance``: launch a plan (by index into the previews, or its JSON); 201 with the instance."""

    schema = LaunchRequest

    async def post(self) -> None:
        try:
            control = self.require_control()
            req = self.body()
            options: dict[str, Any] = {"max_batch": req.max_batch, "max_queue": req.max_queue}
            if req.name:
                options["name"] = req.name
            if not isinstance(req.plan, dict):
                fields = req.model_dump()
                if fields["prompt_tokens"] is None:
                    fields.pop("prompt_tokens")
                options.update(_filters(fields.get, lambda k, d: fields.get(k, d)))
            inst = await self.call(control.launch, req.model_id, req.plan, **options)
            summary = {
                "id": inst.id,
                "name": inst.name,
                "model": req.model_id,
                "state": inst.state,
                "plan": inst.plan.to_json(),
            }
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(summary, 201)


class InstancesHandler(ControlHandler):
    """``GET /instances``: every instance of the cluster."""

    async def get(self) -> None:
        try:
            data = await self.call(self.require_control().instances)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json({"instances": data})


class InstanceHandler(ControlHandler):
    """``GET`` / ``DELETE /instance/{id}``."""

    async def get(self, instance_id: str) -> None:
        try:
            data = await self.call(self.require_control().instance, instance_id)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(data)

    async def delete(self, instance_id: str) -> None:
        try:
            data = await self.call(self.require_control().delete, instance_id)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(data)


class StateHandler(ControlHandler):
    """``GET /state``: nodes, links, instances, models on disk."""

    async def get(self) -> None:
        try:
            data = await self.call(self.require_control().state)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(data)


class EventsHandler(ControlHandler):
    """``GET /events``: server-sent events of the cluster's changes (first the whole ``state``)."""

    async def get(self) -> None:
        try:
            control = self.require_control()
        except ApiError as err:
            self.send_api_error(err)
            return
        self.start_sse()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        unsubscribe = control.subscribe(lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while not self.client_gone:
                try:
                    event = await asyncio.wait_for(events.get(), 15.0)
                except TimeoutError:  # a comment line keeps proxies and idle timeouts from closing it
                    self.write(": keep-alive\n\n")
                    await self.flush()
                    continue
                if not await self.send_sse(json.dumps(event), event["type"]):
                    break
        except Exception:  # the client went away mid-write
            pass
        finally:
            unsubscribe()
