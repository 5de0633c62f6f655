"""TinyFluxDeep: a compact Flux-style MMDiT that maps (x_t, t, text) to the rectified-flow velocity.

Pure torch: no accelerate, no torch.distributed, no device calls. Distribution, compile and checkpointing wrap it from
the outside (tinyflux/trainer/).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tinyflux.model.config import PRESETS, ConfigError, TinyFluxConfig
from tinyflux.model.experts import TIME_FREQ_DIM, LunePredictor, SolPrior
from tinyflux.model.layers import (
    AttentionContext,
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    QKVProjection,
    SingleStreamBlock,
)
from tinyflux.model.math import ATTENTION_BACKENDS, key_padding_block_mask, rope, timestep_embedding

__all__ = ["PRESETS", "ConfigError", "TinyFluxConfig", "TinyFluxDeep", "pack_latents", "unpack_latents"]


def pack_latents(latents: Tensor, patch_size: int = 1) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C * p * p) tokens, row-major over the token grid."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack_latents(tokens: Tensor, height: int, width: int, patch_size: int = 1) -> Tensor:
    """Inverse of pack_latents; height and width in latent pixels."""
    h, w = height // patch_size, width // patch_size
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=patch_size, pw=patch_size)


class TinyFluxDeep(nn.Module):
    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        self.config = config
        c = config
        d = c.hidden_size
        self.img_in = nn.Linear(c.token_channels, d)
        self.t5_mix = nn.Parameter(torch.zeros(c.num_t5_layers))  # softmax -> uniform mix of the listed layers
        self.txt_in = nn.Linear(c.t5_hidden_size, d)
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, d)
        self.vector_in = MLPEmbedder(c.pooled_projection_dim, d)
        self.t5_pool_in = MLPEmbedder(c.t5_hidden_size, d)
        self.lune = LunePredictor(c) if c.use_lune_expert else None
        self.sol = SolPrior(c) if c.use_sol_prior else None

        share = c.use_cross_attention_sharing and c.num_double_layers > 0
        self.shared_txt_attn = QKVProjection(d, c.num_attention_heads) if share else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, c.num_attention_heads, c.mlp_hidden_dim, own_txt_attn=not share)
            for _ in range(c.num_double_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, c.num_attention_heads, c.mlp_hidden_dim) for _ in range(c.num_single_layers)
        )
        self.final_layer = LastLayer(d, c.token_channels)
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"
        self.initialize_weights()
        if c.freeze_lune and self.lune is not None:
            self.lune.requires_grad_(False)
        if c.freeze_sol and self.sol is not None:
            self.sol.requires_grad_(False)

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias, then zeros where a block must start as the identity (adaLN-Zero).

        Zeroed: every Modulation (so each residual branch is gated off and each block is the identity at step 0), the
        final layer (so v_pred starts at 0 instead of a random field) and the Sol map's 1x1 conv (so the q/k scales
        start at exactly 1). The timestep / pooled embedders use N(0, 0.02) as in DiT.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.time_in, self.vector_in, self.t5_pool_in):
            nn.init.normal_(emb.in_layer.weight, std=0.02)
            nn.init.normal_(emb.out_layer.weight, std=0.02)
        for block in self.double_blocks:
            for mod in (block.img_mod, block.txt_mod):
                nn.init.zeros_(mod.lin.weight)
                nn.init.zeros_(mod.lin.bias)
        for block in self.single_blocks:
            nn.init.zeros_(block.modulation.lin.weight)
            nn.init.zeros_(block.modulation.lin.bias)
        for layer in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.sol is not None:
            nn.init.zeros_(self.sol.to_heads.weight)
            nn.init.zeros_(self.sol.to_heads.bias)

    @staticmethod
    def create_img_ids(batch_size: int, h: int, w: int, device: Any = None) -> Tensor:
        """Position ids (0, y, x) for an h x w token grid, row-major: (B, h * w, 3), float32."""
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        return ids.flatten(0, 1).expand(batch_size, -1, -1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward: same outputs and gradients, less memory."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def set_attention_backend(self, name: str) -> None:
        """The kernel every block's joint attention runs: "sdpa" (default) or "flex" (FlexAttention).

        A runtime choice like gradient checkpointing, not architecture: it changes no parameter, no state-dict entry
        and not the config. Both compute the same attention. SDPA needs the text key mask as a dense (B, 1, 1, L + N)
        tensor, which keeps it off the flash kernel; "flex" turns the mask into one BlockMask per forward, whose
        kernel skips key tiles that hold only padding (fused on an accelerator, see math.flex_masked_attention).
        """
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.attention_backend = name

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: all but the Lune predictor / Sol prior when freeze_lune / freeze_sol."""
        return [p for p in self.parameters() if p.requires_grad]

    def _mix_t5(self, states: Tensor) -> Tensor:
        """(B, L, K, D) -> (B, L, D) by learned softmax weights over the K listed T5 layers; (B, L, D) passes."""
        if states.dim() == 3:
            return states
        k = self.config.num_t5_layers
        if states.shape[2] != k:
            raise ValueError(
                f"encoder_hidden_states has {states.shape[2]} T5 layers (shape {tuple(states.shape)}) but the model "
                f"config lists t5_layers={self.config.t5_layers} ({k}); rebuild the cache with these layers or pass "
                f"a model config whose t5_layers match the cache"
            )
        return torch.einsum("blkd,k->bld", states, self.t5_mix.softmax(0).to(states.dtype))

    def _check_inputs(self, hidden_states: Tensor, txt: Tensor, pooled: Tensor, timestep: Tensor) -> None:
        c = self.config
        b = hidden_states.shape[0]
        problems = []
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != c.token_channels:
            problems.append(
                f"hidden_states {tuple(hidden_states.shape)}: expected (B, N, {c.token_channels}) = packed latents "
                f"with in_channels={c.in_channels}, patch_size={c.patch_size} (use pack_latents)"
            )
        if txt.shape[-1] != c.t5_hidden_size or txt.dim() not in (3, 4) or txt.shape[0] != b:
            problems.append(
                f"encoder_hidden_states {tuple(txt.shape)}: expected (B, L, {c.t5_hidden_size}) or "
                f"(B, L, {c.num_t5_layers}, {c.t5_hidden_size})"
            )
        if pooled.shape != (b, c.pooled_projection_dim):
            problems.append(f"pooled_projections {tuple(pooled.shape)}: expected ({b}, {c.pooled_projection_dim})")
        if timestep.shape != (b,):
            problems.append(f"timestep {tuple(timestep.shape)}: expected ({b},) values in [0, 1]")
        if problems:
            raise ValueError("TinyFluxDeep.forward got inputs that do not fit its config:\n  " + "\n  ".join(problems))

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        lune_features: Tensor | None = None,
        sol_stats: Tensor | None = None,
        sol_spatial: Tensor | None = None,
        return_expert_pred: bool = False,
        encoder_attention_mask: Tensor | None = None,
        lune_mask: Tensor | None = None,
        sol_mask: Tensor | None = None,
        img_shape: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Velocity v = data - noise for x_t (t = 1 is data).

        hidden_states (B, N, C*p*p) packed x_t; encoder_hidden_states (B, L, D) or (B, L, K, D) T5 states;
        pooled_projections (B, P) CLIP pooled; timestep (B,) in [0, 1]; img_ids (B, N, 3).
        lune_features (B, lune_dim), sol_stats (B, 4), sol_spatial (B, S, S): teacher features that replace the
        experts' predictions in the conditioning (teacher forcing); lune_mask / sol_mask (B,) bool restrict that to
        the samples marked True (teacher dropout). encoder_attention_mask (B, L) bool marks real text tokens.
        img_shape: the (h, w) token grid; square when omitted.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        b, n, _ = hidden_states.shape
        dtype = hidden_states.dtype

        txt_states = self._mix_t5(encoder_hidden_states)  # (B, L, T5)
        if encoder_attention_mask is None:
            t5_pooled = txt_states.mean(1)
        else:
            keep = encoder_attention_mask[..., None].to(txt_states.dtype)  # (B, L, 1)
            t5_pooled = (txt_states * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, T5)
        t_freq = timestep_embedding(timestep, TIME_FREQ_DIM).to(dtype)  # (B, 256)
        text_time = torch.cat([t_freq, pooled_projections.to(dtype), t5_pooled.to(dtype)], dim=-1)

        vec = self.time_in(t_freq) + self.vector_in(pooled_projections.to(dtype)) + self.t5_pool_in(t5_pooled)
        expert: dict[str, Tensor] = {}
        if self.lune is not None:
            expert["lune_pred"], signal = self.lune(text_time, lune_features, lune_mask)
            vec = vec + signal  # (B, D)

        img = self.img_in(hidden_states)  # (B, N, D)
        txt = self.txt_in(txt_states.to(dtype))  # (B, L, D)
        txt_len = txt.shape[1]
        txt_ids = torch.zeros(b, txt_len, 3, device=img_ids.device, dtype=img_ids.dtype)
        cos, sin = rope(torch.cat([txt_ids, img_ids], dim=1), self.config.axes_dims_rope, self.config.theta)
        mask = None
        if encoder_attention_mask is not None:
            img_keep = encoder_attention_mask.new_ones(b, n)
            mask = torch.cat([encoder_attention_mask.bool(), img_keep.bool()], dim=1)[:, None, None, :]  # (B,1,1,L+N)
        if self.attention_backend == "flex":
            # One BlockMask serves every block; without a text mask flex attends to all keys, as SDPA does.
            block_mask = None if mask is None else key_padding_block_mask(mask[:, 0, 0])
            ctx = AttentionContext(cos, sin, backend="flex", block_mask=block_mask)
        else:
            ctx = AttentionContext(cos, sin, mask)
        if self.sol is not None:
            sol = self.sol(timestep, text_time, sol_stats, sol_spatial, sol_mask)
            expert["sol_stats_pred"], expert["sol_spatial_pred"] = sol.stats_pred, sol.spatial_pred
            grid = img_shape if img_shape is not None else _square_grid(n)
            ctx.q_scale, ctx.k_scale = self.sol.qk_scales(sol, grid, txt_len)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, ctx, self.shared_txt_attn)
        x = torch.cat([txt, img], dim=1)  # (B, L + N, D)
        for block in self.single_blocks:
            x = self._run(block, x, vec, ctx)
        v_pred = self.final_layer(x[:, txt_len:], vec)  # (B, N, C*p*p)
        return (v_pred, expert) if return_expert_pred else v_pred

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} image tokens are not a square grid: pass img_shape=(h, w) to forward")
    return side, side


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
