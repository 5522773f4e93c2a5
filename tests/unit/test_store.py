import pytest

from exo_lab.models import ModelNotFoundError, resolve
from exo_lab.models.store import list_cached


def test_existing_directory(tiny_model):
    assert resolve(tiny_model) == tiny_model.resolve()
    assert resolve(str(tiny_model)) == tiny_model.resolve()


def test_demo_is_created_on_first_use_then_cached(models_cache):
    path = resolve("demo")
    assert path.parent == models_cache and (path / "config.json").exists()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve("demo") == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert "demo" in list_cached()


def test_synthetic_presets_by_name():
    assert (resolve("synthetic:qwen3-tiny") / "config.json").exists()
    with pytest.raises(ModelNotFoundError, match="unknown synthetic preset"):
        resolve("synthetic:gpt-17")


def test_offline_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve("meta-llama/Llama-3.2-1B-Instruct")
    assert "meta-llama/Llama-3.2-1B-Instruct" in str(err.value) and "Offline?" in str(err.value)


def test_unknown_name_and_empty_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve(tmp_path)
