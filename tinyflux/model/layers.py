"""Building blocks of the released TinyFlux-Deep v4.2 network: adaLN on RMSNorm, joint attention with the Sol prior,
double-stream and single-stream blocks. Module and parameter names are the released state dict's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from tinyflux.model.math import apply_rope, attention, flex_masked_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 sums of squares over 512 dims lose too much), back to x's dtype, then the weight.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight.type_as(x)


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


class AdaRMSNorm(nn.Module):
    """adaLN on RMSNorm: vec gives `sets` (shift, scale, gate) triples; x is normalised and modulated by the first.

    `linear` is zero-initialised by TinyFluxDeep.initialize_weights, so every gated branch starts closed.
    """

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim)
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor, vec: Tensor) -> tuple[Tensor, list[ModulationOut]]:
        out = self.linear(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)  # each (B, 1, D)
        mods = [ModulationOut(*out[i : i + 3]) for i in range(0, 3 * self.sets, 3)]
        return mods[0].modulate(self.norm(x)), mods


@dataclass
class AttentionContext:
    """What every block's attention needs, computed once per forward.

    rope_double / rope_single: (cos, sin) over text then image tokens (B, 1, L + N, Dh / 2). Double blocks rotate
    image tokens only (their text angles are 0, an exact identity); single blocks rotate text by its ids too.
    mask: keys to keep (B, 1, 1, L + N) or None; backend "sdpa" (mask) or "flex" (block_mask, the same keys).
    sol_map: the blended Sol map on the image token grid (B, 1, h, w); sol_scale: the logit scale under the Sol
    temperature, head_dim^-0.5 / T (B,). Both None when the Sol prior is off.
    """

    rope_double: tuple[Tensor, Tensor]
    rope_single: tuple[Tensor, Tensor]
    txt_len: int
    head_scale: float
    mask: Tensor | None = None
    backend: str = "sdpa"
    block_mask: BlockMask | None = None
    sol_map: Tensor | None = None
    sol_scale: Tensor | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, single: bool, spatial_to_mod: nn.Conv2d | None) -> Tensor:
        """q, k, v (B, H, L + N, Dh) of text then image tokens -> (B, L + N, H * Dh).

        With the Sol prior, image queries and keys are scaled per head by exp(clamp(spatial_to_mod(map), -2, 2)),
        and the temperature T divides the logits of image queries (of every query in a single block); text queries
        of a double block keep the plain scale. Each query's logit scale is folded into q, so one attention call
        with scale 1 serves all: (q * s) . k = s (q . k).
        """
        cos, sin = self.rope_single if single else self.rope_double
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = None
        if self.sol_scale is not None:
            b, h = q.shape[:2]
            img_mod = spatial_to_mod(self.sol_map).clamp(-2, 2).exp().flatten(2)[..., None]  # (B, H, N, 1)
            txt_one = img_mod.new_ones(b, h, self.txt_len, 1)  # (B, H, L, 1)
            temp = self.sol_scale.view(b, 1, 1, 1).to(img_mod.dtype)
            txt_q = txt_one * temp if single else txt_one * self.head_scale
            q = q * torch.cat([txt_q, img_mod * temp], dim=2).to(q.dtype)
            k = k * torch.cat([txt_one, img_mod], dim=2).to(k.dtype)
            scale = 1.0
        if self.backend == "flex":
            return flex_masked_attention(q, k, v, self.block_mask, scale=scale)
        return attention(q, k, v, self.mask, scale=scale)


def _heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3 * H * Dh) -> q, k, v each (B, H, L, Dh)."""
    return rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=num_heads).unbind(0)


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
        self, txt: Tensor, img: Tensor, ctx: AttentionContext, shared: TextProjections | None = None
    ) -> tuple[Tensor, Tensor]:
        """txt (B, L, D), img (B, N, D) -> their attention outputs, the same shapes."""
        text = shared if shared is not None else self
        txt_q, txt_k, txt_v = _heads(text.txt_qkv(txt), self.num_heads)  # (B, H, L, Dh)
        img_q, img_k, img_v = _heads(self.img_qkv(img), self.num_heads)  # (B, H, N, Dh)
        out = ctx.attend(
            torch.cat([txt_q, img_q], dim=2),
            torch.cat([txt_k, img_k], dim=2),
            torch.cat([txt_v, img_v], dim=2),
            single=False,
            spatial_to_mod=self.spatial_to_mod,
        )  # (B, L + N, D)
        return text.txt_out(out[:, : ctx.txt_len]), self.img_out(out[:, ctx.txt_len :])


class SelfAttention(nn.Module):
    """Single-stream attention over [text, image]: one qkv and one output projection, no bias, no QK-norm."""

    def __init__(self, dim: int, num_heads: int, use_sol_prior: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.spatial_to_mod = _sol_conv(num_heads, use_sol_prior)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        q, k, v = _heads(self.qkv(x), self.num_heads)  # (B, H, L + N, Dh)
        return self.out_proj(ctx.attend(q, k, v, single=True, spatial_to_mod=self.spatial_to_mod))


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
    ) -> tuple[Tensor, Tensor]:
        img_in, (img_attn, img_ff) = self.img_norm1(img, vec)
        txt_in, (txt_attn, txt_ff) = self.txt_norm1(txt, vec)
        txt_out, img_out = self.attn(txt_in, img_in, ctx, shared)
        img = img + img_attn.gate * img_out
        txt = txt + txt_attn.gate * txt_out
        img = img + img_ff.gate * self.img_mlp(img_ff.modulate(self.img_norm2(img)))
        txt = txt + txt_ff.gate * self.txt_mlp(txt_ff.modulate(self.txt_norm2(txt)))
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

    def forward(self, x: Tensor, vec: Tensor, ctx: AttentionContext) -> Tensor:
        """x: (B, L + N, D) -> (B, L + N, D)."""
        x_in, (mod,) = self.norm(x, vec)
        x = x + mod.gate * self.attn(x_in, ctx)
        return x + self.mlp(self.norm2(x))
