"""Fetch just a shard's tensors of a model from a peer node agent.

The peer serves its model files with HTTP range requests (signed with the
cluster key). We copy the small files (config, tokenizer, index), then each
safetensors header, and lay every file out sparse at its full size; then only
the byte ranges of the tensors this shard needs are fetched, written at their
offsets, and checked against the peer's SHA-256 of the same range. A
manifest records what is done, so an interrupted fetch resumes and nothing
is fetched twice. The result loads through the normal path
(``read_tensors`` reads only those ranges).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from exo_lab.cluster.http import RequestError, SignedClient

log = logging.getLogger(__name__)

MANIFEST = ".exo_lab_fetched.json"
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "chat_template.jinja",
)


class FetchError(RuntimeError):
    """The peer could not give us the files (missing, refused, or corrupt)."""


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name, one that stays inside the directory it is joined to.

    No path separators, no leading dot (``.``, ``..``, hidden files), no NUL, not empty.
    """
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def _listing(source: str, data: object) -> dict[str, int]:
    """A peer's ``{"files": {name: size}}``, refused (FetchError) unless every name is plain and every size a count."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise FetchError(f"{source} sent no file list")
    for name, size in files.items():
        if not is_plain_name(name):
            raise FetchError(f"{source} lists a file named {name!r}: only plain file names are accepted")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FetchError(f"{source} lists {name} with a size of {size!r}")
    return files


def _client(source: str, key: str) -> SignedClient:
    return SignedClient(source, key, timeout=60.0)


def _get(
    client: SignedClient, path: str, byte_range: tuple[int, int] | None = None, body: bytes | None = None
) -> bytes:
    try:
        if byte_range is not None:
            return client.read_range(path, *byte_range)
        return client.request("POST" if body is not None else "GET", path, body)
    except RequestError as exc:
        raise FetchError(str(exc)) from exc


def _manifest(dest: Path) -> dict:
    path = dest / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"tensors": {}, "bytes_fetched": 0}


def _save_manifest(dest: Path, data: dict) -> None:
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(dest / MANIFEST)


def fetch_tensors(
    source: str,
    key: str,
    name: str,
    dest: Path,
    wanted: Callable[[str], bool],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Copy the tensors for which ``wanted(name)`` is true from ``source``'s model ``name``; returns bytes fetched."""
    dest.mkdir(parents=True, exist_ok=True)
    client = _client(source, key)
    files = _listing(source, json.loads(_get(client, f"/models/{name}")))
    for small in SMALL_FILES:
        if small in files and not (dest / small).exists():
            (dest / f"{small}.part").write_bytes(_get(client, f"/models/{name}/files/{small}"))
            (dest / f"{small}.part").replace(dest / small)
    manifest = _manifest(dest)
    plan: list[tuple[str, str, int, int]] = []  # tensor, file, start, end
    for fname in sorted(f for f in files if f.endswith(".safetensors")):
        target = dest / fname
        n = struct.unpack("<Q", _get(client, f"/models/{name}/files/{fname}", (0, 8)))[0]
        if not target.exists() or target.stat().st_size != files[fname]:
            header = _get(client, f"/models/{name}/files/{fname}", (0, 8 + n))
            with open(target, "wb") as f:
                f.write(header)
                f.truncate(files[fname])  # sparse: only fetched ranges take space
        meta = json.loads(_get(client, f"/models/{name}/files/{fname}", (8, 8 + n)))
        meta.pop("__metadata__", None)
        for tname, info in meta.items():
            if wanted(tname) and tname not in manifest["tensors"]:
                a, b = info["data_offsets"]
                plan.append((tname, fname, 8 + n + a, 8 + n + b))
    if not plan:
        return 0
    sums = json.loads(
        _get(
            client,
            f"/models/{name}/checksums",
            body=json.dumps({"ranges": [[f, a, b] for _, f, a, b in plan]}).encode(),
        )
    )["sha256"]
    total = sum(b - a for _, _, a, b in plan)
    done = 0
    for (tname, fname, a, b), expected in zip(plan, sums):
        data = _get(client, f"/models/{name}/files/{fname}", (a, b))
        if len(data) != b - a or hashlib.sha256(data).hexdigest() != expected:
            raise FetchError(f"{tname} from {source} failed its checksum; try again")
        with open(dest / fname, "r+b") as f:
            f.seek(a)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        manifest["tensors"][tname] = expected
        manifest["bytes_fetched"] = manifest.get("bytes_fetched", 0) + len(data)
        _save_manifest(dest, manifest)
        done += len(data)
        if progress is not None:
            progress(done, total)
    log.info("fetched %d tensors (%.1f MB) of %s from %s", len(plan), done / 1e6, name, source)
    return done


def range_checksums(model_dir: Path, ranges: Iterable[tuple[str, int, int]]) -> list[str]:
    """SHA-256 of each ``(file, start, end)`` byte range of a local model."""
    out = []
    for fname, a, b in ranges:
        if not is_plain_name(fname):
            raise ValueError(f"{fname!r} is not a plain file name")
        path = (model_dir / fname).resolve()
        if model_dir.resolve() not in path.parents:
            raise ValueError(f"{fname} is outside the model directory")
        with open(path, "rb") as f:
            f.seek(a)
            out.append(hashlib.sha256(f.read(b - a)).hexdigest())
    return out
