"""Read chosen tensors from safetensors files: only their bytes, nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from exo_lab.models.card import TensorInfo, read_tensor_index

_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "U32": np.uint32,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "I8": np.int8,
    "F64": np.float64,
    "BOOL": np.bool_,
}


def read_tensors(
    model_dir: Path, names: Iterable[str], checksums: Mapping[str, str] | None = None
) -> dict[str, mx.array]:
    """The named tensors as MLX arrays (bit-exact), reading only their byte ranges.

    With ``checksums`` (name -> SHA-256: a partial copy's manifest), only the tensors it lists are
    read, each checked against its SHA-256; any other is an error, never the zeros a sparse file holds.
    """
    wanted = set(names)
    if checksums is not None and (absent := wanted - set(checksums)):
        raise KeyError(f"tensors never fetched into {model_dir}: {sorted(absent)[:5]}")
    index = {t.name: t for t in read_tensor_index(Path(model_dir)) if t.name in wanted}
    missing = wanted - set(index)
    if missing:
        raise KeyError(f"tensors not in {model_dir}: {sorted(missing)[:5]}")
    out: dict[str, mx.array] = {}
    by_file: dict[str, list[TensorInfo]] = {}
    for t in index.values():
        by_file.setdefault(t.file, []).append(t)
    for fname, tensors in by_file.items():
        with open(Path(model_dir) / fname, "rb") as f:
            for t in sorted(tensors, key=lambda t: t.offsets[0]):
                f.seek(t.data_start + t.offsets[0])
                raw = f.read(t.nbytes)
                if len(raw) != t.nbytes:
                    raise ValueError(
                        f"{Path(model_dir) / fname} is truncated: tensor {t.name} needs {t.nbytes} bytes at "
                        f"{t.data_start + t.offsets[0]}, the file holds {len(raw)} of them"
                    )
                if checksums is not None and hashlib.sha256(raw).hexdigest() != checksums[t.name]:
                    raise ValueError(f"tensor {t.name} in {Path(model_dir) / fname} does not match its checksum")
                arr = np.frombuffer(raw, dtype=_NUMPY[t.dtype]).reshape(t.shape)
                a = mx.array(arr)
                if t.dtype == "BF16":
                    a = a.view(mx.bfloat16)
                out[t.name] = a
    return out
