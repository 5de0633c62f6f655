"""The attention backend switch: FlexAttention with a key-padding BlockMask computes what SDPA with the dense mask does."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask

from tinyflux.model import layers
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.math import attention, flex_masked_attention, key_padding_block_mask
from tinyflux.model.model import TinyFluxDeep, pack_latents

# On CPU the model's flex path is eager flex_attention: PyTorch's unfused reference, which says so once.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, W, L = 3, 8, 8, 12
REAL_TOKENS = (2, 12, 5)  # per sample: few real text tokens, all real, some


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let flex_attention's eager reference run backward on CPU.

    The public entry refuses CPU backward outright (no fused CPU backward kernel exists), but the eager path beneath
    it is plain autograd-aware math (sdpa_dense_backward), device-agnostic: lifting the check for the test checks the
    model's wiring of the BlockMask into every block against SDPA's gradients.
    """
    validate = flex_module._validate_device

    def validate_on_cpu_without_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if q.device.type != "cpu":
            validate(q, k, v)

    monkeypatch.setattr(flex_module, "_validate_device", validate_on_cpu_without_grad)


def tiny_model() -> TinyFluxDeep:
    torch.manual_seed(0)
    model = TinyFluxDeep(TinyFluxConfig.preset("tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero init (adaLN-Zero, Sol map), so every block's attention reaches the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_inputs(config: TinyFluxConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(REAL_TOKENS)[:, None]  # (B, L) real text tokens
    return dict(
        hidden_states=pack_latents(torch.randn(B, config.in_channels, H, W, generator=g)),
        encoder_hidden_states=torch.randn(B, L, config.num_t5_layers, config.t5_hidden_size, generator=g),
        pooled_projections=torch.randn(B, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(B, generator=g),
        img_ids=TinyFluxDeep.create_img_ids(B, H, W),
        encoder_attention_mask=mask,
    )


def forward_and_grads(model: TinyFluxDeep, backend: str, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_attention_backend(backend)
    model.zero_grad()
    v, expert = model(**inputs, return_expert_pred=True)
    (v.square().mean() + sum(e.square().mean() for e in expert.values())).backward()
    return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flex_matches_sdpa_output_and_gradients(one_thread, cpu_flex_backward, monkeypatch):
    model = tiny_model()
    inputs = tiny_inputs(model.config)
    v_sdpa, g_sdpa = forward_and_grads(model, "sdpa", inputs)

    block_masks = []

    def recording_flex(q, k, v, block_mask=None, scale=None):
        block_masks.append(block_mask)
        return flex_masked_attention(q, k, v, block_mask, scale=scale)

    monkeypatch.setattr(layers, "flex_masked_attention", recording_flex)
    v_flex, g_flex = forward_and_grads(model, "flex", inputs)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    assert len(block_masks) == blocks and all(m is block_masks[0] for m in block_masks)  # one BlockMask per forward
    assert block_masks[0].seq_lengths == (L + H * W, L + H * W)
    assert v_sdpa.abs().max() > 0.1  # the comparison is of a live output, not of zeros
    torch.testing.assert_close(v_flex, v_sdpa, atol=1e-5, rtol=1e-5)
    assert g_flex.keys() == g_sdpa.keys() and len(g_sdpa) > 50
    for name, grad in g_sdpa.items():
        torch.testing.assert_close(g_flex[name], grad, atol=1e-5, rtol=1e-5, msg=name)

    # Without a text mask flex runs with no BlockMask and still matches SDPA's unmasked call.
    unmasked = {**inputs, "encoder_attention_mask": None}
    v_flex = forward_and_grads(model, "flex", unmasked)[0]
    assert len(block_masks) == 2 * blocks and block_masks[-1] is None
    torch.testing.assert_close(v_flex, forward_and_grads(model, "sdpa", unmasked)[0], atol=1e-5, rtol=1e-5)


def test_flex_output_ignores_padded_text(one_thread):
    model = tiny_model()
    model.set_attention_backend("flex")
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        v = model(**inputs)
        states = inputs["encoder_hidden_states"].clone()
        states[~inputs["encoder_attention_mask"]] = 100 * torch.randn_like(states[~inputs["encoder_attention_mask"]])
        v_other_padding = model(**{**inputs, "encoder_hidden_states": states})
        states[0, 0] += 1.0  # a real token: the check above can fail
        v_other_text = model(**{**inputs, "encoder_hidden_states": states})
    torch.testing.assert_close(v_other_padding, v, atol=1e-5, rtol=1e-5)
    assert (v_other_text[0] - v[0]).abs().max() > 1e-3
    torch.testing.assert_close(v_other_text[1:], v[1:], atol=1e-5, rtol=1e-5)


def test_backend_is_not_config_or_state():
    model = tiny_model()
    config_before, keys_before = model.config.to_dict(), set(model.state_dict())
    model.set_attention_backend("flex")
    assert model.config.to_dict() == config_before and set(model.state_dict()) == keys_before
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*sdpa, flex"):
        model.set_attention_backend("flash")
    assert model.attention_backend == "flex"


@pytest.mark.parametrize("seq, block", [(300, 128), (256, 128), (77, 16), (100, 32)])
def test_key_padding_block_mask_equals_create_block_mask(seq, block):
    # Eager flex_attention reads only mask_mod, so the tile lists (which the fused kernel trusts to skip tiles) are
    # checked here against PyTorch's own builder, at lengths that are and are not multiples of the tile.
    g = torch.Generator().manual_seed(seq)
    keep = torch.rand(4, seq, generator=g) > 0.3
    keep[1] = True
    keep[2] = False
    keep[2, -3:] = True  # whole tiles of padding: skipped
    keep[3, : seq // 2] = False
    ours = key_padding_block_mask(keep, block)
    ref = create_block_mask(lambda b, h, q, kv: keep[b, kv], 4, None, seq, seq, device="cpu", BLOCK_SIZE=block)
    assert ours.seq_lengths == ref.seq_lengths and ours.BLOCK_SIZE == ref.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert int(ours.kv_num_blocks[2].sum() + ours.full_kv_num_blocks[2].sum()) < ours.kv_indices.shape[-1] ** 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused FlexAttention kernel needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_fused_flex_matches_sdpa_on_cuda(dtype, tol):
    # The compiled kernel trusts the tile lists: a length that is not a multiple of 128, padding that fills a tile.
    b, h, s, d = 3, 4, 300, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    keep[0, 3:200] = False
    keep[2, 2:256] = False  # key tile 1 skipped
    out = flex_masked_attention(q, k, v, key_padding_block_mask(keep))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = attention(q, k, v, keep[:, None, None])
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=tol * 10, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused FlexAttention kernel needs a CUDA device")
@pytest.mark.parametrize("compiled_blocks", [False, True], ids=["eager model", "compiled blocks"])
def test_model_flex_matches_sdpa_on_cuda(compiled_blocks):
    # Eager model: each block calls torch.compile(flex_attention). Compiled blocks (the Trainer's compile_mode): the
    # compiler lowers flex inside each block's graph, where q/k/v are views of the fused qkv and RoPE buffers.
    model = tiny_model().cuda()
    inputs = {k: v.cuda() for k, v in tiny_inputs(model.config).items()}
    v_sdpa, g_sdpa = forward_and_grads(model, "sdpa", inputs)
    if compiled_blocks:
        for block in [*model.double_blocks, *model.single_blocks]:
            block.compile()
    v_flex, g_flex = forward_and_grads(model, "flex", inputs)
    torch.testing.assert_close(v_flex, v_sdpa, atol=1e-4, rtol=1e-4)
    for name, grad in g_sdpa.items():
        torch.testing.assert_close(g_flex[name], grad, atol=1e-4, rtol=1e-4, msg=name)
