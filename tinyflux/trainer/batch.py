"""The training batch, seen from the trainer: does it fit the model, its random draws, its teacher features at t.

A batch (the cache's collate_fn / streaming loader) holds "latents" (B, C, H, W), "t5_embeds" (B, L, K, D), "t5_mask"
(B, L), "clip_pooled" (B, P), optionally "lune" (B, T, lune_dim), "sol_stats" (B, T, 4), "sol_spatial" (B, T, S, S)
with "t_buckets" (T,) and, when caches with and without a teacher are mixed, "lune_mask" / "sol_mask" (B,) marking the
rows that have it; "index" / "dataset_id" (B,) for lookups in a MultiSourceCache. (tinyflux.cache.loaders writes them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinyflux.cache.format import TEACHER_TENSORS, interpolate_buckets
from tinyflux.errors import TinyFluxError
from tinyflux.model.config import TinyFluxConfig
from tinyflux.trainer.config import TrainerConfig
from tinyflux.trainer.schedules import sample_timesteps


class BatchMismatchError(TinyFluxError, ValueError):
    """Training data whose tensors do not fit the model config."""


@dataclass
class Teacher:
    """Teacher features at this step's timesteps; None where the data has none or the config turns them off."""

    lune: Tensor | None = None  # (B, lune_dim)
    sol_stats: Tensor | None = None  # (B, 4)
    sol_spatial: Tensor | None = None  # (B, S, S)
    lune_valid: Tensor | None = None  # (B,) bool: rows that have Lune features (None = all); others are zeros
    sol_valid: Tensor | None = None  # (B,) bool, the same for Sol


def check_batch(batch: dict[str, Any], config: TinyFluxConfig) -> None:
    """Raise BatchMismatchError naming every tensor of a training batch that does not fit the model config."""
    problems = []
    c, h, w = batch["latents"].shape[1:]
    if c != config.in_channels:
        problems.append(f"latents have {c} channels, the model in_channels={config.in_channels}")
    if h % config.patch_size or w % config.patch_size:
        problems.append(f"latents {h}x{w} are not divisible by patch_size={config.patch_size}")
    t5 = batch["t5_embeds"]
    if t5.shape[-1] != config.t5_hidden_size:
        problems.append(f"t5_embeds width {t5.shape[-1]}, the model t5_hidden_size={config.t5_hidden_size}")
    if t5.dim() == 4 and t5.shape[2] != config.num_t5_layers:
        problems.append(f"t5_embeds hold {t5.shape[2]} T5 layers, the model t5_layers={config.t5_layers}")
    pooled = batch["clip_pooled"].shape[-1]
    if pooled != config.pooled_projection_dim:
        problems.append(f"clip_pooled width {pooled}, the model pooled_projection_dim={config.pooled_projection_dim}")
    if "lune" in batch and config.use_lune_expert and batch["lune"].shape[-1] != config.lune_expert_dim:
        problems.append(f"lune width {batch['lune'].shape[-1]}, the model lune_expert_dim={config.lune_expert_dim}")
    if "sol_spatial" in batch and config.use_sol_prior and batch["sol_spatial"].shape[-1] != config.sol_spatial_size:
        side = batch["sol_spatial"].shape[-1]
        problems.append(f"sol_spatial maps {side} wide, the model sol_spatial_size={config.sol_spatial_size}")
    if problems:
        raise BatchMismatchError(
            "the training data does not fit the model config:\n  - "
            + "\n  - ".join(problems)
            + "\nRebuild the cache for this model (build_cache.py) or choose a model config that matches the cache."
        )


def to_device(x: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A batch tensor on the device, copied without blocking the host (the CUDA loaders pin their batches) in its
    stored dtype (float16 moves half the bytes of float32), then cast there."""
    x = x.to(device, non_blocking=True)
    return x if dtype is None else x.to(dtype)


def pad_text(t5: Tensor, mask: Tensor, buckets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """T5 states (B, L, ...) and their mask (B, L) zero-padded, mask False, to the smallest bucket >= L (past the
    largest: its next multiple), so compiled blocks meet one text length per bucket instead of one per batch. Masked
    keys change no output. No buckets: unchanged."""
    length = t5.shape[1]
    if not buckets:
        return t5, mask
    width = next((n for n in buckets if n >= length), -(-length // buckets[-1]) * buckets[-1])
    if width == length:
        return t5, mask
    t5 = torch.cat([t5, t5.new_zeros(t5.shape[0], width - length, *t5.shape[2:])], 1)  # (B, width, ...)
    return t5, torch.cat([mask, mask.new_zeros(mask.shape[0], width - length)], 1)  # (B, width)


def _interpolated(batch: dict[str, Any], keys: list[str], buckets: Tensor, t: Tensor) -> dict[str, Tensor]:
    """batch[key] (B, T, ...) of each key at t (B,): one interpolate_buckets over the features laid side by side (the
    same arithmetic per element, a third of the ops of one call per tensor)."""
    if not keys:
        return {}
    device = t.device
    flat = [to_device(batch[k], device, torch.float32).flatten(2) for k in keys]  # (B, T, F_k)
    joined = interpolate_buckets(flat[0] if len(flat) == 1 else torch.cat(flat, -1), buckets, t)  # (B, sum F_k)
    parts = joined.split([f.shape[-1] for f in flat], -1)
    return {k: p.reshape(batch[k].shape[:1] + batch[k].shape[2:]) for k, p in zip(keys, parts, strict=True)}


def teacher_features(
    batch: dict[str, Any], t: Tensor, cache: Any = None, lune: bool = True, sol: bool = True
) -> Teacher:
    """Teacher features at t (B,): interpolated between the batch's cached buckets, else looked up in `cache` (a
    MultiSourceCache) by (index, dataset_id). `lune` / `sol` False leave that teacher out."""
    device = t.device
    out = Teacher()
    if "t_buckets" in batch:
        wanted = {"lune": lune, "sol": sol}
        keys = [  # a teacher's tensors when it is wanted and the batch holds all of them
            name
            for teacher, names in TEACHER_TENSORS.items()
            if wanted[teacher] and all(n in batch for n in names)
            for name in names
        ]
        at_t = _interpolated(batch, keys, to_device(batch["t_buckets"], device, torch.float32), t)
        # A batch mixing caches with and without a teacher marks the real rows in "lune_mask" / "sol_mask".
        if "lune" in at_t:
            out.lune = at_t["lune"]
            out.lune_valid = to_device(batch["lune_mask"], device) if "lune_mask" in batch else None
        if "sol_stats" in at_t:
            out.sol_stats, out.sol_spatial = at_t["sol_stats"], at_t["sol_spatial"]
            out.sol_valid = to_device(batch["sol_mask"], device) if "sol_mask" in batch else None
    if cache is None or not (lune and out.lune is None or sol and out.sol_stats is None):
        return out
    # A MultiSourceCache may mix datasets with and without features: their rows come back as zeros, so keep which
    # rows are real; the trainer neither teacher-forces nor distills on the others.
    index, dataset_id, t_cpu = batch["index"].cpu(), batch["dataset_id"].cpu(), t.detach().cpu()
    if lune and out.lune is None:
        found = cache.get_lune(index, dataset_id, t_cpu)
        if found is not None:
            out.lune, out.lune_valid = found.to(device, torch.float32), cache.lune_available(dataset_id).to(device)
    if sol and out.sol_stats is None:
        stats, spatial = cache.get_sol(index, dataset_id, t_cpu)
        if stats is not None and spatial is not None:
            out.sol_stats, out.sol_spatial = stats.to(device, torch.float32), spatial.to(device, torch.float32)
            out.sol_valid = cache.sol_available(dataset_id).to(device)
    return out


def step_draws(
    latents: Tensor, config: TrainerConfig, micro_step: int, rank: int = 0, world_size: int = 1
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """t (B,), noise like latents (B, C, H, W), and per-sample keep flags {"text", "lune", "sol"} (B,) bool.

    Drawn for the global batch (B x world_size) from a generator seeded by (seed, micro_step), this process taking
    rows [rank * B, (rank + 1) * B): a run draws the same numbers on any number of processes and after a resume.
    """
    b, device = latents.shape[0], latents.device
    # SeedSequence mixes (seed, micro_step) into well-spread bits (the CPU generator keeps only the low 32).
    g = torch.Generator(device=device).manual_seed(
        int(np.random.SeedSequence([config.seed, micro_step]).generate_state(1)[0])
    )
    total, mine = b * world_size, slice(rank * b, (rank + 1) * b)
    t = sample_timesteps(
        total,
        device=device,
        shift=config.shift,
        logit_normal=config.logit_normal_sampling,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        generator=g,
    )[mine]
    noise = torch.randn((total, *latents.shape[1:]), generator=g, device=device)[mine]
    u = torch.rand(total, 3, generator=g, device=device)[mine]  # (B, 3): text, lune, sol
    keep = {
        "text": u[:, 0] >= config.text_dropout,
        "lune": u[:, 1] >= config.lune_dropout,
        "sol": u[:, 2] >= config.sol_dropout,
    }
    return t, noise, keep


def kept(keep: Tensor, valid: Tensor | None) -> Tensor:
    """Teacher-forcing mask (B,): not dropped, and the row has real features."""
    return keep if valid is None else keep & valid


def masked_mean(per_sample: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the batch with rows lacking features counted as 0: the fixed divisor B keeps every process's loss on
    the same scale, so N processes average to exactly what one process with the global batch computes."""
    return per_sample.mean() if valid is None else (per_sample * valid).mean()


def spatial_weights(teacher: Teacher, predicted: Tensor | None) -> Tensor | None:
    """The Sol map (B, S, S) that weights the main loss: the teacher's where a row has one, else the model's own
    prediction, detached (the weighting must not become a way to lower the loss)."""
    if teacher.sol_spatial is None:
        return predicted.detach() if predicted is not None else None
    if teacher.sol_valid is None or predicted is None:
        return teacher.sol_spatial
    return torch.where(teacher.sol_valid[:, None, None], teacher.sol_spatial, predicted.detach())
