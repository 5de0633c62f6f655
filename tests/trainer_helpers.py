"""Shared by the trainer tests: synthetic data in the batch contract (latents 16x8x8, T5 (L, 2, 64), CLIP 64,
Lune 64, Sol 4 + 8x8 at 10 buckets) for the `tiny` preset, a trainer factory, and small probes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tinyflux.cache.format import T_BUCKETS
from tinyflux.model.model import TinyFluxConfig, TinyFluxDeep, pack_latents
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.config import TrainerConfig
from tinyflux.trainer.trainer import Trainer
from tinyflux.util.predictions import flow_velocity, flow_x_t

TINY = TinyFluxConfig.preset("tiny")
TEXT_LEN = 6
# Weights trained by a different number of processes (same global batch) agree to float32 rounding only: the
# gradients are summed in another order, and Adam amplifies the difference where a gradient is near zero. Seen:
# 1.3e-6 on an AVX-512 CPU (2026-12-06); a real divergence (a lost or doubled sample) moves weights by ~1e-3.
PROCESS_COUNT_ATOL = 1e-5


def free_port() -> int:
    """A port no one listens on now: launches in parallel test workers (pytest -n) must not share torchrun's 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config_file: str | Path, *args: str) -> list[str]:
    """`accelerate launch --config_file CONFIG --main_process_port FREE ARGS` as a command line."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    return [*launch, "--main_process_port", str(free_port()), *args]


class SyntheticCache(Dataset):
    """n samples in the batch contract's per-sample layout, from a fixed seed."""

    def __init__(self, n: int = 16, seed: int = 0, teachers: bool = True, nan_at: tuple[int, ...] = ()):
        g = torch.Generator().manual_seed(seed)
        # A shared smooth pattern plus a little per-sample noise: structure a few steps can learn, as in real latents.
        pattern = torch.linspace(-1.5, 1.5, 8)[None, :, None] * torch.linspace(1, -1, TINY.in_channels)[:, None, None]
        self.latents = pattern + 0.3 * torch.randn(n, TINY.in_channels, 8, 8, generator=g)
        self.latents[list(nan_at)] = float("nan")
        self.t5 = torch.randn(n, TEXT_LEN, TINY.num_t5_layers, TINY.t5_hidden_size, generator=g)
        self.pooled = torch.randn(n, TINY.pooled_projection_dim, generator=g)
        self.teachers = teachers
        buckets = len(T_BUCKETS)
        self.lune = torch.randn(n, buckets, TINY.lune_expert_dim, generator=g)
        self.sol_stats = torch.rand(n, buckets, 4, generator=g)
        self.sol_spatial = torch.softmax(torch.randn(n, buckets, 64, generator=g), -1).view(n, buckets, 8, 8)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        item = {
            "latents": self.latents[i],
            "t5_embeds": self.t5[i],
            "t5_mask": torch.arange(TEXT_LEN) < 3 + i % 3,
            "clip_pooled": self.pooled[i],
            "index": torch.tensor(i),
            "dataset_id": torch.tensor(0),
        }
        if self.teachers:
            item.update(lune=self.lune[i], sol_stats=self.sol_stats[i], sol_spatial=self.sol_spatial[i])
        return item


class SyntheticStream(IterableDataset):
    """The same samples streamed (already sharded, as the cache's streaming loader is): a new order every epoch."""

    def __init__(self, n: int = 12, seed: int = 0):
        self.cache, self.seed, self.epoch = SyntheticCache(n), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.cache), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return (self.cache[int(i)] for i in order)


def collate(items: list[dict]) -> dict:
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    if "lune" in batch:
        batch["t_buckets"] = T_BUCKETS.clone()
    return batch


def loader(dataset: Dataset, batch_size: int = 4, shuffle: bool = True) -> DataLoader:
    shuffle = shuffle and not isinstance(dataset, IterableDataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def config(tmp_path: Path, **overrides) -> TrainerConfig:
    values = dict(
        dtype="float32",
        total_steps=8,
        warmup_steps=2,
        learning_rate=2e-3,
        gradient_accumulation=2,
        batch_size=4,
        log_every=2,
        save_every_steps=None,
        sample_every=None,
        lune_warmup_steps=0,
        sol_warmup_steps=0,
        ema_decay=0.9,
        log_with="none",
        checkpoint_dir=str(tmp_path / "checkpoints"),
        tensorboard_dir=str(tmp_path / "logs"),
    )
    values.update(overrides)
    return TrainerConfig(**values)


def make_trainer(tmp_path: Path, dataset: Dataset | None = None, seed: int = 0, **overrides) -> Trainer:
    torch.manual_seed(seed)
    trainer = Trainer(TinyFluxDeep(TINY), config(tmp_path, **overrides))
    trainer.setup(loader(dataset if dataset is not None else SyntheticCache()))
    return trainer


def first_batch(dataset: Dataset | None = None, n: int = 4) -> dict:
    return collate([(dataset or SyntheticCache())[i] for i in range(n)])


@torch.no_grad()
def eval_loss(model: TinyFluxDeep, dataset: SyntheticCache) -> float:
    """Plain velocity MSE at fixed timesteps and noise over the whole dataset."""
    g = torch.Generator().manual_seed(123)
    data = dataset.latents
    noise = torch.randn(data.shape, generator=g)
    t = torch.linspace(0.1, 0.9, len(data))
    v = model(
        pack_latents(flow_x_t(data, noise, t)),
        dataset.t5,
        dataset.pooled,
        t,
        TinyFluxDeep.create_img_ids(len(data), 8, 8, None),
    )
    return (v - pack_latents(flow_velocity(data, noise))).square().mean().item()


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters as the state dict shows them (the released 0-dim shape for the scalar gates)."""
    names = {n for n, _ in model.named_parameters()}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value: zero-initialised layers would hide how inputs reach the output."""
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def forward_kwargs(trainer: Trainer, batch: dict) -> dict:
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs, args=args)

    handle = trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.train_step(batch)
    handle.remove()
    return seen


def wait_for_checkpoint(process: subprocess.Popen, checkpoint: Path, timeout: float = 120) -> None:
    """Wait until a running training process has completed `checkpoint`; fail with its output's tail otherwise."""
    deadline = time.monotonic() + timeout
    while not ckpt.is_complete(checkpoint) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.is_complete(checkpoint), process.communicate(timeout=10)[0][-3000:]
