"""Pure tensor math of the student: timestep embedding, 3-axis RoPE, attention. Testable against closed forms."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# FlexAttention's tile: the BlockMask marks each (query tile, key tile) pair as skipped, masked or full.
FLEX_BLOCK_SIZE = 128


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] itself (not t * 1000), as the released v4.2 network computes it.

    half = dim / 2 frequencies exp(-ln(max_period) * i / (half - 1)), i = 0 .. half - 1 (the first is 1, the last
    1 / max_period); features [sin, cos]. (B,) -> (B, dim), float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)


def rope_frequencies(dim: int, theta: float) -> Tensor:
    """The dim / 2 rotation frequencies of one RoPE axis: theta^(-2i / dim), float32."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope(ids: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """Rotary angles for positions ids (B, N, n_axes): each axis a gets axes_dims[a] / 2 frequencies.

    Returns cos, sin of shape (B, 1, N, head_dim / 2), broadcastable over heads. Angles are float32 products of
    the position and rope_frequencies, as the released network formed them.
    """
    angles = [
        ids[..., axis].float()[..., None] * rope_frequencies(dim, theta).to(ids.device)  # (B, N, dim/2)
        for axis, dim in enumerate(axes_dims)
    ]
    angle = torch.cat(angles, dim=-1).unsqueeze(1)  # (B, 1, N, head_dim/2)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, H, N, D) by the angles behind cos/sin (B, 1, N, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, H, N, D/2, 2)
    return out.flatten(-2).type_as(x)


def rope_pairs(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rope()'s (cos, sin) (B, 1, N, D/2) as the per-channel factors (c, s) (B, 1, N, D) of apply_rope_pairs: c holds
    each angle's cosine twice, s its sine as (-sin, sin)."""
    c = torch.stack([cos, cos], dim=-1).flatten(-2)  # (B, 1, N, D)
    s = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (B, 1, N, D)
    return c, s


def apply_rope_pairs(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """apply_rope in 4 elementwise ops instead of 7: x * c + swap(x) * s, swap exchanging each pair (x[2i], x[2i+1]).

    Equal to apply_rope bit for bit: each output is the sum of the same two rounded products, x0 cos + x1 (-sin) =
    x0 cos - x1 sin (negation is exact) and x1 cos + x0 sin (a sum does not depend on its order). x (..., N, D) with
    any leading dims that broadcast against c, s (B, 1, N, D): q and k rotate in one call.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., N, D): (x1, x0) per pair
    return (xf * c + swapped * s).type_as(x)


# Devices with complex64 kernels for apply_rope_complex; elsewhere (MPS, XLA) rotate takes a real form.
COMPLEX_ROPE_DEVICES = ("cpu", "cuda")


class RopeAngles(NamedTuple):
    """rope()'s angles in the forms rotate() reads; computed once per forward for every block."""

    cos: Tensor  # (B, 1, N, D/2)
    sin: Tensor  # (B, 1, N, D/2)
    factor: Tensor | None  # cos + i sin (complex64) for apply_rope_complex; None where rotate takes the real form


def rope_angles(cos: Tensor, sin: Tensor) -> RopeAngles:
    """rope()'s (cos, sin) with their complex factor where the device has complex kernels (not in a compiled region:
    dynamo breaks the graph at complex tensors)."""
    complex_ok = cos.device.type in COMPLEX_ROPE_DEVICES and not torch.compiler.is_compiling()
    factor = rope_factors(cos, sin) if complex_ok else None
    return RopeAngles(cos, sin, factor)


def rope_factors(cos: Tensor, sin: Tensor) -> Tensor:
    """rope()'s (cos, sin) (B, 1, N, D/2) as the unit complex numbers cos + i sin (complex64) of apply_rope_complex."""
    return torch.complex(cos.float(), sin.float())


def apply_rope_complex(x: Tensor, f: Tensor) -> Tensor:
    """apply_rope as one complex product: each pair (x[2i], x[2i+1]) read as x0 + i x1 and multiplied by f = cos + i sin
    (rope_factors, (B, 1, N, D/2)). x (..., N, D) with leading dims that broadcast against f: q and k in one call.

    One multiply forward and one backward instead of the 4 + 4 of apply_rope_pairs, and no flip (a strided copy
    that does not vectorise on the CPU): 4-7x faster on the CPU (bench/NOTES.md, 2026-12-06). The product's parts are
    x0 cos - x1 sin and x0 sin + x1 cos from the same rounded products as apply_rope; torch's vectorised CPU kernel
    forms them without a fused multiply-add, so where it covers the whole row (head dims that are multiples of 16,
    as every preset's) it equals apply_rope bit for bit (tested); the scalar code for the rest of a row, and a GPU
    kernel, may fuse one and differ in the last bit.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, D/2, 2)
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs each pair aligned to 8 bytes
    xc = torch.view_as_complex(pairs)  # (..., N, D/2): a view of x when float32
    return torch.view_as_real(xc * f).flatten(-2).type_as(x)


def rotate(x: Tensor, rope: RopeAngles) -> Tensor:
    """x (..., N, D) rotated by rope's angles: one complex product in eager mode where the device has the kernels.
    Inside a compiled region (dynamo breaks the graph at complex tensors) and on other devices a real form: on the
    CPU apply_rope's unbind / stack, whose inductor C++ kernels vectorise (a flip does not: the blocks' fused kernels
    15-20% less time at `small`, at the price of one more kernel per block, bench/NOTES.md, 2026-12-06); elsewhere
    apply_rope_pairs, which inductor fuses into one kernel fewer per block."""
    if not torch.compiler.is_compiling() and rope.factor is not None:
        return apply_rope_complex(x, rope.factor)
    if x.device.type == "cpu":
        return apply_rope(x, rope.cos, rope.sin)
    return apply_rope_pairs(x, *rope_pairs(rope.cos, rope.sin))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention over heads. q, k, v: (B, H, N, D); mask: bool (B, 1, 1, N) keys to keep;
    scale: the logits' factor (None: D^-0.5). Returns (B, N, H * D).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, N, D)
    return out.transpose(1, 2).flatten(2)  # (B, N, H*D)


def key_padding_block_mask(keep: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """BlockMask for a key-padding mask keep (B, S) bool (keys to keep), the same for every query and head.

    Equal to create_block_mask(lambda b, h, q, kv: keep[b, kv], B, None, S, S) but built from O(B * S) block counts
    instead of its (B, 1, S, S) dense mask. As there, a tile is full (no mask_mod call) when all its keys are kept and
    its query and key ranges lie inside S, masked when some keys are kept, and skipped when none are: a run of padded
    text tokens that fills a tile costs nothing.
    """
    b, s = keep.shape
    n = -(-s // block_size)  # tiles per side; the last one may stop short of block_size
    kept = F.pad(keep, (0, n * block_size - s)).view(b, n, block_size).sum(-1)  # (B, n) kept keys per key tile
    # A key tile that runs past S has fewer than block_size kept keys; a query tile that does must not be full either.
    whole_q = torch.arange(n, device=keep.device) < s // block_size  # (n_q,)
    full = (kept == block_size)[:, None, :] & whole_q[None, :, None]  # (B, n_q, n_kv)
    partial = (kept > 0)[:, None, :] & ~full  # (B, n_q, n_kv)

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        # BlockMask's layout: per query tile the count of listed key tiles, and their indices listed first.
        dense = dense[:, None].to(torch.int32)  # (B, 1, n_q, n_kv): one head row broadcast over all heads
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), order.to(torch.int32)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep[b, kv_idx]

    num, idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, block_size, mask_mod, seq_lengths=(s, s))


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    return torch.compile(flex_attention)


@functools.cache
def _eager_flex_attention() -> Callable[..., Tensor]:
    # PyTorch 2.13's CPU flex kernel (inductor's C++ template) misreads q/k/v that are views of a larger buffer, as the
    # blocks' rearranged qkv and RoPE outputs are: wrong numbers or a lowering error. On CPU the call stays eager, also
    # inside compiled blocks. Built on first use: torch.compiler.disable imports dynamo (~1.4 s).
    return torch.compiler.disable(flex_attention)


def flex_masked_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None = None, scale: float | None = None
) -> Tensor:
    """attention() through FlexAttention with a BlockMask (key_padding_block_mask) in place of the dense mask.

    q, k, v: (B, H, N, D). Returns (B, N, H * D). On an accelerator the call is fused: an eager caller gets
    torch.compile(flex_attention) (eager flex_attention is an unfused reference that materialises the (B, H, N, N)
    scores; the FlexAttention docs prescribe compiling it), and inside a torch.compile region (the Trainer's compiled
    blocks) the compiler lowers the plain call itself. On CPU it is always the eager reference, which has no backward
    (PyTorch refuses it): CPU flex serves inference and tests only.
    """
    if q.device.type == "cpu":
        attend = _eager_flex_attention()
    elif torch.compiler.is_compiling():
        attend = flex_attention
    else:
        attend = _compiled_flex_attention()
    out = attend(q, k, v, block_mask=block_mask, scale=scale)  # (B, H, N, D)
    return out.transpose(1, 2).flatten(2)  # (B, N, H*D)
