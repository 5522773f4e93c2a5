"""The partial area of the model store: never a model, read only by its manifest, promoted only when complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from exo_lab.models import ModelNotFoundError, partial, resolve
from exo_lab.models.card import read_tensor_index
from exo_lab.models.store import is_model_dir, list_cached
from exo_lab.models.tensors import read_tensors


def _sha(path: Path, a: int, b: int) -> str:
    with open(path, "rb") as f:
        f.seek(a)
        return hashlib.sha256(f.read(b - a)).hexdigest()


def _area(tiny_model: Path, store: Path, name: str, skip: int = 0) -> Path:
    """A partial area holding every byte of the tiny model, its manifest listing all tensors but the first ``skip``."""
    where = partial.area(store / name)
    shutil.copytree(tiny_model, where)
    files = {p.name: p.stat().st_size for p in where.iterdir()}
    st = where / "model.safetensors"
    n = int.from_bytes(st.read_bytes()[:8], "little")
    manifest = partial.Manifest(
        files=files, headers={"model.safetensors": {"length": 8 + n, "sha256": _sha(st, 0, 8 + n)}}
    )
    for t in read_tensor_index(where)[skip:]:
        a, b = t.data_start + t.offsets[0], t.data_start + t.offsets[1]
        manifest.tensors[t.name] = {"file": t.file, "start": a, "end": b, "sha256": _sha(st, a, b)}
    manifest.write(where)
    return where


def test_a_partial_copy_is_never_a_model(tiny_model, tmp_path):
    store = tmp_path / "store"
    where = _area(tiny_model, store, "tiny")
    assert not is_model_dir(where)
    with pytest.raises(ModelNotFoundError, match="partial copy"):
        resolve(where)
    legacy = store / "legacy"
    shutil.copytree(tiny_model, legacy)
    assert is_model_dir(legacy)
    (legacy / partial.LEGACY_MANIFEST).write_text("{}")  # an earlier version's zero-filled copy
    assert not is_model_dir(legacy)
    split = store / "split"  # an index naming a file that is not (yet) there
    shutil.copytree(tiny_model, split)
    (split / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    assert not is_model_dir(split)


def test_the_store_lists_no_partial_copy(tiny_model, models_cache):
    _area(tiny_model, models_cache, "half-fetched")
    assert "half-fetched" not in list_cached() and ".partial" not in list_cached()


def test_a_load_by_manifest_reads_only_verified_tensors(tiny_model, tmp_path):
    where = _area(tiny_model, tmp_path, "tiny", skip=1)
    manifest = partial.Manifest.read(where)
    assert manifest is not None
    first, second = (t.name for t in read_tensor_index(where)[:2])
    assert set(read_tensors(where, [second], manifest.checksums())) == {second}
    with pytest.raises(KeyError, match="never fetched"):
        read_tensors(where, [first], manifest.checksums())
    wrong = {**manifest.checksums(), second: "0" * 64}
    with pytest.raises(ValueError, match="checksum"):
        read_tensors(where, [second], wrong)


def test_only_a_complete_area_is_promoted(tiny_model, tmp_path):
    store = tmp_path / "store"
    where = _area(tiny_model, store, "tiny", skip=1)
    manifest = partial.Manifest.read(where)
    assert manifest is not None and manifest.missing(where)
    assert not partial.promote(store / "tiny") and where.is_dir()
    shutil.rmtree(where)
    where = _area(tiny_model, store, "tiny")
    assert partial.promote(store / "tiny")
    assert not where.exists() and is_model_dir(store / "tiny")
    assert not (store / "tiny" / partial.MANIFEST).exists()


def test_an_unreadable_manifest_starts_the_fetch_over(tmp_path):
    (tmp_path / partial.MANIFEST).write_text('{"files": ')  # cut short
    assert partial.Manifest.read(tmp_path) is None
    assert partial.Manifest.read(tmp_path / "none") is None


def test_only_plain_file_names_are_taken_from_a_peer():
    assert partial.is_plain_name("model-00001-of-00002.safetensors")
    for bad in ("../../x.safetensors", "a/b.json", ".hidden", "", "..", "a\\b"):
        assert not partial.is_plain_name(bad)
