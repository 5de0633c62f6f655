"""How the teachers' features are taken from inside an SD1.5-structured UNet: inputs, Lune's mid block, Sol's attention.

Definitions and conventions: docs/EXPERT_CACHE.md. A teacher sees seeded pure noise, the CLIP context of the prompt and
the SD noise level (1 - t) * 1000 for a TinyFlux timestep t (t = 1 is data); its features depend on nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from einops import rearrange

from tinyflux.frozen.sol_stats import attention_spatial_map, attention_stats, combine_layers, grid_hw
from tinyflux.frozen.sources import ZooError
from tinyflux.model.config import SOL_SPATIAL_SIZE


def teacher_noise_level(t: torch.Tensor) -> torch.Tensor:
    """SD-style noise level of TinyFlux timesteps: (1 - t) * 1000, so t = 1 (data) -> 0 and t = 0 (noise) -> 1000."""
    return (1.0 - t) * 1000.0


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of `shape` per seed, drawn on the CPU so a seed means the same noise on any device.

    Returns (len(seeds), *shape) float32; equal seeds give equal maps.
    """
    drawn = {s: torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in set(seeds)}
    return torch.stack([drawn[s] for s in seeds])


def per_sample_timesteps(timesteps: float | torch.Tensor, n: int) -> torch.Tensor:
    """One float or n values in [0, 1] -> (n,) float32 on the CPU."""
    t = torch.as_tensor(timesteps, dtype=torch.float32).detach().cpu().flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"timesteps has {t.numel()} values for {n} prompts; pass one float or one value per prompt")
    if ((t < 0) | (t > 1)).any():
        raise ValueError(f"timesteps must lie in [0, 1] (TinyFlux convention, 1 = data), got {t.tolist()}")
    return t


def per_sample_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One int (shared by all prompts) or n ints -> n seeds."""
    seeds = [int(seed)] * n if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed lists {len(seeds)} seeds for {n} prompts; pass one int or one seed per prompt")
    return seeds


class _MidBlockReached(Exception):
    """Carries the mid-block output out of a UNet forward and stops it there: Lune needs no decoder half."""

    def __init__(self, output: torch.Tensor):
        super().__init__("UNet mid block reached")
        self.output = output


def mid_block_features(
    unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """The UNet's mid-block output averaged over space, (B, C_mid) float32; the up blocks never run."""

    def stop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise _MidBlockReached(output)

    handle = unet.mid_block.register_forward_hook(stop)
    try:
        unet(sample, timestep, encoder_hidden_states=context)
    except _MidBlockReached as reached:
        return reached.output.float().mean(dim=(2, 3))  # (B, C_mid, h, w) -> (B, C_mid)
    finally:
        handle.remove()
    raise ZooError("the Lune UNet finished its forward without running its mid block")


class SolAttentionRecorder:
    """Attention processor for the self-attention (attn1) layers of the Sol UNet.

    Computes attention like diffusers' AttnProcessor (explicit probabilities, as SDPA does not return them) and, per
    layer, records the Sol statistics (B, 4) and spatial map (B, S, S) of the head-averaged probabilities. Layers on a
    1x1 grid carry no spatial information and are skipped. Samples go through in chunks of at most max_chunk_bytes of
    probabilities (at least one sample); every sample's numbers are its own, whatever the chunk.
    """

    def __init__(self, spatial_size: int = SOL_SPATIAL_SIZE, max_chunk_bytes: int = 1 << 30):
        self.max_chunk_bytes = max_chunk_bytes  # attention probabilities held at once per layer (1 GiB; >= 1 sample)
        self.reset(spatial_size)

    def reset(self, spatial_size: int, grid: tuple[int, int] | None = None) -> None:
        """Drop what was recorded; `grid`: the (height, width) of the noise about to go through (None: square)."""
        self.spatial_size, self.grid = spatial_size, grid
        self.stats: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ZooError("SolAttentionRecorder belongs on self-attention (attn1) layers, got cross-attention input")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_input = hidden_states.ndim == 4
        if spatial_input:
            height = hidden_states.shape[2]
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        batch, tokens, _ = hidden_states.shape  # (B, N, C)
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, N, d)
        key = attn.head_to_batch_dim(attn.to_k(hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(hidden_states))
        out = torch.empty_like(value)  # (B*heads, N, d)
        stats, maps = [], []
        # A chunk of samples at a time: SD1.5's 64x64 layers hold 8 heads x 4096 x 4096 probabilities per sample (268 MB
        # in bf16), so the whole (B * buckets)-row batch at once would not fit, but one sample at a time costs a dozen
        # small kernels per sample and layer. Chunks keep the peak near max_chunk_bytes whatever the batch size.
        per_sample = attn.heads * tokens * tokens * query.element_size()
        chunk = max(1, min(batch, self.max_chunk_bytes // per_sample))
        for start in range(0, batch, chunk):
            rows = slice(start * attn.heads, min(batch, start + chunk) * attn.heads)
            mask = None if attention_mask is None else attention_mask[rows]
            probs = attn.get_attention_scores(query[rows], key[rows], mask)  # (c*heads, N, N)
            out[rows] = torch.bmm(probs, value[rows])
            head_mean = rearrange(probs, "(c h) q k -> c h q k", h=attn.heads).mean(dim=1, dtype=torch.float32)
            measured = self._measure(head_mean, self._layer_grid(tokens))  # (c, N, N) -> (c, 4), (c, S, S)
            if measured is not None:
                stats.append(measured[0])
                maps.append(measured[1])
        if stats:
            self.stats.append(torch.cat(stats))  # (B, 4)
            self.maps.append(torch.cat(maps))  # (B, S, S)

        out = attn.batch_to_head_dim(out)  # (B, N, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial_input:
            out = rearrange(out, "b (h w) c -> b c h w", h=height)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _layer_grid(self, tokens: int) -> int | tuple[int, int]:
        """The grid of a layer attending over `tokens`: a square side, or with reset(grid=(h, w)) the level of the
        UNet's pyramid that has that many cells (each down block halves a side, rounding up as its stride-2 conv
        does; levels only shrink, so the level is unique)."""
        if self.grid is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ZooError(f"Sol self-attention over {tokens} tokens is not a square grid")
            return side
        h, w = self.grid
        while h * w > tokens and (h, w) != (1, 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w != tokens:
            raise ZooError(f"Sol self-attention over {tokens} tokens is no level of the {self.grid} noise grid")
        return h, w

    def _measure(self, probs: torch.Tensor, grid: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(stats (B, 4), spatial (B, S, S)) of head-averaged probabilities (B, N, N) over `grid`; None when a side
        of the grid is 1 (no spatial information)."""
        if min(grid_hw(grid)) < 2:
            return None
        return attention_stats(probs, grid), attention_spatial_map(probs, grid, self.spatial_size)


def install_sol_recorder(unet: UNet2DConditionModel) -> SolAttentionRecorder:
    """Put one SolAttentionRecorder on every self-attention (attn1) layer; cross-attention keeps its processor."""
    recorder = SolAttentionRecorder()
    processors = unet.attn_processors
    self_attention = [name for name in processors if name.endswith("attn1.processor")]
    if not self_attention:
        raise ZooError("the Sol UNet has no self-attention (attn1) layers to record")
    unet.set_attn_processor({name: recorder if name in self_attention else p for name, p in processors.items()})
    return recorder


def sol_recorder(unet: UNet2DConditionModel) -> SolAttentionRecorder:
    """The SolAttentionRecorder that install_sol_recorder put on this UNet's self-attention layers."""
    recorders = {id(p): p for p in unet.attn_processors.values() if isinstance(p, SolAttentionRecorder)}
    if len(recorders) != 1:
        raise ZooError(
            f"expected one SolAttentionRecorder on the Sol UNet, found {len(recorders)}: load it with load_sol"
        )
    return next(iter(recorders.values()))


def teacher_inputs(
    unet: UNet2DConditionModel,
    context: torch.Tensor,
    t: torch.Tensor,
    seeds: Sequence[int],
    dtype: torch.dtype,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise (B, C, S, S), noise level (B,), context (B, 77, D)) on the teacher's device for CLIP context (B, 77, D)
    already computed, TinyFlux timesteps t (B,) and one seed per row: the teacher's whole input (docs/EXPERT_CACHE.md).
    `grid` (h, w): noise of that size (an aspect bucket's, Bucket.teacher_grid) instead of the UNet's square."""
    if context.shape[-1] != unet.config.cross_attention_dim:
        raise ZooError(
            f"the CLIP context is {context.shape[-1]} wide but the teachers cross-attend over "
            f"{unet.config.cross_attention_dim}: load CLIP and teachers from the same zoo"
        )
    side, device = unet.config.sample_size, next(unet.parameters()).device
    h, w = grid or (side, side)
    noise = seeded_noise(seeds, (unet.config.in_channels, h, w)).to(device, dtype)
    return noise, teacher_noise_level(t).to(device), context.to(device, dtype)


@torch.no_grad()
def lune_from_context(
    unet: UNet2DConditionModel,
    context: torch.Tensor,
    t: torch.Tensor,
    seeds: Sequence[int],
    dtype: torch.dtype,
    batch_size: int,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Lune features (B, C_mid) float32 on the CPU of rows given by their CLIP context (B, 77, D), t (B,) and seeds,
    `batch_size` rows per UNet call: ModelZoo.extract_lune without its CLIP pass."""
    out = []
    for start in range(0, len(seeds), batch_size):
        rows = slice(start, start + batch_size)
        inputs = teacher_inputs(unet, context[rows], t[rows], seeds[rows], dtype, grid)
        out.append(mid_block_features(unet, *inputs).cpu())
    return torch.cat(out)


@torch.no_grad()
def sol_from_context(
    unet: UNet2DConditionModel,
    context: torch.Tensor,
    t: torch.Tensor,
    seeds: Sequence[int],
    dtype: torch.dtype,
    batch_size: int,
    spatial_size: int,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sol stats (B, 4) and spatial maps (B, S, S), float32 on the CPU, of rows given as for lune_from_context:
    ModelZoo.extract_sol without its CLIP pass. The UNet must carry its recorder (ModelZoo.load_sol installs it)."""
    recorder = sol_recorder(unet)
    stats, spatial = [], []
    for start in range(0, len(seeds), batch_size):
        rows = slice(start, start + batch_size)
        recorder.reset(spatial_size, grid)
        unet(*teacher_inputs(unet, context[rows], t[rows], seeds[rows], dtype, grid))
        layer_stats, layer_maps = combine_layers(recorder.stats, recorder.maps)
        stats.append(layer_stats.cpu())
        spatial.append(layer_maps.cpu())
    recorder.reset(spatial_size)
    return torch.cat(stats), torch.cat(spatial)
