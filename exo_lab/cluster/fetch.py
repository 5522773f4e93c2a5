"""Fetch just a shard's tensors of a model from a peer node agent.

The peer serves its model files with HTTP range requests (signed with the cluster key). The copy
goes to this store's partial area (:mod:`exo_lab.models.partial`), never to the model's own
directory: the small files (config, tokenizer, index) whole, each ``model*.safetensors`` file laid
out sparse at its full size under the peer's header, then only the byte ranges of the tensors the
shard needs, each checked against the peer's SHA-256 of the same range and recorded in the area's
manifest once it is on disk. An interrupted fetch resumes from the manifest, so nothing is fetched
twice; one whose peer's files changed starts over.

:func:`fetched` is what a worker uses: it holds the area's lock, fetches, promotes the area to a
complete model once every byte is there, and says where to load from and what to verify (a load
from the area reads only the tensors the manifest lists, each checked against its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.models import partial
from exo_lab.models.partial import is_plain_name
from exo_lab.models.store import is_model_dir

log = logging.getLogger(__name__)

MANIFEST = partial.MANIFEST
MAX_HEADER = 100 * 1024 * 1024  # what the safetensors format itself allows
SAVE_EVERY_S = 1.0  # the manifest is rewritten at most this often while tensors arrive (and at the end)


class FetchError(RuntimeError):
    """The peer could not give us the files (missing, refused, or corrupt)."""


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


def _listing(client: SignedClient, name: str, source: str) -> dict[str, int]:
    """The files of the peer's model worth copying (plain names only): small files and model*.safetensors."""
    try:
        files = json.loads(_get(client, f"/models/{name}"))["files"]
        files = {str(f): int(size) for f, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FetchError(f"{source} listed the files of {name} in a shape we do not read: {exc}") from exc
    out = {}
    for fname, size in files.items():
        if not is_plain_name(fname):  # a peer naming ../x is hostile or broken: use none of its files
            raise FetchError(f"{source} lists a file named {fname!r}: only plain file names are accepted")
        if size < 0:
            raise FetchError(f"{source} lists {fname} with a size of {size!r}")
        if partial.is_small_file(fname) or (fname.startswith("model") and fname.endswith(".safetensors")):
            out[fname] = size
    if "config.json" not in out or not any(f.endswith(".safetensors") for f in out):
        raise FetchError(f"{source} has no config.json and model*.safetensors for {name}")
    return out


def _headers(client: SignedClient, name: str, files: dict[str, int]) -> dict[str, bytes]:
    """Each safetensors file's first ``8 + n`` bytes (its length and JSON header), from the peer."""
    out = {}
    for fname in sorted(f for f in files if f.endswith(".safetensors")):
        url = f"/models/{name}/files/{fname}"
        n = struct.unpack("<Q", _get(client, url, (0, 8)))[0]
        if n > min(MAX_HEADER, files[fname] - 8):
            raise FetchError(f"{fname} of {name}: a header of {n} bytes in a file of {files[fname]}")
        out[fname] = _get(client, url, (0, 8 + n))
    return out


def _header_entry(header: bytes) -> dict[str, Any]:
    return {"length": len(header), "sha256": hashlib.sha256(header).hexdigest()}


def _matches(manifest: partial.Manifest, where: Path, files: dict[str, int], headers: dict[str, bytes]) -> bool:
    """Whether the area was laid out for exactly these files (else it starts over)."""
    if manifest.files != files or set(manifest.headers) != set(headers):
        return False
    if any(manifest.headers[f] != _header_entry(h) for f, h in headers.items()):
        return False
    return all((where / f).is_file() and (where / f).stat().st_size == size for f, size in files.items())


def _lay_out(
    client: SignedClient, name: str, dest: Path, files: dict[str, int], headers: dict[str, bytes]
) -> partial.Manifest:
    """Start the area afresh: small files whole, safetensors files sparse under their headers, then the manifest."""
    partial.discard(dest)
    where = partial.area(dest)
    where.mkdir(parents=True)
    for fname in sorted(files):
        if fname in headers:
            with open(where / fname, "wb") as f:
                f.write(headers[fname])
                f.truncate(files[fname])  # sparse: only fetched ranges take space
        else:
            data = _get(client, f"/models/{name}/files/{fname}")
            if len(data) != files[fname]:
                raise FetchError(f"{fname} of {name}: {len(data)} bytes, the listing said {files[fname]}")
            (where / fname).write_bytes(data)
    manifest = partial.Manifest(files=dict(files), headers={f: _header_entry(h) for f, h in headers.items()})
    manifest.write(where)  # last: an area without a manifest is not laid out yet
    return manifest


def fetch_tensors(
    source: str,
    key: str,
    name: str,
    dest: Path,
    wanted: Callable[[str], bool],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Copy the tensors for which ``wanted(tensor)`` is true from ``source``'s model ``name``.

    ``dest`` is where the complete model lives in this store; the copy goes to its partial area
    (:func:`exo_lab.models.partial.area`) and stays there. ``wanted`` is first asked once every
    file is laid out (it may read the area's headers). Returns the bytes fetched by this call.
    """
    with partial.lock(dest):
        partial.discard_legacy(dest)
        where = partial.area(dest)
        client = _client(source, key)
        files = _listing(client, name, source)
        headers = _headers(client, name, files)
        manifest = partial.Manifest.read(where)
        if manifest is None or not _matches(manifest, where, files, headers):
            manifest = _lay_out(client, name, dest, files, headers)
        plan: list[tuple[str, str, int, int]] = []  # tensor, file, start, end
        for fname, header in headers.items():
            meta = json.loads(header[8:])
            meta.pop("__metadata__", None)
            for tname, info in meta.items():
                a, b = (len(header) + int(o) for o in info["data_offsets"])
                if not len(header) <= a <= b <= files[fname]:
                    raise FetchError(f"{fname} of {name}: {tname} lies outside the file")
                if tname not in manifest.tensors and wanted(tname):
                    plan.append((tname, fname, a, b))
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
        saved = time.monotonic()
        try:
            for (tname, fname, a, b), expected in zip(plan, sums, strict=True):
                data = _get(client, f"/models/{name}/files/{fname}", (a, b)) if b > a else b""
                if len(data) != b - a or hashlib.sha256(data).hexdigest() != expected:
                    raise FetchError(f"{tname} from {source} failed its checksum; try again")
                with open(where / fname, "r+b") as f:
                    f.seek(a)
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                # recorded only now that its bytes are on disk: the manifest never vouches for zeros
                manifest.tensors[tname] = {"file": fname, "start": a, "end": b, "sha256": expected}
                manifest.bytes_fetched += len(data)
                done += len(data)
                if time.monotonic() - saved > SAVE_EVERY_S:
                    manifest.write(where)
                    saved = time.monotonic()
                if progress is not None:
                    progress(done, total)
        finally:
            manifest.write(where)
        log.info("fetched %d tensors (%.1f MB) of %s from %s", len(plan), done / 1e6, name, source)
        return done


@dataclass(frozen=True)
class Fetched:
    """Where a worker loads its shard from, and how it verifies what it reads."""

    path: Path  # the complete model, or its partial area
    checksums: dict[str, str] | None  # the partial area's tensors (read only these, each verified); None: complete
    bytes_fetched: int  # by this fetch


@contextmanager
def fetched(
    dest: Path,
    sources: Iterable[str],
    key: str,
    name: str,
    wanted: Callable[[str], bool],
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Fetched]:
    """Fetch the shard (``wanted``) from the first of ``sources`` that gives it, and hold it while it is read.

    The area's lock is held until the block ends, so no other worker of this node writes the area or
    promotes it meanwhile. A model complete at ``dest`` (promoted now or earlier) is read as it is.
    """
    with partial.lock(dest):
        done = 0
        if not is_model_dir(dest):
            errors = []
            for source in sources:
                try:
                    done = fetch_tensors(source, key, name, dest, wanted, progress)
                    break
                except FetchError as exc:
                    errors.append(f"{source}: {exc}")
            else:
                raise FetchError("could not fetch the model: " + ("; ".join(errors) or "no peer has it"))
            partial.promote(dest)
        if is_model_dir(dest):
            partial.discard(dest)  # a complete copy makes a partial one redundant
            yield Fetched(dest, None, done)
            return
        where = partial.area(dest)
        manifest = partial.Manifest.read(where)
        if manifest is None:
            raise FetchError(f"the partial copy of {name} has no manifest")
        yield Fetched(where, manifest.checksums(), done)


def range_checksums(model_dir: Path, ranges: Iterable[tuple[str, int, int]]) -> list[str]:
    """SHA-256 of each ``(file, start, end)`` byte range of a local model."""
    out = []
    for fname, a, b in ranges:
        if not is_plain_name(fname):
            raise ValueError(f"{fname!r} is not a plain file name")
        if not 0 <= a <= b:
            raise ValueError(f"{fname}: no byte range [{a}, {b})")
        path = (model_dir / fname).resolve()
        if model_dir.resolve() not in path.parents:
            raise ValueError(f"{fname} is outside the model directory")
        with open(path, "rb") as f:
            f.seek(a)
            out.append(hashlib.sha256(f.read(b - a)).hexdigest())
    return out
