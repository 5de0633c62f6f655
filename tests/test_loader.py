"""load_model / load_config / save_model from files, directories and a (local, offline) Hub cache."""

import pytest
import torch
from safetensors.torch import save_file

from tests.test_model import perturb, tiny_config
from tinyflux.model.loader import LoadError, load_config, load_model, save_model
from tinyflux.model.model import TinyFluxDeep


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyFluxDeep(tiny_config())
    perturb(model)
    path = save_model(model, tmp_path / "run")
    return model, path


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), msg=k)


def test_directory_round_trip(saved):
    model, path = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(str(path.parent), device="cpu", dtype=torch.float32)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert not loaded.training


def test_lone_safetensors_carries_its_config(saved, tmp_path):
    model, path = saved
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(path.read_bytes())
    assert load_config(str(lone)) == model.config
    assert_same_weights(load_model(str(lone), device="cpu", dtype=torch.float32), model)


def test_pt_file_with_wrapped_keys_and_explicit_config(saved, tmp_path):
    model, _ = saved
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": wrapped}, tmp_path / "ckpt.pt")
    loaded = load_model(str(tmp_path / "ckpt.pt"), config=model.config, device="cpu", dtype=torch.float32)
    assert_same_weights(loaded, model)


def test_bf16_dtype_and_ema_file_load_the_same_way(saved):
    model, path = saved
    ema_state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(ema_state, str(path.parent / "ema.safetensors"))
    ema = load_model(str(path.parent), weights_name="ema.safetensors", device="cpu", dtype=torch.float32)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, ema_state[k].float())
    direct = load_model(str(path.parent / "ema.safetensors"), device="cpu", dtype=torch.bfloat16)
    assert next(direct.parameters()).dtype == torch.bfloat16


def test_mismatched_config_names_keys_and_shapes(saved):
    _, path = saved
    with pytest.raises(LoadError) as err:
        load_model(str(path), config=tiny_config(num_double_layers=2, lune_expert_dim=48), device="cpu")
    msg = str(err.value)
    assert "does not fit the model config" in msg
    assert "missing keys" in msg and "double_blocks.1." in msg
    assert (
        "shape mismatches" in msg and "lune_predictor.predictor.6.weight: checkpoint (64, 64) vs model (48, 64)" in msg
    )


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(LoadError, match="neither an existing file or directory nor a Hub id"):
        load_model(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no model.safetensors found"):
        load_model(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(LoadError, match="no config.json found"):
        load_config(str(tmp_path / "empty"))


def test_preset_name_as_config_source():
    assert load_config("deep").num_single_layers == 25


def _fake_hub_cache(root, repo_id, files):
    """The on-disk layout huggingface_hub reads in offline mode: blobs behind snapshots/<commit> and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        target = repo_dir / "snapshots" / commit / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_hub_id_and_subfolder_from_local_cache_offline(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    model, path = saved
    files = {n: (path.parent / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-flux", {**files, **{f"runs/v4/{n}": d for n, d in files.items()}})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert_same_weights(load_model("someone/tiny-flux", device="cpu", dtype=torch.float32), model)
    assert_same_weights(load_model("someone/tiny-flux:runs/v4", device="cpu", dtype=torch.float32), model)
    with pytest.raises(LoadError, match="not in the local Hub cache"):
        load_model("someone/other-repo", device="cpu")


def test_corrupt_weights_fail_with_a_clear_message(saved, tmp_path):
    from tinyflux.trainer.ema import EMA

    model, path = saved
    path.write_bytes(path.read_bytes()[:100])  # a truncated download
    with pytest.raises(LoadError, match="is not a readable safetensors file.*re-save or re-download"):
        load_model(str(path.parent), device="cpu")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="is not a readable torch checkpoint"):
        load_model(str(tmp_path / "bad.pt"), config=model.config, device="cpu")
    with pytest.raises(ValueError, match="EMA file .* is not a readable safetensors file"):
        EMA.load(str(path), model)


def test_wrapper_components_are_stripped_not_substrings():
    from tinyflux.model.loader import clean_name

    assert clean_name("module._orig_mod.double_blocks.0.img_mod.lin.weight") == "double_blocks.0.img_mod.lin.weight"
    assert clean_name("_fsdp_wrapped_module.submodule.weight") == "submodule.weight"  # "submodule" kept whole
