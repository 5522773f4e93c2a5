"""The partial area of the model store: shards fetched from peers, kept apart until complete.

A node that fetches only its shard's tensors (``exo_lab.cluster.fetch``) writes them under
``<store>/.partial/<name>/``, never under ``<store>/<name>``: the small files, each safetensors
file laid out sparse at its full size with its header, and only the byte ranges of the tensors
fetched. The area's manifest (:data:`MANIFEST`) records each file's size and header hash, and each
tensor present: its file, byte range and the SHA-256 the peer gave, checked on arrival. A tensor
is recorded only after its bytes are written and synced, and the manifest is written only once
the files are laid out, so an area left by a killed fetch holds nothing its manifest does not
vouch for; the next fetch resumes from it (or starts over when the peer's files changed).

Nothing in the partial area is a model: the store lists only ``<store>/<name>`` directories
(``.partial`` starts with a dot), so agents neither list it nor serve its files, and a launch never
takes it for a complete copy. A worker loads from it only the tensors its manifest lists and checks
each one's SHA-256 as it reads (:meth:`Manifest.checksums`, ``read_tensors(checksums=...)``).
When every byte of every file is present and verified, :func:`promote` renames the area, in one
step, to ``<store>/<name>``: from then on it is a model like any other.

:func:`lock` (a file lock beside the area, reentrant within a process) is held while a fetch
writes the area and while a worker reads from it, so two workers of one node neither write it at
once nor see it renamed under them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

AREA = ".partial"
MANIFEST = ".exo_lab_partial.json"
#: the manifest of the fetches before the partial area, written inside ``<store>/<name>`` itself:
#: such a directory is a zero-filled partial copy, never a model
LEGACY_MANIFEST = ".exo_lab_fetched.json"
#: non-safetensors files a fetch copies whole (config, tokenizer, chat template, index)
SMALL_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")

_locks: dict[str, FileLock] = {}


def area(model_dir: Path) -> Path:
    """Where the partial copy of the model whose complete copy lives at ``model_dir`` is kept."""
    return model_dir.parent / AREA / model_dir.name


def lock(model_dir: Path) -> FileLock:
    """The lock of ``model_dir``'s partial area (the same object for the same path: reentrant)."""
    path = str(model_dir.parent / AREA / f"{model_dir.name}.lock")
    if path not in _locks:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _locks[path] = FileLock(path)
    return _locks[path]


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a partial fetch (never to be taken for a model)."""
    return path.parent.name == AREA or (path / LEGACY_MANIFEST).exists()


def is_plain_name(name: object) -> bool:
    """A file name a peer may give us, one that stays inside the directory it is joined to: a non-empty string
    with no path separators, no leading dot (``.``, ``..``, hidden files) and no NUL."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def is_small_file(name: str) -> bool:
    """Whether a fetch copies the file ``name`` whole."""
    return name.endswith(SMALL_SUFFIXES) and not name.endswith(".safetensors")


@dataclass
class Manifest:
    """What a partial area holds.

    ``files``: every file the complete model has here (name -> size); ``headers``: each safetensors
    file's header (``{"length": 8 + n, "sha256": ...}``); ``tensors``: each tensor present and
    verified (``{"file", "start", "end", "sha256"}``, absolute byte offsets); ``bytes_fetched``:
    tensor bytes fetched into the area so far, over every fetch.
    """

    files: dict[str, int] = field(default_factory=dict)
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_fetched: int = 0

    @classmethod
    def read(cls, where: Path) -> Manifest | None:
        """The manifest of the area ``where``; None when there is none (or it cannot be read)."""
        try:
            data = json.loads((where / MANIFEST).read_text())
            return cls(
                files={str(k): int(v) for k, v in data["files"].items()},
                headers=dict(data["headers"]),
                tensors=dict(data["tensors"]),
                bytes_fetched=int(data.get("bytes_fetched", 0)),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("the manifest of %s is unreadable (%s): the fetch starts over", where, exc)
            return None

    def write(self, where: Path) -> None:
        """Replace the area's manifest in one step (written and synced first)."""
        tmp = where / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(
                {
                    "files": self.files,
                    "headers": self.headers,
                    "tensors": self.tensors,
                    "bytes_fetched": self.bytes_fetched,
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(where / MANIFEST)

    def checksums(self) -> dict[str, str]:
        """SHA-256 of each tensor present (what a load from the area verifies against)."""
        return {name: t["sha256"] for name, t in self.tensors.items()}

    def missing(self, where: Path) -> list[str]:
        """What keeps the area from being a complete model (empty when it is one)."""
        out = []
        for fname, size in self.files.items():
            path = where / fname
            if not path.is_file() or path.stat().st_size != size:
                out.append(f"{fname}: not laid out")
                continue
            if not fname.endswith(".safetensors"):
                continue
            header = self.headers.get(fname)
            if header is None:
                out.append(f"{fname}: no header")
                continue
            covered = int(header["length"])
            for t in sorted((t for t in self.tensors.values() if t["file"] == fname), key=lambda t: t["start"]):
                if t["start"] > covered:
                    break
                covered = max(covered, int(t["end"]))
            if covered < size:
                out.append(f"{fname}: bytes {covered}.. of {size} not fetched")
        return out


def discard(model_dir: Path) -> None:
    """Remove ``model_dir``'s partial area (hold :func:`lock`)."""
    shutil.rmtree(area(model_dir), ignore_errors=True)


def discard_legacy(model_dir: Path) -> None:
    """Remove a zero-filled partial copy that an earlier version fetched into ``model_dir`` itself."""
    if (model_dir / LEGACY_MANIFEST).exists():
        log.warning("removing %s: a partial copy from an earlier fetch, not a model", model_dir)
        shutil.rmtree(model_dir, ignore_errors=True)


def promote(model_dir: Path) -> bool:
    """Rename a complete partial area to ``model_dir``; True when it was promoted (hold :func:`lock`)."""
    where = area(model_dir)
    manifest = Manifest.read(where)
    if manifest is None or not manifest.files or manifest.missing(where) or model_dir.exists():
        return False
    where.rename(model_dir)  # one step: before it the model is partial, after it complete
    (model_dir / MANIFEST).unlink(missing_ok=True)  # outside the area it marks nothing: a crash here is harmless
    log.info("every byte of %s is fetched and verified: it is a complete model now", model_dir.name)
    return True
