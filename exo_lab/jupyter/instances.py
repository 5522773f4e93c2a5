"""The instances routes' pieces: the cluster's instances merged for the panel, launch bodies checked, requests
forwarded to a coordinator's API (:mod:`exo_lab.jupyter.handlers` serves them)."""

from __future__ import annotations

import json
import re
from typing import Any

import tornado.web

from exo_lab.cluster.coordinators import CoordinatorInfo
from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.cluster.instances import ClusterInstance

INSTANCE_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def owner_of(info: CoordinatorInfo) -> dict[str, Any]:
    """The owner fields of an instance a registered coordinator launched (what the agents report once leased)."""
    return {"coordinator": info.id, "label": info.label, "api": info.api_url}


def _from_registration(summary: dict[str, Any], info: CoordinatorInfo) -> dict[str, Any]:
    """An instance as only its coordinator's registration tells it (not, or not yet, on any agent)."""
    nodes = list(summary.get("nodes") or [])
    return {
        **summary,
        "id": summary.get("id"),
        "name": summary.get("name") or "",
        "model": summary.get("model") or "",
        "owner": owner_of(info),
        "state": summary.get("state") or "launching",
        "loaded": [summary.get("loaded_layers") or 0, summary.get("total_layers") or 0],
        "error": summary.get("error"),
        "nodes": nodes,
        "node_names": list(summary.get("node_names") or nodes),
        "ranks_alive": None,
        "reserved_bytes": {},
    }


def merge_instances(
    found: list[ClusterInstance],
    picked: CoordinatorInfo,
    registered: list[CoordinatorInfo],
    node_names: dict[str, str],
) -> list[dict[str, Any]]:
    """The cluster's instances as the panel shows them, stopped ones left out.

    The agents say which instances exist and where; a registered coordinator's own file fills in
    what it knows of those it launched (name, model, state, layers loaded, plan description) where
    the agents report none. The picked coordinator's instances that no agent holds yet (still
    launching, or failed before any rank started) are listed from its file.
    """
    mine_ids = {i.get("id") for i in picked.instances}
    by_id = {i.get("id"): (c, i) for c in registered for i in c.instances if i.get("id")}
    out = []
    for inst in found:
        d = inst.to_json()
        d["loaded"] = list(inst.loaded)
        known = by_id.get(inst.id)
        if known is not None:
            coordinator, summary = known
            d["owner"] = d["owner"] or owner_of(coordinator)
            d["model"] = d["model"] or summary.get("model") or ""
            d["name"] = d["name"] or summary.get("name") or ""
            if summary.get("state") and d["state"] not in ("failed", "stopped"):  # the agents know an end first
                d["state"] = summary["state"]
            if summary.get("total_layers"):
                d["loaded"] = [summary.get("loaded_layers") or 0, summary["total_layers"]]
            d["error"] = d["error"] or summary.get("error")
            for k in ("description", "strategy", "predicted_decode_tps", "predicted_ttft_s", "replacements", "created"):
                if k in summary:
                    d.setdefault(k, summary[k])
        if d["state"] == "stopped":
            continue
        d["node_names"] = [node_names.get(n, n) for n in d["nodes"]]
        d["ranks_alive"] = sum(len(p) for p in inst.pids.values())
        d.setdefault("description", d["plan"].get("description", ""))
        out.append(d)
    seen = {d["id"] for d in out} | {i.id for i in found}
    out += [
        _from_registration(s, picked)
        for s in picked.instances
        if s.get("id") and s["id"] not in seen and s.get("state") != "stopped"
    ]
    for d in out:
        owner = d.get("owner") or {}
        d["mine"] = owner.get("coordinator") == picked.id or d["id"] in mine_ids
    return out


def forward(api: SignedClient, method: str, path: str, body: bytes | None, ok: tuple[int, ...], label: str) -> bytes:
    """A request to a coordinator's API; its refusals keep their status and message, failures are a 502."""
    try:
        return api.request(method, path, body, headers={"Content-Type": "application/json"}, ok=ok)
    except RequestError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise tornado.web.HTTPError(exc.status, _api_message(exc.detail)) from exc
        raise tornado.web.HTTPError(502, f"the API of {label} ({api.address}) failed: {exc}") from exc


def _api_message(detail: str) -> str:
    """The message of an API error body (``{"error": {"message": ...}}``), else the body itself."""
    try:
        data = json.loads(detail)
    except ValueError:
        return detail.strip() or "the coordinator refused the request"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return detail.strip()


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _string(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


#: what ``POST instances`` passes on to ``POST /instance``: each field's check and what it must be
_LAUNCH_FIELDS: dict[str, tuple[Any, str]] = {
    "model_id": (_string, "a model name, path or hub id"),
    "plan": (
        lambda v: (
            (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            or (isinstance(v, dict) and isinstance(v.get("ranks"), list))
        ),
        "an index into the previews (0 is the best) or a plan object from them",
    ),
    "name": (_string, "a non-empty string"),
    "context": (_positive_int, "a positive integer"),
    "prompt_tokens": (_positive_int, "a positive integer"),
    "batch": (_positive_int, "a positive integer"),
    "min_nodes": (_positive_int, "a positive integer"),
    "objective": (lambda v: v in ("decode", "ttft"), "'decode' or 'ttft'"),
    "sharding": (_string, "a string"),
    "node_ids": (
        lambda v: _string(v) or (isinstance(v, list) and all(_string(n) for n in v)),
        "node ids (a list, or comma-separated)",
    ),
}


def launch_body(raw: bytes) -> dict[str, Any]:
    """The checked body of ``POST instances`` (400 naming what is wrong); null fields are dropped."""
    try:
        body = json.loads(raw or b"")
    except ValueError as exc:
        raise tornado.web.HTTPError(
            400, f'the body is not JSON ({exc}); send {{"model_id": ..., "plan": ...}}'
        ) from exc
    if not isinstance(body, dict):
        raise tornado.web.HTTPError(400, 'the body must be a JSON object: {"model_id": ..., "plan": ...}')
    unknown = sorted(set(body) - set(_LAUNCH_FIELDS))
    if unknown:
        raise tornado.web.HTTPError(
            400, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_LAUNCH_FIELDS)}"
        )
    body = {k: v for k, v in body.items() if v is not None}
    if "model_id" not in body:
        raise tornado.web.HTTPError(400, "missing 'model_id' (a model name, path or hub id)")
    for k, v in body.items():
        check, what = _LAUNCH_FIELDS[k]
        if not check(v):
            raise tornado.web.HTTPError(400, f"'{k}' must be {what}, got {json.dumps(v)[:80]}")
    return body
