"""Building blocks of the released TinyFlux-Deep v4.2 network: adaLN on RMSNorm, joint attention with the Sol prior,
double-stream and single-stream blocks. Module and parameter names are the released state dict's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.modules import module as module_state

from tinyflux.model.math import RopeAngles, attention, flex_masked_attention, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _closed_form_backward(x, self.weight):
            return _CpuRMSNorm.apply(x, self.weight, self.eps)
        # Normalise in float32 (bf16 sums of squares over 512 dims lose too much), back to x's dtype, then the weight.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight.type_as(x)


def _closed_form_backward(x: Tensor, weight: Tensor) -> bool:
    """Eager float32 training on the CPU, where torch has no fused RMSNorm backward: autograd would run the backward of
    its decomposition (pow, mean, add, rsqrt, mul and the weight's mul: 14 ops per norm). CUDA has the fused kernel
    and compiled blocks fuse the decomposition themselves."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.is_grad_enabled()
        and hasattr(torch.ops.aten, "_fused_rms_norm")
        and not torch.compiler.is_compiling()
    )


class _CpuRMSNorm(torch.autograd.Function):
    """RMSNorm's forward as F.rms_norm computes it (the same numbers), and its closed-form backward in 9 ops.

    y = x_hat * w with x_hat = x * r, r = (mean(x^2) + eps)^-1/2: dL/dx = r * (g_hat - x_hat * mean(g_hat * x_hat))
    with g_hat = g * w, and dL/dw = sum over tokens of g * x_hat.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x_hat, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)  # F.rms_norm's own kernel on CPU
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    @once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_hat, rstd, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _rms_grad(grad * weight, x_hat, rstd)
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x_hat).flatten(0, -2).sum(0)
        return grad_x, grad_w, None


def _rms_grad(g_hat: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """dL/dx of x_hat = x * rstd given g_hat = dL/dx_hat: rstd * (g_hat - x_hat * mean(g_hat * x_hat)), in 4 ops."""
    return torch.addcmul(g_hat, x_hat, (g_hat * x_hat).mean(-1, keepdim=True), value=-1) * rstd


class _CpuRMSNormModulate(torch.autograd.Function):
    """modulate(RMSNorm(x)) = x_hat * m + shift with m = weight * (1 + scale) (B, 1, D) formed outside (autograd takes
    it back to the weight and the scale): 2 passes over x forward and 8 backward, where the norm and the modulation
    apart make 4 and 12. The same numbers to float rounding (the weight and 1 + scale are multiplied first)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: Tensor, shift: Tensor, eps: float) -> Tensor:
        x_hat, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        ctx.save_for_backward(x_hat, rstd, m)
        ctx.shift_shape = shift.shape
        return torch.addcmul(shift, x_hat, m)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x_hat, rstd, m = ctx.saved_tensors
        grad_x = grad_m = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_x = _rms_grad(grad * m, x_hat, rstd)
        if ctx.needs_input_grad[1]:
            grad_m = (grad * x_hat).sum_to_size(m.shape)
        if ctx.needs_input_grad[2]:
            grad_shift = grad.sum_to_size(ctx.shift_shape)
        return grad_x, grad_m, grad_shift, None


class MLP(nn.Module):
    """fc1 -> GELU (tanh) -> fc2, with biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, D)
    scale: Tensor  # (B, 1, D)
    gate: Tensor  # (B, 1, D)

    def modulate(self, x: Tensor) -> Tensor:
        return x * (1 + self.scale) + self.shift

    def norm_modulate(self, norm: RMSNorm, x: Tensor) -> Tensor:
        """modulate(norm(x)); one closed-form autograd function where RMSNorm takes its closed-form backward and
        its module has no hooks (the function reads the weight without calling the module: an engine that gathers
        a sharded weight in a pre-forward hook, DeepSpeed ZeRO-3, gets the module's own call)."""
        if (
            _closed_form_backward(x, norm.weight)
            and self.scale.dtype == self.shift.dtype == torch.float32
            and not _has_hooks(norm)
        ):
            return _CpuRMSNormModulate.apply(x, norm.weight * (1 + self.scale), self.shift, norm.eps)
        return self.modulate(norm(x))


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling the module would run hooks of its own or global module hooks."""
    own = module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
    return bool(own or module_state._global_forward_pre_hooks or module_state._global_forward_hooks)


class AdaRMSNorm(nn.Module):
    """adaLN on RMSNorm: vec gives `sets` (shift, scale, gate) triples; x is normalised and modulated by the first.

    `linear` is zero-initialised by TinyFluxDeep.initialize_weights, so every gated branch starts closed.
    """

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim)
        self.norm = RMSNorm(dim)

    def forward(
        self, x: Tensor, vec: Tensor, mod: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, list[ModulationOut]]:
        """x (B, N, D), vec (B, D); mod: the 3 * sets chunks (B, 1, D) of linear(silu(vec)) when computed already
        (BlockInputs)."""
        out = self.linear(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1) if mod is None else mod  # (B, 1, D)
        mods = [ModulationOut(*out[i : i + 3]) for i in range(0, 3 * self.sets, 3)]
        return mods[0].norm_modulate(self.norm, x), mods


@dataclass
class AttentionContext:
    """What every block's attention needs, computed once per forward.

    rope_double / rope_single: math.rope_angles over text then image tokens (B, 1, L + N, Dh / 2). Double blocks
    rotate image tokens only (their text angles are 0, an exact identity); single blocks rotate text by its ids too.
    mask: keys to keep (B, 1, 1, L + N) or None; backend "sdpa" (mask) or "flex" (block_mask, the same keys).
    sol_map: the blended Sol map on the image token grid (B, 1, h, w); sol_scale: the logit scale under the Sol
    temperature, head_dim^-0.5 / T (B,). Both None when the Sol prior is off.
    """

    rope_double: RopeAngles
    rope_single: RopeAngles
    txt_len: int
    head_scale: float
    mask: Tensor | None = None
    backend: str = "sdpa"
    block_mask: BlockMask | None = None
    sol_map: Tensor | None = None
    sol_scale: Tensor | None = None

    def attend(
        self, qkv: Tensor, single: bool, spatial_to_mod: nn.Conv2d | None, qk_scale: Tensor | None = None
    ) -> Tensor:
        """qkv (3, B, H, L + N, Dh) of text then image tokens -> (B, L + N, H * Dh).

        With the Sol prior, image queries and keys are scaled per head by exp(clamp(spatial_to_mod(map), -2, 2)),
        and the temperature T divides the logits of image queries (of every query in a single block); text queries
        of a double block keep the plain scale. Each query's logit scale is folded into q, so one attention call
        with scale 1 serves all: (q * s) . k = s (q . k). qk_scale (2, B, H, L + N, 1): those q and k scales when
        computed already for every block at once (TinyFluxDeep.set_fused_conditioning), else from spatial_to_mod.
        """
        qk = rotate(qkv[:2], self.rope_single if single else self.rope_double)  # (2, B, H, L + N, Dh): q, k in one call
        scale = None
        if self.sol_scale is not None:
            if qk_scale is None:
                img_mod = spatial_to_mod(self.sol_map).clamp(-2, 2).exp().flatten(2)  # (B, H, N)
                counts = (0, 1) if single else (1, 0)
                qk_scale = sol_qk_scales(img_mod[:, None], counts, self.sol_scale, self.head_scale, self.txt_len)[
                    :, :, 0
                ]
            qk = qk * qk_scale.to(qk.dtype)
            scale = 1.0
        q, k = qk.unbind(0)
        if self.backend == "flex":
            return flex_masked_attention(q, k, qkv[2], self.block_mask, scale=scale)
        return attention(q, k, qkv[2], self.mask, scale=scale)


def sol_qk_scales(
    img_mod: Tensor, counts: tuple[int, int], sol_scale: Tensor, head_scale: float, txt_len: int
) -> Tensor:
    """The Sol prior's q and k scales of blocks laid side by side: (2, B, n, H, L + N, 1), n = double + single.

    img_mod (B, n, H, N): exp(clamp(spatial_to_mod(map), -2, 2)) of each block, its `counts` = (double, single) blocks
    in that order. k: 1 on text, img_mod on image tokens. q: the temperature-scaled img_mod on image tokens; on text
    head_dim^-0.5 in a double block, sol_scale (B,) in a single one (each value as 1 * that scale gives it, exactly).
    """
    b, n, h, _ = img_mod.shape
    temp = sol_scale.view(b, 1, 1, 1).to(img_mod.dtype)
    double, single = counts
    txt_q = torch.cat(
        [img_mod.new_full((b, double, h, txt_len), head_scale), temp.expand(b, single, h, txt_len)], dim=1
    )  # (B, n, H, L)
    q = torch.cat([txt_q, img_mod * temp], dim=-1)  # (B, n, H, L + N)
    k = torch.cat([img_mod.new_ones(b, n, h, txt_len), img_mod], dim=-1)  # (B, n, H, L + N)
    return torch.stack([q, k])[..., None]  # (2, B, n, H, L + N, 1)


class BlockInputs(NamedTuple):
    """What TinyFluxDeep.forward computes ahead for one block, in one call for all blocks (set_fused_conditioning).
    A NamedTuple: checkpoint, compile and DeepSpeed see through tuples."""

    mods: tuple[tuple[Tensor, ...], ...]  # per AdaRMSNorm (img, txt / the one): linear(silu(vec))'s chunks (B, 1, D)
    qk_scale: Tensor | None  # (2, B, H, L + N, 1) the Sol q / k scales (sol_qk_scales); None without the Sol prior


def _heads(qkv: Tensor, num_heads: int) -> Tensor:
    """(B, L, 3 * H * Dh) -> q, k, v stacked (3, B, H, L, Dh) (a view)."""
    return rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=num_heads)


class TextProjections(nn.Module):
    """The text stream's qkv and output projections of a double block (shared by all of them when
    config.use_cross_attention_sharing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.txt_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.txt_out = nn.Linear(dim, dim, bias=False)


def _sol_conv(num_heads: int, use_sol_prior: bool) -> nn.Conv2d | None:
    # Per block: the Sol map (1 channel) -> one log-scale per head; zero-initialised, so exp(0) = 1 at the start.
    return nn.Conv2d(1, num_heads, kernel_size=1) if use_sol_prior else None


class JointAttention(nn.Module):
    """Double-stream attention: text and image keep their projections (no bias, no QK-norm) and attend jointly."""

    def __init__(self, dim: int, num_heads: int, use_sol_prior: bool, own_text: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.img_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.img_out = nn.Linear(dim, dim, bias=False)
        if own_text:
            self.txt_qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.txt_out = nn.Linear(dim, dim, bias=False)
        self.spatial_to_mod = _sol_conv(num_heads, use_sol_prior)

    def forward(
        self,
        txt: Tensor,
        img: Tensor,
        ctx: AttentionContext,
        shared: TextProjections | None = None,
        qk_scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """txt (B, L, D), img (B, N, D) -> their attention outputs, the same shapes. qk_scale: see ctx.attend."""
        text = shared if shared is not None else self
        qkv = torch.cat([text.txt_qkv(txt), self.img_qkv(img)], dim=1)  # (B, L + N, 3D): one cat for q, k and v
        out = ctx.attend(_heads(qkv, self.num_heads), False, self.spatial_to_mod, qk_scale)  # (B, L + N, D)
        return text.txt_out(out[:, : ctx.txt_len]), self.img_out(out[:, ctx.txt_len :])


class SelfAttention(nn.Module):
    """Single-stream attention over [text, image]: one qkv and one output projection, no bias, no QK-norm."""

    def __init__(self, dim: int, num_heads: int, use_sol_prior: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.spatial_to_mod = _sol_conv(num_heads, use_sol_prior)

    def forward(self, x: Tensor, ctx: AttentionContext, qk_scale: Tensor | None = None) -> Tensor:
        qkv = _heads(self.qkv(x), self.num_heads)  # (3, B, H, L + N, Dh)
        return self.out_proj(ctx.attend(qkv, True, self.spatial_to_mod, qk_scale))


class DoubleStreamBlock(nn.Module):
    """MMDiT block: text and image keep their own weights and attend jointly; gated attention and MLP residuals.

    The MLP input is a second RMSNorm (own weight) modulated by the second (shift, scale) set of adaLN.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, use_sol_prior: bool, own_text: bool = True):
        super().__init__()
        self.img_norm1 = AdaRMSNorm(dim, sets=2)
        self.txt_norm1 = AdaRMSNorm(dim, sets=2)
        self.attn = JointAttention(dim, num_heads, use_sol_prior, own_text)
        self.img_norm2 = RMSNorm(dim)
        self.txt_norm2 = RMSNorm(dim)
        self.img_mlp = MLP(dim, mlp_hidden_dim)
        self.txt_mlp = MLP(dim, mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,  # (B, N, D)
        txt: Tensor,  # (B, L, D)
        vec: Tensor,  # (B, D)
        ctx: AttentionContext,
        shared: TextProjections | None = None,
        pre: BlockInputs | None = None,
    ) -> tuple[Tensor, Tensor]:
        mods, qk_scale = pre if pre is not None else ((None, None), None)
        img_in, (img_attn, img_ff) = self.img_norm1(img, vec, mods[0])
        txt_in, (txt_attn, txt_ff) = self.txt_norm1(txt, vec, mods[1])
        txt_out, img_out = self.attn(txt_in, img_in, ctx, shared, qk_scale)
        img = img + img_attn.gate * img_out
        txt = txt + txt_attn.gate * txt_out
        img = img + img_ff.gate * self.img_mlp(img_ff.norm_modulate(self.img_norm2, img))
        txt = txt + txt_ff.gate * self.txt_mlp(txt_ff.norm_modulate(self.txt_norm2, txt))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Sequential attention then MLP over the joint sequence: a gated attention residual, an UNGATED MLP residual
    x + MLP(RMSNorm(x)) (as released)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, use_sol_prior: bool):
        super().__init__()
        self.norm = AdaRMSNorm(dim, sets=1)
        self.attn = SelfAttention(dim, num_heads, use_sol_prior)
        self.mlp = MLP(dim, mlp_hidden_dim)
        self.norm2 = RMSNorm(dim)

    def forward(self, x: Tensor, vec: Tensor, ctx: AttentionContext, pre: BlockInputs | None = None) -> Tensor:
        """x: (B, L + N, D) -> (B, L + N, D). pre: this block's share of what the model computed for all blocks."""
        mods, qk_scale = pre if pre is not None else ((None,), None)
        x_in, (mod,) = self.norm(x, vec, mods[0])
        x = x + mod.gate * self.attn(x_in, ctx, qk_scale)
        return x + self.mlp(self.norm2(x))
