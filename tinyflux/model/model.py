"""TinyFluxDeep: a compact Flux-style MMDiT that maps (x_t, t, text) to the rectified-flow velocity.

Pure torch: no accelerate, no torch.distributed, no device calls. Distribution, compile and checkpointing wrap it from
the outside (tinyflux/trainer/).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tinyflux.model.config import ATTENTION_BACKENDS, PRESETS, ConfigError, TinyFluxConfig
from tinyflux.model.experts import LunePredictor, SolPrior
from tinyflux.model.layers import (
    AdaRMSNorm,
    AttentionContext,
    BlockInputs,
    DoubleStreamBlock,
    RMSNorm,
    SingleStreamBlock,
    TextProjections,
    sol_qk_scales,
)
from tinyflux.model.math import (
    key_padding_block_mask,
    rope,
    rope_angles,
    rope_frequencies,
    timestep_embedding,
)

TIME_FREQ_DIM = 256  # width of the sinusoidal timestep embedding (128 sin + 128 cos)

__all__ = ["PRESETS", "ConfigError", "TinyFluxConfig", "TinyFluxDeep", "pack_latents", "unpack_latents"]


def pack_latents(latents: Tensor, patch_size: int = 1) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C * p * p) tokens, row-major over the token grid."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack_latents(tokens: Tensor, height: int, width: int, patch_size: int = 1) -> Tensor:
    """Inverse of pack_latents; height and width in latent pixels."""
    h, w = height // patch_size, width // patch_size
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=patch_size, pw=patch_size)


class RopeFrequencies(nn.Module):
    """The released state dict's `rope.freqs_{axis}` buffers: each axis' rope_frequencies.

    Kept so that released checkpoints load with strict keys; the forward recomputes the same values in float32
    (math.rope), so casting the model to bf16 cannot round the angles.
    """

    def __init__(self, axes_dims: tuple[int, ...], theta: float):
        super().__init__()
        for axis, dim in enumerate(axes_dims):
            self.register_buffer(f"freqs_{axis}", rope_frequencies(dim, theta), persistent=True)


class TinyFluxDeep(nn.Module):
    """The released TinyFlux-Deep v4.2 network (module and parameter names as in its state dict).

    Conditioning vec = time_in(t) + text_vec + Lune signal, with text_vec = s * vector_in(CLIP pooled) + (1 - s) *
    t5_pool(softmax-weighted mean of the T5 states), s = sigmoid(text_balance). Double-stream blocks, then
    single-stream blocks over [text, image], then final_linear(final_norm(image tokens)): no final modulation.
    """

    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        self.config = config
        c = config
        d = c.hidden_size
        self.img_in = nn.Linear(c.token_channels, d)
        self.txt_in = nn.Linear(c.t5_hidden_size, d)
        if c.num_t5_layers > 1:
            self.t5_mix = nn.Parameter(torch.zeros(c.num_t5_layers))  # softmax -> uniform mix of the listed layers
        self.time_in = TimestepEmbedder(d)
        self.vector_in = nn.Sequential(nn.SiLU(), nn.Linear(c.pooled_projection_dim, d))
        if c.use_t5_vec:
            self.t5_pool = nn.Sequential(nn.Linear(c.t5_hidden_size, d), nn.SiLU(), nn.Linear(d, d))
            self.text_balance = nn.Parameter(torch.zeros(1))  # sigmoid: the CLIP share of the text vector
        self.lune_predictor = LunePredictor(c) if c.use_lune_expert else None
        self.sol_prior = SolPrior(c) if c.use_sol_prior else None
        self.rope = RopeFrequencies(c.axes_dims_rope, c.theta)

        share = c.use_cross_attention_sharing and c.num_double_layers > 0
        self.shared_txt_attn = TextProjections(d) if share else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, c.num_attention_heads, c.mlp_hidden_dim, c.use_sol_prior, own_text=not share)
            for _ in range(c.num_double_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, c.num_attention_heads, c.mlp_hidden_dim, c.use_sol_prior)
            for _ in range(c.num_single_layers)
        )
        self.final_norm = RMSNorm(d)
        self.final_linear = nn.Linear(d, c.token_channels)
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"
        self.fused_conditioning = True
        self._compiled_prologue: Callable[..., Any] | None = None
        self._register_state_dict_hook(_released_scalar_shapes)
        self._register_load_state_dict_pre_hook(_scalar_parameters_as_vectors)
        self.initialize_weights()
        if c.freeze_lune and self.lune_predictor is not None:
            self.lune_predictor.requires_grad_(False)
        if c.freeze_sol and self.sol_prior is not None:
            self.sol_prior.requires_grad_(False)

    @property
    def lune(self) -> LunePredictor | None:
        return self.lune_predictor

    @property
    def sol(self) -> SolPrior | None:
        return self.sol_prior

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias, then zeros where a branch must start closed (adaLN-Zero).

        Zeroed: every block's adaLN linear (each gate is 0, so every gated residual branch starts off), the final
        linear (v_pred starts at 0 instead of a random field) and every Sol 1x1 conv (the q/k scales start at exactly
        exp(0) = 1). The released weights were trained from another init (adaLN not zeroed); loading them replaces
        all of this, so only a run from scratch sees it.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        zeroed: list[nn.Module] = [self.final_linear]
        for block in self.double_blocks:
            zeroed += [block.img_norm1.linear, block.txt_norm1.linear, block.attn.spatial_to_mod]
        for block in self.single_blocks:
            zeroed += [block.norm.linear, block.attn.spatial_to_mod]
        for m in zeroed:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        if self.sol_prior is not None:  # unused by the forward; the original's identity init (weight 0, bias 1)
            nn.init.zeros_(self.sol_prior.spatial_to_qk_scale.weight)
            nn.init.ones_(self.sol_prior.spatial_to_qk_scale.bias)

    @staticmethod
    def create_img_ids(batch_size: int, h: int, w: int, device: Any = None) -> Tensor:
        """Position ids (0, y, x) for an h x w token grid, row-major: (B, h * w, 3), float32."""
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        return ids.flatten(0, 1).expand(batch_size, -1, -1)

    @staticmethod
    def create_txt_ids(batch_size: int, length: int, device: Any = None) -> Tensor:
        """Position ids (i, 0, 0) for text tokens: (B, L, 3), float32. The trainer and sampler pass no txt_ids (all
        text at (0, 0, 0), as the released network was trained); these are for callers that want ordered text."""
        ids = torch.zeros(length, 3, device=device)
        ids[:, 0] = torch.arange(length, device=device)
        return ids.expand(batch_size, -1, -1)

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

    def __getstate__(self) -> dict[str, Any]:
        """As nn.Module's (which drops a compiled forward), less the compiled prologue: a pickled or deep-copied model
        (torch.save of the module, an EMA or sampling copy) runs eager, as nn.Module.compile's copies do."""
        return {**super().__getstate__(), "_compiled_prologue": None}

    def compile_prologue(self, **compile_kwargs: Any) -> None:
        """torch.compile the prologue (everything forward does once before the blocks: embedders, experts, RoPE,
        every block's adaLN and Sol inputs) as one region, beside the blocks that compile in place (regional
        compilation: trainer.runtime.compile_blocks). Eager, those are ~100 small ops and as many in backward. A
        copy of the model runs eager (__getstate__)."""
        self._compiled_prologue = torch.compile(TinyFluxDeep.prologue, **compile_kwargs)

    def set_fused_conditioning(self, enabled: bool) -> None:
        """Whether the forward computes every block's adaLN modulation (one linear over all blocks' adaLN weights laid
        side by side) and Sol q / k scales (one conv) before the first block, instead of each block its own.

        A runtime choice: the same parameters and state dict, and the same numbers (tests/test_model.py); ~30 ops
        fewer per block and step. Off where an engine shards the parameters (FSDP2, DeepSpeed ZeRO-3): they gather a
        block's weights only for that block's forward. Blocks whose adaLN linear is wrapped (a LoRA adapter) or whose
        weights are sharded tensors (FSDP2's DTensors, however the model was sharded) run the unfused path by
        themselves.
        """
        self.fused_conditioning = enabled

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
        if k == 1:
            return states[:, :, 0]
        return torch.einsum("blkd,k->bld", states, self.t5_mix.softmax(0).to(states.dtype))

    def _t5_vector(self, states: Tensor, mask: Tensor | None) -> Tensor:
        """Softmax over tokens of each token's channel mean, as weights of a sum of the states: (B, L, D) -> (B, D).

        With a mask, padding tokens get no weight (the released network, fed unmasked padded text, weighs all 128).
        """
        logits = states.float().mean(-1)  # (B, L)
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf"))
        weights = logits.softmax(-1).to(states.dtype)
        return torch.einsum("bl,bld->bd", weights, states)

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
        txt_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Velocity v = data - noise for x_t (t = 1 is data).

        hidden_states (B, N, C*p*p) packed x_t; encoder_hidden_states (B, L, D) or (B, L, K, D) T5 states;
        pooled_projections (B, P) CLIP pooled; timestep (B,) in [0, 1]; img_ids (B, N, 3).
        lune_features (B, lune_dim), sol_stats (B, >= sol_num_stats), sol_spatial (B, S, S): teacher features that
        replace the experts' predictions in the conditioning (teacher forcing); lune_mask / sol_mask (B,) bool
        restrict that to the samples marked True (teacher dropout). encoder_attention_mask (B, L) bool marks real
        text tokens (the "masked" text regime; None reads every state, as the released "padded" regime does).
        img_shape: the (h, w) token grid, square when omitted. txt_ids (B, L, 3): text positions for the single
        blocks' RoPE (default all 0; double blocks never rotate text).
        Returns v_pred (B, N, C*p*p), and with return_expert_pred {"lune_pred" (B, lune_dim), "sol_stats_pred"
        (B, sol_num_stats), "sol_spatial_pred" (B, S, S)}.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        grid = img_shape if img_shape is not None else _square_grid(hidden_states.shape[1])
        prologue = self._compiled_prologue or TinyFluxDeep.prologue
        img, txt, vec, ctx, conditioning, expert = prologue(
            self,
            hidden_states,
            encoder_hidden_states,
            pooled_projections,
            timestep,
            img_ids,
            lune_features,
            sol_stats,
            sol_spatial,
            encoder_attention_mask,
            lune_mask,
            sol_mask,
            grid,
            txt_ids,
        )
        pre = None if conditioning is None else self._per_block(*conditioning)
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, img, txt, vec, ctx, self.shared_txt_attn, pre and pre[i])
        x = torch.cat([txt, img], dim=1)  # (B, L + N, D)
        for i, block in enumerate(self.single_blocks, start=len(self.double_blocks)):
            x = self._run(block, x, vec, ctx, pre and pre[i])
        v_pred = self.final_linear(self.final_norm(x[:, ctx.txt_len :]))  # (B, N, C*p*p)
        return (v_pred, expert) if return_expert_pred else v_pred

    def prologue(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        lune_features: Tensor | None,
        sol_stats: Tensor | None,
        sol_spatial: Tensor | None,
        encoder_attention_mask: Tensor | None,
        lune_mask: Tensor | None,
        sol_mask: Tensor | None,
        grid: tuple[int, int],
        txt_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, AttentionContext, tuple[Tensor, Tensor | None] | None, dict[str, Tensor]]:
        """Everything forward computes once before the blocks (forward's arguments; grid the (h, w) token grid):
        the image and text tokens (B, N, D), (B, L, D), the conditioning vector (B, D), the attention context, the
        blocks' precomputed inputs (_conditioning), and the experts' predictions. One region for compile_prologue (torch.compile)."""
        c = self.config
        dtype = hidden_states.dtype
        pooled = pooled_projections.to(dtype)

        txt_states = self._mix_t5(encoder_hidden_states).to(dtype)  # (B, L, T5)
        time_emb = self.time_in(timestep)  # (B, D)
        vec = self.vector_in(pooled)  # (B, D)
        if c.use_t5_vec:
            s = torch.sigmoid(self.text_balance)
            vec = s * vec + (1 - s) * self.t5_pool(self._t5_vector(txt_states, encoder_attention_mask))
        vec = time_emb + vec
        time_pooled = torch.cat([time_emb, pooled], dim=-1)  # (B, D + P): what both experts read
        expert: dict[str, Tensor] = {}
        if self.lune_predictor is not None:
            expert["lune_pred"], signal = self.lune_predictor(time_pooled, lune_features, lune_mask)
            vec = vec + signal  # (B, D)

        img = self.img_in(hidden_states)  # (B, N, D)
        txt = self.txt_in(txt_states)  # (B, L, D)
        ctx = self._attention_context(img_ids, txt_ids, txt.shape[1], encoder_attention_mask)
        if self.sol_prior is not None:
            sol = self.sol_prior(timestep, time_pooled, sol_stats, sol_spatial, sol_mask)
            expert["sol_stats_pred"], expert["sol_spatial_pred"] = sol.stats_pred, sol.spatial_pred
            ctx.sol_map = F.interpolate(sol.spatial[:, None], size=grid, mode="bilinear", align_corners=False)
            ctx.sol_scale = ctx.head_scale / sol.temperature.mean(dim=1).clamp(min=0.1)  # (B,)
        return img, txt, vec, ctx, self._conditioning(vec, ctx), expert

    def _attention_context(
        self, img_ids: Tensor, txt_ids: Tensor | None, txt_len: int, mask: Tensor | None
    ) -> AttentionContext:
        c = self.config
        b = img_ids.shape[0]
        zero_ids = torch.zeros(b, txt_len, 3, device=img_ids.device, dtype=img_ids.dtype)
        rope_double = rope_angles(*rope(torch.cat([zero_ids, img_ids], dim=1), c.axes_dims_rope, c.theta))
        rope_single = rope_double
        if txt_ids is not None:
            ids = torch.cat([txt_ids.to(img_ids).expand(b, -1, -1), img_ids], 1)
            rope_single = rope_angles(*rope(ids, c.axes_dims_rope, c.theta))
        keep = None
        if mask is not None:
            keep = torch.cat([mask.bool(), mask.new_ones(b, img_ids.shape[1], dtype=torch.bool)], dim=1)  # (B, L+N)
        ctx = AttentionContext(rope_double, rope_single, txt_len, c.attention_head_dim**-0.5)
        if self.attention_backend == "flex":
            # One BlockMask serves every block; without a text mask flex attends to all keys, as SDPA does.
            ctx.backend = "flex"
            ctx.block_mask = None if keep is None else key_padding_block_mask(keep)
        elif keep is not None:
            ctx.mask = keep[:, None, None, :]  # (B, 1, 1, L + N)
        return ctx

    def _block_inputs(self, vec: Tensor, ctx: AttentionContext) -> list[BlockInputs] | None:
        """Every block's adaLN outputs and Sol q / k scales, each computed in one call over all blocks: one linear
        whose weight is the adaLN weights laid end to end (each output the same dot product as its own linear's),
        one conv over all spatial_to_mod convs. None when fused conditioning is off or an adaLN linear is wrapped."""
        conditioning = self._conditioning(vec, ctx)
        return None if conditioning is None else self._per_block(*conditioning)

    def _adaln_norms(self) -> list[AdaRMSNorm]:
        """Every block's adaLN, in block order: the layout of _conditioning's chunks."""
        return [n for blk in self.double_blocks for n in (blk.img_norm1, blk.txt_norm1)] + [
            blk.norm for blk in self.single_blocks
        ]

    def _fused_norms(self) -> list[AdaRMSNorm] | None:
        """_adaln_norms when fused conditioning can serve them; else None."""
        norms = self._adaln_norms()
        if not self.fused_conditioning or not norms or any(type(n.linear) is not nn.Linear for n in norms):
            return None
        if any(type(n.linear.weight) not in (nn.Parameter, Tensor) for n in norms):
            return None  # sharded (FSDP2's DTensor): gathered only inside each block's own forward
        return norms

    def _conditioning(self, vec: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor | None] | None:
        """_block_inputs' tensors before they are split per block: every shift, scale and gate (B, 1, K, D) and the
        Sol q / k scales (2, B, n, H, L + N, 1) or None. Two tensors, so a compiled prologue returns two and its
        backward takes two gradients, not one per block and chunk."""
        norms = self._fused_norms()
        if norms is None:
            return None
        weight = torch.cat([n.linear.weight for n in norms])  # (sum of 3 * sets * D, D)
        bias = torch.cat([n.linear.bias for n in norms])
        mods = F.linear(F.silu(vec), weight, bias)[:, None].unflatten(-1, (-1, self.config.hidden_size))
        if ctx.sol_scale is None:
            return mods, None
        blocks = [*self.double_blocks, *self.single_blocks]
        convs = [blk.attn.spatial_to_mod for blk in blocks]
        w = torch.cat([conv.weight for conv in convs])  # (n * H, 1, 1, 1)
        b, h = vec.shape[0], self.config.num_attention_heads
        img_mod = F.conv2d(ctx.sol_map, w, torch.cat([conv.bias for conv in convs]))  # (B, n * H, h, w)
        img_mod = img_mod.clamp(-2, 2).exp().view(b, len(blocks), h, -1)  # (B, n, H, N)
        counts = (len(self.double_blocks), len(self.single_blocks))
        return mods, sol_qk_scales(img_mod, counts, ctx.sol_scale, ctx.head_scale, ctx.txt_len)

    def _per_block(self, mods: Tensor, qk: Tensor | None) -> list[BlockInputs]:
        """_conditioning's tensors as each block's BlockInputs: views (one unbind each, so one op in backward)."""
        chunks = mods.unbind(-2)  # every shift, scale and gate of every block, (B, 1, D) each
        per_norm, start = [], 0
        for n in self._adaln_norms():  # _conditioning checked that they can be fused
            per_norm.append(tuple(chunks[start : start + 3 * n.sets]))
            start += 3 * n.sets
        nd, ns = len(self.double_blocks), len(self.single_blocks)
        per_block = [tuple(per_norm[2 * i : 2 * i + 2]) for i in range(nd)] + [
            (per_norm[2 * nd + i],) for i in range(ns)
        ]
        scales = list(qk.unbind(2)) if qk is not None else [None] * (nd + ns)
        return [BlockInputs(m, s) for m, s in zip(per_block, scales, strict=True)]

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> math.timestep_embedding (256 features) -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        # The sinusoids of the float32 t (a bf16 t would move 0.99931 to 1.0), then the weights' dtype.
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# The released state dict's 0-dim parameters. FSDP2 cannot shard a 0-dim parameter, so the module holds each as a
# 1-element vector and its state_dict() presents them with their released shape () (released_shapes does the same
# for a state dict gathered elsewhere, e.g. an EMA); loading takes either shape.
SCALAR_PARAMETERS = ("text_balance", "lune_predictor.expert_gate", "sol_prior.blend_gate")


def released_shapes(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """state with the SCALAR_PARAMETERS as 0-dim tensors, as the released checkpoints hold them (in place; returned).

    A sharded FSDP2 DTensor keeps its (1,) shape: its checkpoints are read back by the same sharded module. (Its type
    is not Tensor or Parameter; model code does not import torch.distributed to name it.)
    """
    for name in SCALAR_PARAMETERS:
        t = state.get(prefix + name)
        if t is not None and t.dim() == 1 and type(t) in (Tensor, nn.Parameter):
            state[prefix + name] = t.reshape(())
    return state


def _released_scalar_shapes(module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    released_shapes(state, prefix)


def _scalar_parameters_as_vectors(state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    for name in SCALAR_PARAMETERS:
        key = prefix + name
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)


def _square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} image tokens are not a square grid: pass img_shape=(h, w) to forward")
    return side, side


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
