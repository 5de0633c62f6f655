"""Validation loss as SD3's authors track it (Esser et al., 2024, "Scaling Rectified Flow Transformers", section 5):
the plain velocity loss on held-out data at fixed timesteps, with fixed noise and the full conditioning.

Nothing in it is drawn per run: the timesteps are the midpoints of `validation_timesteps` equal bins of [0, 1], the
noise of a sample is seeded by (VALIDATION_SEED, its cache, its index), text is never dropped and no teacher feature
is given (the Lune and Sol experts use their own predictions, as at sampling). So the same weights give the same figure
in any run, after any resume and on any number of processes, and two runs' curves compare point for point.

Data: a held-out cache (--validation_cache) or a fixed split of the training caches (--validation_fraction: the same
samples whatever the training seed, left out of training). Under several processes each evaluates its share of the
batches (accelerate's prepared DataLoader) and gather_for_metrics joins the per-sample losses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader

from tinyflux.cache.format import TEACHER_TENSORS, decode_sample, load_manifest, shard_paths
from tinyflux.cache.loaders import collate_fn
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer.batch import to_device
from tinyflux.trainer.runtime import whole_graph_errors
from tinyflux.util.predictions import flow_velocity, flow_x_t

logger = logging.getLogger(__name__)

# Fixed, not the run's seed: runs with different seeds validate on the same split with the same noise.
VALIDATION_SEED = 0


def held_out_indices(num_samples: int, fraction: float) -> list[int]:
    """The indices a --validation_fraction split holds out of a cache of num_samples: round(fraction * n), at least
    one, chosen by a permutation seeded by VALIDATION_SEED (a pure function of n and fraction)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must lie in (0, 1)")
    count = max(1, round(fraction * num_samples))
    if count >= num_samples:
        raise ValueError(
            f"validation_fraction={fraction} of {num_samples} samples leaves none to train on: lower it, or pass a "
            "held-out --validation_cache"
        )
    return sorted(np.random.default_rng(VALIDATION_SEED).permutation(num_samples)[:count].tolist())


def read_samples(cache_dir: str | Path, indices: Sequence[int] | None, limit: int, dataset_id: int = 0) -> list[dict]:
    """Up to `limit` samples of a cache (those at `indices`, or the first ones), decoded in manifest order, without
    teacher features (validation gives none)."""
    wanted = None if indices is None else set(list(indices)[:limit])
    last = limit - 1 if wanted is None else max(wanted, default=-1)
    urls = [{"url": str(p)} for p in shard_paths(cache_dir, load_manifest(cache_dir))]
    samples = []
    for index, raw in enumerate(wds.tarfile_samples(urls)):
        if index > last:
            break
        if wanted is not None and index not in wanted:
            continue
        sample = decode_sample(raw)
        for name in ("meta", *(n for names in TEACHER_TENSORS.values() for n in names)):
            sample.pop(name, None)
        samples.append({**sample, "index": index, "dataset_id": dataset_id})
    return samples


def validation_timesteps(count: int) -> Tensor:
    """(count,) midpoints of `count` equal bins of [0, 1]: no endpoint, where the velocity is trivially the data or
    the noise."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def sample_noise(shape: Sequence[int], dataset_id: int, index: int) -> Tensor:
    """The fixed noise of one held-out sample: a CPU generator, so every device and process draws the same."""
    seed = int(np.random.SeedSequence([VALIDATION_SEED, dataset_id, index]).generate_state(1)[0])
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


class Validator:
    """The validation loss of a Trainer's model on held-out samples; keeps the best value and its step."""

    def __init__(self, samples: list[dict[str, Any]], batch_size: int, timesteps: int):
        if not samples:
            raise ValueError("no validation samples")
        self.samples, self.batch_size = samples, batch_size
        self.timesteps = validation_timesteps(timesteps)
        self._loader: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    def loader(self, accelerator: Any) -> Any:
        """The samples in fixed order, split across processes by accelerate (prepared once)."""
        if self._loader is None:
            shapes = [tuple(s["latents"].shape[1:]) for s in self.samples]
            if len(set(shapes)) > 1:  # aspect buckets: batches of one shape each, in order of first appearance
                members = [[i for i, s in enumerate(shapes) if s == shape] for shape in dict.fromkeys(shapes)]
                batches = [m[i : i + self.batch_size] for m in members for i in range(0, len(m), self.batch_size)]
                plain = DataLoader(self.samples, batch_sampler=batches, collate_fn=collate_fn)
            else:
                plain = DataLoader(self.samples, batch_size=self.batch_size, shuffle=False, collate_fn=collate_fn)
            self._loader = accelerator.prepare_data_loader(plain)
        return self._loader

    @torch.no_grad()
    def evaluate(self, trainer: Any) -> dict[str, float]:
        """{"val/loss": mean over samples and timesteps, "val/loss_t0.125": per timestep, ...}, equal on every
        process. The model is in eval mode meanwhile (no dropout) and back in train mode after."""
        acc, model = trainer.accelerator, trainer.model
        was_training = model.training
        model.eval()
        losses = []
        try:
            for batch in self.loader(acc):
                losses.append(acc.gather_for_metrics(self._batch_losses(trainer, batch)))  # (B, T) -> (B_all, T)
        finally:
            model.train(was_training)
        per_t = torch.cat(losses).double().mean(0)  # (T,)
        values = {"val/loss": per_t.mean().item()}
        values.update({f"val/loss_t{t:.3f}": v.item() for t, v in zip(self.timesteps.tolist(), per_t, strict=True)})
        return values

    def _batch_losses(self, trainer: Any, batch: dict[str, Any]) -> Tensor:
        """(B, T) velocity mean squared errors of each sample at each fixed timestep."""
        device, cfg = trainer.accelerator.device, trainer.model.config
        latents = to_device(batch["latents"], device, torch.float32)  # (B, C, H, W)
        b, _, height, width = latents.shape
        noise = torch.stack(
            [
                sample_noise(latents.shape[1:], int(d), int(i))
                for d, i in zip(batch["dataset_id"].tolist(), batch["index"].tolist(), strict=True)
            ]
        ).to(device)  # (B, C, H, W)
        grid = (height // cfg.patch_size, width // cfg.patch_size)
        t5 = to_device(batch["t5_embeds"], device, torch.float32)  # (B, L, K, D)
        mask = to_device(batch["t5_mask"], device) if cfg.text_regime == "masked" else None  # (B, L)
        pooled = to_device(batch["clip_pooled"], device, torch.float32)  # (B, P)
        img_ids = TinyFluxDeep.create_img_ids(b, *grid, device)
        v_target = pack_latents(flow_velocity(latents, noise), cfg.patch_size)  # (B, N, C*p*p)
        out = []
        for t_value in self.timesteps.tolist():
            t = torch.full((b,), t_value, device=device)
            x_t = pack_latents(flow_x_t(latents, noise, t), cfg.patch_size)  # (B, N, C*p*p)
            with trainer.accelerator.autocast(), whole_graph_errors():
                v_pred = trainer._model(
                    trainer._input(x_t),
                    trainer._input(t5),
                    trainer._input(pooled),
                    t,
                    img_ids,
                    encoder_attention_mask=mask,
                    img_shape=grid,
                )
            out.append((v_pred.float() - v_target).square().mean(dim=(1, 2)))  # (B,)
        return torch.stack(out, dim=1)  # (B, T)

    def log(self, trainer: Any) -> float:
        """Evaluate, keep the best loss and its step in the trainer's progress (checkpointed, so a resumed run knows
        it), log both next to the training loss and name the best step in the job's log. Returns the loss."""
        acc, p = trainer.accelerator, trainer.progress
        values = self.evaluate(trainer)
        loss = values["val/loss"]
        if p.best_val_loss is None or loss < p.best_val_loss:
            p.best_val_loss, p.best_val_step = loss, p.step
        acc.log({**values, "val/best_loss": p.best_val_loss, "val/best_step": p.best_val_step}, step=p.step)
        if acc.is_main_process:
            logger.info(
                "step %d validation loss %.6f (best %.6f at step %d)", p.step, loss, p.best_val_loss, p.best_val_step
            )
        return loss
