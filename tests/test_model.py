"""The student at a tiny size: shapes, init, gradients, teacher forcing, masks, presets."""

import pickle
import subprocess
import sys
from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch

from tinyflux.model.config import ConfigError, TinyFluxConfig
from tinyflux.model.experts import geometric_spatial, geometric_temperature
from tinyflux.model.layers import ModulationOut, RMSNorm
from tinyflux.model.math import (
    RopeAngles,
    apply_rope,
    apply_rope_complex,
    apply_rope_pairs,
    rope,
    rope_angles,
    rope_factors,
    rope_pairs,
    rotate,
    timestep_embedding,
)
from tinyflux.model.model import TinyFluxDeep, count_parameters, pack_latents, unpack_latents

B, H, W, L = 2, 8, 8, 5


def tiny_config(**overrides) -> TinyFluxConfig:
    """1 double + 1 single block, 2 heads x 16 (STYLE.md's test size)."""
    base = dict(
        hidden_size=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_double_layers=1,
        num_single_layers=1,
        axes_dims_rope=(4, 6, 6),
    )
    return TinyFluxConfig.preset("tiny", **{**base, **overrides})


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its (often zero) initial value so that each path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def inputs(config: TinyFluxConfig, seed: int = 0, k_layers: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(B, config.in_channels, H, W, generator=g)
    p = config.patch_size
    txt_shape = (B, L, config.num_t5_layers, config.t5_hidden_size) if k_layers else (B, L, config.t5_hidden_size)
    return dict(
        hidden_states=pack_latents(lat, p),
        encoder_hidden_states=torch.randn(*txt_shape, generator=g),
        pooled_projections=torch.randn(B, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(B, generator=g),
        img_ids=TinyFluxDeep.create_img_ids(B, H // p, W // p),
    )


def teacher(config: TinyFluxConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = config.sol_spatial_size
    spatial = torch.rand(B, s, s, generator=g)
    return dict(
        lune_features=torch.randn(B, config.lune_expert_dim, generator=g),
        sol_stats=torch.rand(B, 4, generator=g),
        sol_spatial=spatial,
    )


@pytest.fixture
def model() -> TinyFluxDeep:
    torch.manual_seed(0)
    m = TinyFluxDeep(tiny_config(lune_predictor_dropout=0.0))
    perturb(m)
    return m


def test_presets_parameter_counts():
    with torch.device("meta"):
        deep = TinyFluxDeep(TinyFluxConfig.preset("deep"))
        default = TinyFluxDeep(TinyFluxConfig())
    # deep = the released TinyFlux-Deep v4.2: 512 wide, 15 double + 25 single blocks, ~245M parameters.
    assert 244e6 < count_parameters(deep) < 247e6
    assert 2.3e6 < count_parameters(deep.lune) < 2.7e6
    assert (deep.config.hidden_size, len(deep.double_blocks), len(deep.single_blocks)) == (512, 15, 25)
    assert count_parameters(TinyFluxDeep(TinyFluxConfig.preset("tiny"))) < 2e6
    assert default.config.hidden_size == 1536 and len(default.double_blocks) == 4 and len(default.single_blocks) == 8


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size=100 must equal num_attention_heads"):
        TinyFluxConfig(hidden_size=100)
    with pytest.raises(ConfigError, match="axes_dims_rope=.*sums to 60"):
        TinyFluxConfig(axes_dims_rope=(20, 20, 20))
    with pytest.raises(ConfigError, match="sol_geometric_weight=1.5 must lie in"):
        TinyFluxConfig(sol_geometric_weight=1.5)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        TinyFluxConfig.preset("huge")
    with pytest.raises(ConfigError, match=r"unknown TinyFluxConfig field\(s\) \['hidden'\]"):
        TinyFluxConfig.from_dict({"hidden": 3})
    cfg = TinyFluxConfig.preset("deep", patch_size=2)
    assert TinyFluxConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert TinyFluxConfig.from_json(tmp_path / "c.json") == cfg


def test_forward_shapes_and_zero_init():
    cfg = tiny_config()
    m = TinyFluxDeep(cfg)
    v, info = m(**inputs(cfg), return_expert_pred=True)
    assert v.shape == (B, H * W, cfg.in_channels)
    assert torch.count_nonzero(v) == 0  # zero final linear: v_pred starts at exactly 0
    assert info["lune_pred"].shape == (B, cfg.lune_expert_dim)
    assert info["sol_stats_pred"].shape == (B, cfg.sol_num_stats) == (B, 4)
    assert info["sol_spatial_pred"].shape == (B, 8, 8)
    assert ((info["sol_spatial_pred"] > 0) & (info["sol_spatial_pred"] < 1)).all()  # a sigmoid per cell
    three = TinyFluxDeep(tiny_config(sol_num_stats=3))
    assert three(**inputs(cfg), return_expert_pred=True)[1]["sol_stats_pred"].shape == (B, 3)


def test_gradient_checkpointing_same_outputs_and_grads(model):
    x = inputs(model.config)
    torch.manual_seed(0)  # the same Lune dropout draws in both passes
    out1 = model(**x).square().mean()
    out1.backward()
    grads1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    torch.manual_seed(0)
    out2 = model(**x).square().mean()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    for n, p in model.named_parameters():
        if n in grads1:
            torch.testing.assert_close(p.grad, grads1[n], msg=n)
    assert len(grads1) > 0.9 * len(list(model.parameters()))


def test_teacher_forcing_changes_output_per_sample(model):
    x, tf = inputs(model.config), teacher(model.config)
    free = model(**x)
    forced = model(**x, **tf)
    assert (free - forced).abs().max() > 1e-4
    # lune_mask / sol_mask select the teacher per sample: sample 0 forced, sample 1 free.
    mask = torch.tensor([True, False])
    mixed = model(**x, **tf, lune_mask=mask, sol_mask=mask)
    torch.testing.assert_close(mixed[0], forced[0])
    torch.testing.assert_close(mixed[1], free[1])


def test_both_distillation_heads_receive_gradient(model):
    _, info = model(**inputs(model.config), **teacher(model.config), return_expert_pred=True)
    tf = teacher(model.config, seed=3)
    loss = (
        (info["lune_pred"] - tf["lune_features"]).square().mean()
        + (info["sol_stats_pred"] - tf["sol_stats"]).square().mean()
        + (info["sol_spatial_pred"] - tf["sol_spatial"]).square().mean()
    )
    assert loss > 0
    loss.backward()
    assert model.lune_predictor.input_proj.weight.grad.abs().sum() > 0
    assert model.sol_prior.stat_predictor[0].weight.grad.abs().sum() > 0
    assert model.sol_prior.spatial_predictor[0].weight.grad.abs().sum() > 0


def test_freeze_flags_remove_expert_parameters():
    m = TinyFluxDeep(tiny_config(freeze_lune=True, freeze_sol=True))
    trainable = {id(p) for p in m.get_trainable_parameters()}
    assert not any(id(p) in trainable for p in m.lune.parameters())
    assert not any(id(p) in trainable for p in m.sol.parameters())
    assert len(trainable) == sum(1 for p in m.parameters()) - len(list(m.lune.parameters())) - len(
        list(m.sol.parameters())
    )


def test_padded_text_tokens_are_ignored(model):
    x = inputs(model.config)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 3:] = False
    ref = model(**x, encoder_attention_mask=mask)
    x["encoder_hidden_states"][:, 3:] = 100.0  # garbage where the mask says padding
    torch.testing.assert_close(model(**x, encoder_attention_mask=mask), ref)
    assert (model(**x) - ref).abs().max() > 1e-4  # without the mask the garbage does reach the output


def test_t5_layer_mix_and_wrong_layer_count(model):
    x = inputs(model.config)
    # A uniform mix of K identical layers equals passing that layer as a (B, L, D) state.
    one = x["encoder_hidden_states"][:, :, :1]
    x["encoder_hidden_states"] = one.expand(-1, -1, model.config.num_t5_layers, -1)
    mixed = model(**x)
    x["encoder_hidden_states"] = one[:, :, 0]
    torch.testing.assert_close(model(**x), mixed)
    x["encoder_hidden_states"] = torch.randn(B, L, 3, model.config.t5_hidden_size)
    with pytest.raises(ValueError, match="has 3 T5 layers .* t5_layers=\\(2, 4\\)"):
        model(**x)


def test_shape_errors_name_the_input(model):
    x = inputs(model.config)
    x["pooled_projections"] = torch.randn(B, 768)
    with pytest.raises(ValueError, match=r"pooled_projections \(2, 768\): expected \(2, 64\)"):
        model(**x)


def test_cross_attention_sharing_shares_one_text_projection():
    shared = TinyFluxDeep(tiny_config(num_double_layers=3, use_cross_attention_sharing=True))
    own = TinyFluxDeep(tiny_config(num_double_layers=3, use_cross_attention_sharing=False))
    attn = own.double_blocks[0].attn
    per_proj = count_parameters(attn.txt_qkv) + count_parameters(attn.txt_out)
    assert count_parameters(own) - count_parameters(shared) == 2 * per_proj
    assert not any(hasattr(b.attn, "txt_qkv") for b in shared.double_blocks)
    assert "shared_txt_attn.txt_qkv.weight" in shared.state_dict()
    assert len(shared.state_dict()) == len(set(shared.state_dict()))
    perturb(shared)
    cfg = shared.config
    assert shared(**inputs(cfg)).shape == (B, H * W, cfg.in_channels)


def test_patch_size_2_and_pack_round_trip():
    lat = torch.randn(B, 16, H, W)
    tokens = pack_latents(lat, 2)
    assert tokens.shape == (B, (H // 2) * (W // 2), 64)
    torch.testing.assert_close(unpack_latents(tokens, H, W, 2), lat)
    cfg = tiny_config(patch_size=2)
    m = TinyFluxDeep(cfg)
    perturb(m)
    assert m(**inputs(cfg)).shape == (B, (H // 2) * (W // 2), 64)


def test_img_ids_rope_and_timestep_embedding_closed_forms():
    ids = TinyFluxDeep.create_img_ids(1, 2, 3)
    assert ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    emb = timestep_embedding(torch.zeros(2), 8)  # [sin, cos] of t itself: t = 0 -> sin 0, cos 1
    torch.testing.assert_close(emb, torch.cat([torch.zeros(2, 4), torch.ones(2, 4)], 1))
    # frequencies exp(-ln(1e4) i / (half - 1)): the first is 1, the last 1e-4 (t is not scaled by 1000)
    t = torch.tensor([0.5])
    torch.testing.assert_close(timestep_embedding(t, 8)[0, [0, 3]], torch.sin(torch.tensor([0.5, 0.5e-4])))
    # RoPE is a rotation (norm preserved) and q.k depends only on the position difference.
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(pos):
        cos, sin = rope(torch.tensor([[[0.0, pos[0], pos[1]]]]), (4, 6, 6), 10000)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), cos, sin

    q1, _, cos, sin = rotated((2.0, 5.0))
    torch.testing.assert_close(q1.norm(), q.norm())
    dot_a = (rotated((2.0, 5.0))[0] * rotated((1.0, 3.0))[1]).sum()
    dot_b = (rotated((7.0, 9.0))[0] * rotated((6.0, 7.0))[1]).sum()
    torch.testing.assert_close(dot_a, dot_b)


def test_sol_map_is_identity_on_q_k_at_init_and_geometric_prior_closed_forms(model):
    # Zero-initialised spatial_to_mod convs: every q/k scale is exp(0) = 1, so the map (teacher's or not) has no
    # effect; once a conv is non-zero, the map reaches the output.
    x, tf = inputs(model.config), teacher(model.config)
    other = {**tf, "sol_spatial": 1 - tf["sol_spatial"]}
    assert (model(**x, **tf) - model(**x, **other)).abs().max() > 1e-4
    with torch.no_grad():
        for block in [*model.double_blocks, *model.single_blocks]:
            block.attn.spatial_to_mod.weight.zero_()
            block.attn.spatial_to_mod.bias.zero_()
    torch.testing.assert_close(model(**x, **tf), model(**x, **other))
    # Geometric prior: temperature 1 + t plus head offsets in [-0.2, 0.2]; the map is exp(-2 r) at noise, flat at data.
    t = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(geometric_temperature(t, 3), torch.tensor([[0.8, 1.0, 1.2], [1.8, 2.0, 2.2]]))
    spatial = geometric_spatial(t, 8)
    torch.testing.assert_close(spatial[1], torch.ones(8, 8))
    r = torch.linspace(-1, 1, 8)
    torch.testing.assert_close(spatial[0, 0, 0], torch.exp(-2 * (2 * r[0] ** 2).sqrt()))
    assert spatial[0].max() < 1 and spatial[0, 3, 3] > spatial[0, 0, 0]  # centre-biased at noise


def test_fused_conditioning_and_fast_rope_keep_the_numbers():
    # RoPE in 4 ops and as one complex product equal the 7-op form bit for bit (same products, same sums), q and k at
    # once; so do the complex product's gradients, on a q / k slice of a wider tensor (as the blocks' fused qkv).
    cos, sin = rope(torch.rand(2, 6, 3) * 10, (4, 6, 6), 10000)
    qkv = torch.randn(3, 2, 3, 6, 16, requires_grad=True)
    qk = qkv[:2]
    expected = apply_rope(qk, cos, sin)
    torch.testing.assert_close(apply_rope_pairs(qk, *rope_pairs(cos, sin)), expected, atol=0, rtol=0)
    torch.testing.assert_close(apply_rope_complex(qk, rope_factors(cos, sin)), expected, atol=0, rtol=0)
    grad = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, qkv, grad)
    (got,) = torch.autograd.grad(rotate(qk, rope_angles(cos, sin)), qkv, grad)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert rope_angles(cos, sin).factor is not None  # the CPU takes the complex product; other devices the real form:
    torch.testing.assert_close(rotate(qk, RopeAngles(cos, sin, None)), expected, atol=0, rtol=0)
    # A pair that is not 8-byte aligned (an odd offset) is copied first, not refused; a bf16 input comes back bf16.
    odd = torch.randn(2, 3, 6, 17)[..., 1:]
    torch.testing.assert_close(apply_rope_complex(odd, rope_factors(cos, sin)), apply_rope(odd, cos, sin))
    assert apply_rope_complex(qk.detach().bfloat16(), rope_factors(cos, sin)).dtype == torch.bfloat16
    # Every block's adaLN and Sol scales in one call: the same outputs bit for bit; gradients to float rounding (the
    # conditioning vector's gradient is one sum over all blocks instead of 55 added up); a text mask and a wrapped
    # adaLN linear (which falls back to the per-block path) included.
    cfg = tiny_config(num_double_layers=2, num_single_layers=2)
    x, tf = inputs(cfg), teacher(cfg)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        m = TinyFluxDeep(cfg)
        perturb(m)
        m.set_fused_conditioning(fused)
        v, expert = m(**x, **tf, return_expert_pred=True, encoder_attention_mask=mask)
        (v.square().sum() + sum(e.sum() for e in expert.values())).backward()
        results.append((v, {n: p.grad for n, p in m.named_parameters()}))
        assert (m._block_inputs(torch.zeros(B, cfg.hidden_size), SimpleNamespace(sol_scale=None)) is None) != fused
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    m.double_blocks[0].img_norm1.linear = torch.nn.Sequential(m.double_blocks[0].img_norm1.linear)
    assert m._block_inputs(torch.zeros(B, cfg.hidden_size), SimpleNamespace(sol_scale=None)) is None


def test_cpu_rms_norm_backward_is_the_closed_form_of_autograds():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    g = torch.randn(2, 5, 16)
    y = norm(x)  # the closed-form backward: eager float32 on the CPU
    y.backward(g)
    grads = x.grad, norm.weight.grad
    x.grad = norm.weight.grad = None
    ref = torch.nn.functional.rms_norm(x, (16,), eps=norm.eps) * norm.weight  # autograd through the decomposition
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], norm.weight.grad)


def test_cpu_norm_and_modulation_in_one_function_match_autograd_of_the_two():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    shift, scale = (torch.randn(2, 1, 16, requires_grad=True) for _ in range(2))
    mod = ModulationOut(shift, scale, gate=torch.ones(2, 1, 16))
    g = torch.randn(2, 5, 16)
    leaves = (x, norm.weight, shift, scale)
    fused = mod.norm_modulate(norm, x)  # the closed-form function: eager float32 on the CPU
    assert type(fused.grad_fn).__name__ == "_CpuRMSNormModulateBackward"
    got = torch.autograd.grad(fused, leaves, g)
    ref = mod.modulate(torch.nn.functional.rms_norm(x, (16,), eps=norm.eps) * norm.weight)  # autograd of the parts
    want = torch.autograd.grad(ref, leaves, g)
    torch.testing.assert_close(fused, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # sampling: the plain path, the same numbers
        torch.testing.assert_close(mod.norm_modulate(norm, x), fused)
    # A second derivative raises instead of coming out wrong.
    first = torch.autograd.grad(mod.norm_modulate(norm, x), x, g, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(first.sum(), x)
    # A module with hooks (DeepSpeed ZeRO-3 gathers a sharded weight in one) is called, hooks and all.
    calls = []
    norm.register_forward_pre_hook(lambda *_: calls.append(1))
    hooked = mod.norm_modulate(norm, x)
    assert calls == [1] and type(hooked.grad_fn).__name__ != "_CpuRMSNormModulateBackward"
    torch.testing.assert_close(hooked, fused)


def test_model_code_never_imports_accelerate():
    code = (
        "import sys, tinyflux.model.model, tinyflux.model.loader;"
        "bad = [m for m in sys.modules if m.startswith(('accelerate', 'tinyflux.trainer'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_compiled_prologue_computes_what_the_eager_one_does_and_a_copy_runs_its_own_weights():
    cfg = tiny_config(num_double_layers=1, num_single_layers=1)
    torch.manual_seed(0)
    m = TinyFluxDeep(cfg)
    perturb(m)
    x, tf = inputs(cfg), teacher(cfg)
    want, want_expert = m(**x, **tf, return_expert_pred=True)
    # dynamo's graph run by the eager backend: what compilation captures, without inductor's C++ build
    m.compile_prologue(backend="eager")
    got, got_expert = m(**x, **tf, return_expert_pred=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_expert, want_expert)
    copy = deepcopy(m)  # an EMA or sampling copy runs eager, its own weights; so does a pickled model
    assert copy._compiled_prologue is None and m._compiled_prologue is not None
    with torch.no_grad():
        copy.img_in.weight.add_(1.0)
    assert not torch.allclose(copy(**x, **tf), want)
    torch.testing.assert_close(m(**x, **tf), want)
    torch.testing.assert_close(pickle.loads(pickle.dumps(m))(**x, **tf), want)
