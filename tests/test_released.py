"""The released TinyFlux-Deep v4.2: its state dict, its function (golden vectors of the original), its config.json.

tests/data/tinyflux_v42/ is a copy of shared/compat/tinyflux_v42 (see its README): the original network at a tiny size
with every parameter random, its inputs, and the original's float32 outputs in eval mode.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyflux.model.config import ConfigError, TinyFluxConfig
from tinyflux.model.loader import load_config, load_model
from tinyflux.model.model import TinyFluxDeep, count_parameters

DATA = Path(__file__).parent / "data" / "tinyflux_v42"
RELEASED = json.loads((DATA / "deep_state_dict.json").read_text())


def golden_model() -> TinyFluxDeep:
    config = TinyFluxConfig.from_dict(json.loads((DATA / "tiny_config.json").read_text()))
    model = TinyFluxDeep(config).eval()
    model.load_state_dict(load_file(DATA / "tiny_model.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(DATA / "cases.safetensors")


def case_inputs(cases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")
    return {k: cases[k] for k in names}


def test_deep_preset_has_exactly_the_released_state_dict():
    with torch.device("meta"):
        deep = TinyFluxDeep(TinyFluxConfig.preset("deep"))
    ours = {k: list(v.shape) for k, v in deep.state_dict().items()}
    assert ours == RELEASED["state_dict"]  # the same 683 keys, each with its shape
    assert len(ours) == 683
    assert count_parameters(deep) == RELEASED["parameters"] == 245_347_234
    assert TinyFluxConfig.from_dict(RELEASED["config"]) == TinyFluxConfig.preset("deep")


@torch.no_grad()
def test_golden_cases_reproduce_the_original_outputs(cases):
    model = golden_model()
    x = case_inputs(cases)
    v, expert = model(**x, return_expert_pred=True)
    torch.testing.assert_close(v, cases["out_predicted"], atol=1e-5, rtol=0)
    for name in ("lune_pred", "sol_stats_pred", "sol_spatial_pred"):
        torch.testing.assert_close(expert[name], cases[name], atol=1e-5, rtol=0, msg=name)
    forced = model(
        **x, lune_features=cases["lune_features"], sol_stats=cases["sol_stats"], sol_spatial=cases["sol_spatial"]
    )
    torch.testing.assert_close(forced, cases["out_teacher_forced"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**x, txt_ids=cases["txt_ids"]), cases["out_txt_ids"], atol=1e-5, rtol=0)
    # The three outputs differ from each other, so each case checks its own path.
    assert (forced - v).abs().max() > 1e-3 and (cases["out_txt_ids"] - v).abs().max() > 1e-3


@torch.no_grad()
def test_our_four_cached_statistics_feed_a_three_statistic_model_by_their_first_three(cases):
    model = golden_model()
    x = case_inputs(cases)
    four = torch.cat([cases["sol_stats"], torch.rand(2, 1)], dim=1)  # + sparsity, which the released prior never read
    torch.testing.assert_close(model(**x, sol_stats=four), model(**x, sol_stats=cases["sol_stats"]))


def test_original_config_json_means_the_released_network(tmp_path):
    original = json.loads((DATA / "tiny_config.json").read_text())
    assert "joint_attention_dim" in original and "t5_layers" not in original
    (tmp_path / "config.json").write_text(json.dumps({**original, "_metadata": {"step": 5}}))
    config = load_config(str(tmp_path))
    assert config.t5_hidden_size == original["joint_attention_dim"]
    assert config.t5_layers == (12,) and not config.use_cross_attention_sharing
    assert config.sol_num_stats == 3 and config.text_regime == "padded" and config.max_text_tokens == 128
    assert config.use_t5_vec and config.lune_predictor_dropout == original["lune_dropout"]
    # Ours keeps loading too, and round-trips.
    config.save_json(tmp_path / "ours.json")
    assert load_config(str(tmp_path / "ours.json")) == config
    with pytest.raises(ConfigError, match=r"unknown TinyFluxConfig field\(s\) \['bogus'\]"):
        TinyFluxConfig.from_dict({**original, "bogus": 1})


def test_spec_readme_config_builds_with_derived_rope_axes():
    spec = dict(
        hidden_size=512,
        num_attention_heads=4,
        attention_head_dim=128,
        num_double_layers=15,
        num_single_layers=25,
        use_lune_expert=True,
        use_sol_prior=True,
    )
    config = TinyFluxConfig(**spec)
    assert config.axes_dims_rope == (16, 56, 56)
    assert TinyFluxConfig().axes_dims_rope == (16, 24, 24)  # the spec's default at head dim 64
    # With the released values of our extras it is the deep preset, parameter for parameter.
    released = TinyFluxConfig(**spec, t5_layers=(12,), use_cross_attention_sharing=False, sol_num_stats=3)
    with torch.device("meta"):
        assert {k: list(v.shape) for k, v in TinyFluxDeep(released).state_dict().items()} == RELEASED["state_dict"]
    with pytest.raises(ConfigError, match=r"axes_dims_rope=\(16, 24, 24\) sums to 64"):
        TinyFluxConfig(**spec, axes_dims_rope=(16, 24, 24))
    with pytest.raises(ConfigError, match="give axes_dims_rope explicitly"):
        TinyFluxConfig(hidden_size=40, num_attention_heads=1, attention_head_dim=40)


@torch.no_grad()
def test_extras_off_are_the_released_function(cases):
    """t5_layers=(12,) reads a one-layer (B, L, 1, D) input as the plain (B, L, D) states, and masked text with every
    token real equals the released unmasked forward."""
    model = golden_model()
    x = case_inputs(cases)
    ref = model(**x)
    one_layer = {**x, "encoder_hidden_states": x["encoder_hidden_states"][:, :, None]}
    torch.testing.assert_close(model(**one_layer), ref)
    all_real = torch.ones(2, x["encoder_hidden_states"].shape[1], dtype=torch.bool)
    torch.testing.assert_close(model(**x, encoder_attention_mask=all_real), ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_released_checkpoint_directory_and_bare_state_dict_load_strictly(tmp_path, cases):
    original = json.loads((DATA / "tiny_config.json").read_text())
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(original))
    state = load_file(DATA / "tiny_model.safetensors")
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"))
    model = load_model(str(folder), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(model(**case_inputs(cases)), cases["out_predicted"], atol=1e-5, rtol=0)
    # A bare state dict (the original's .pt checkpoints) with the config given separately.
    torch.save({"model": state}, tmp_path / "step_100.pt")
    bare = load_model(str(tmp_path / "step_100.pt"), config=load_config(str(folder)), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(bare(**case_inputs(cases)), cases["out_predicted"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_spec_loader_example_loads_a_released_repo_from_the_offline_hub_cache(tmp_path, monkeypatch, cases):
    """load_model("AbstractPhil/tiny-flux-deep") on a repo laid out as the release is (model.safetensors + the
    original config.json), here the golden tiny network, from huggingface_hub's offline cache."""
    import huggingface_hub.constants as hub_constants

    from tests.test_loader import _fake_hub_cache

    files = {"config.json": (DATA / "tiny_config.json").read_bytes()}
    files["model.safetensors"] = (DATA / "tiny_model.safetensors").read_bytes()
    _fake_hub_cache(tmp_path / "hub", "AbstractPhil/tiny-flux-deep", files)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = load_model("AbstractPhil/tiny-flux-deep", device="cpu", dtype=torch.float32)
    torch.testing.assert_close(model(**case_inputs(cases)), cases["out_predicted"], atol=1e-5, rtol=0)
