"""Building blocks of the student: modulation, double-stream and single-stream transformer blocks."""

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
        # Normalise in float32: bf16 sums of squares over 128 dims lose too much precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class MLPEmbedder(nn.Module):
    """in_dim -> hidden -> hidden with SiLU, for the timestep and pooled-text vectors."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def feed_forward(dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, D)
    scale: Tensor  # (B, 1, D)
    gate: Tensor  # (B, 1, D)

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN-Zero: the conditioning vector gives shift/scale/gate for one (single) or two (double) sub-layers.

    `lin` is zero-initialised by TinyFluxDeep.initialize_weights, so every block starts as the identity.
    """

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, D)
        return [ModulationOut(*out[i : i + 3]) for i in range(0, self.multiplier, 3)]


@dataclass
class AttentionContext:
    """What every block's attention needs, computed once per forward.

    cos/sin: RoPE over text then image tokens (B, 1, L + N, Dh / 2). mask: keys to keep (B, 1, 1, L + N) or None.
    q_scale/k_scale: Sol prior's per-head token scales (B, H, L + N, 1) with the temperature folded into q_scale,
    or None when the prior is disabled. backend: "sdpa" (mask) or "flex" (block_mask: the same keys as a BlockMask,
    or None for no mask).
    """

    cos: Tensor
    sin: Tensor
    mask: Tensor | None = None
    q_scale: Tensor | None = None
    k_scale: Tensor | None = None
    backend: str = "sdpa"
    block_mask: BlockMask | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (B, H, L + N, Dh) -> (B, L + N, H * Dh)."""
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        if self.q_scale is not None:
            q, k = q * self.q_scale.to(q.dtype), k * self.k_scale.to(k.dtype)
        if self.backend == "flex":
            return flex_masked_attention(q, k, v, self.block_mask)
        return attention(q, k, v, self.mask)


class QKVProjection(nn.Module):
    """Fused qkv projection with per-head RMS QK-norm, and the output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, H, L, Dh), q and k normalised."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        return self.q_norm(q), self.k_norm(k), v


class DoubleStreamBlock(nn.Module):
    """MMDiT block: text and image keep their own weights and attend jointly over the concatenated sequence.

    With shared text attention (config.use_cross_attention_sharing) the block owns no text qkv/proj and is handed the
    model's shared one at call time, so the state dict holds it once.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, own_txt_attn: bool = True):
        super().__init__()
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_attn = QKVProjection(dim, num_heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_mlp = feed_forward(dim, mlp_hidden_dim)

        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_attn = QKVProjection(dim, num_heads) if own_txt_attn else None
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = feed_forward(dim, mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,  # (B, N, D)
        txt: Tensor,  # (B, L, D)
        vec: Tensor,  # (B, D)
        ctx: AttentionContext,
        shared_txt_attn: QKVProjection | None = None,
    ) -> tuple[Tensor, Tensor]:
        txt_attn = self.txt_attn if self.txt_attn is not None else shared_txt_attn
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.heads(img_mod1.modulate(self.img_norm1(img)))  # (B, H, N, Dh)
        txt_q, txt_k, txt_v = txt_attn.heads(txt_mod1.modulate(self.txt_norm1(txt)))  # (B, H, L, Dh)
        out = ctx.attend(
            torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2), torch.cat([txt_v, img_v], dim=2)
        )  # (B, L + N, D)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_out)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * txt_attn.proj(txt_out)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence, one fused input and one fused output projection (Flux)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.mlp_hidden_dim = mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + mlp_hidden_dim, dim)
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, ctx: AttentionContext) -> Tensor:
        """x: (B, L + N, D) -> (B, L + N, D)."""
        (mod,) = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.modulate(self.pre_norm(x))), [3 * self.dim, self.mlp_hidden_dim], -1)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        attn = ctx.attend(self.q_norm(q), self.k_norm(k), v)  # (B, L + N, D)
        return x + mod.gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the packed latent channels; zero-initialised."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(F.silu(vec))[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear((1 + scale) * self.norm_final(x) + shift)
