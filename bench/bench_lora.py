"""A LoRA fine-tune against a full fine-tune of the same model, side by side in one process: trainable parameters,
optimizer state, EMA and checkpoint bytes, and the time of one whole Trainer step. Prints one table with the ratios.

    python bench/bench_lora.py                               # CPU: `small` size, rank 16, batch 2, 16x16 latents
    python bench/bench_lora.py --preset deep --rank 32 --batch 8 --latent 32 --device cuda

Both runs are the real Trainer (one process, float32 on the CPU, the in-memory cache of synthetic samples, fused
AdamW, EMA every step) on the same model; the LoRA run adds peft's adapters on every block's attention and MLP
(lora.DEFAULT_TARGETS) and freezes the rest. Step time is the fastest of --rounds rounds of --steps steps, the two
runs taking turns so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from common import PRESET_CHOICES, add_device_args, describe_device, make_config, scratch_dir, setup_device
from common import synthetic_cache as make_cache
from torch.utils.data import DataLoader

from tinyflux.cache.loaders import CachedDataset, collate_fn
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer.trainer import Trainer, TrainerConfig


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def build(args: argparse.Namespace, work: Path, lora_rank: int | None, dtype: torch.dtype) -> Trainer:
    cfg = make_config(args.preset)
    torch.manual_seed(0)
    config = TrainerConfig(
        dtype=dtype,
        total_steps=10**6,
        warmup_steps=0,
        gradient_accumulation=1,
        batch_size=args.batch,
        log_every=10**6,
        save_every_steps=None,
        sample_every=None,
        log_with="none",
        checkpoint_dir=str(work / "checkpoints"),
        lora_rank=lora_rank,
    )
    trainer = Trainer(TinyFluxDeep(cfg), config)
    cache = make_cache(cfg, n=8 * args.batch, latent=args.latent, text_len=args.text_len)
    trainer.setup(DataLoader(CachedDataset(cache), batch_size=args.batch, shuffle=True, collate_fn=collate_fn))
    trainer.train(epochs=None, max_steps=2)  # warm-up: optimizer state exists, allocator settled
    return trainer


def timed_round(trainer: Trainer, steps: int) -> float:
    start = time.perf_counter()
    trainer.train(epochs=None, max_steps=steps)
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESET_CHOICES, default="small")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--text_len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    with scratch_dir() as work:
        runs = {"LoRA": build(args, work / "lora", args.rank, dtype), "full": build(args, work / "full", None, dtype)}
        best = dict.fromkeys(runs, math.inf)
        for _ in range(args.rounds):
            for name, trainer in runs.items():
                best[name] = min(best[name], timed_round(trainer, args.steps))
        rows = []
        for name, trainer in runs.items():
            state = [t for s in trainer.optimizer.state.values() for t in s.values()]
            saved = trainer.save_checkpoint(work / name / "final")
            rows.append(
                {
                    "trainable parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                    "optimizer state (MiB)": tensor_bytes(state) / 2**20,
                    "EMA (MiB)": tensor_bytes(trainer.ema.shadow.values()) / 2**20,
                    "checkpoint on disk (MiB)": sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) / 2**20,
                    "step time (ms)": best[name] * 1e3,
                    "samples/s": args.batch / best[name],
                }
            )
    model_params = sum(p.numel() for p in TinyFluxDeep(make_config(args.preset)).parameters())
    print(
        f"\nLoRA rank {args.rank} vs full fine-tune: `{args.preset}` ({model_params:,} parameters), batch {args.batch},"
    )
    print(f"{args.latent}x{args.latent} latents, {args.text_len} text tokens; {describe_device(device)}\n")
    print("| measure | LoRA | full fine-tune | LoRA / full |")
    print("|---|---|---|---|")
    for key in rows[0]:
        lora, full = rows[0][key], rows[1][key]
        fmt = "{:,.0f}" if key == "trainable parameters" else "{:.3g}"
        print(f"| {key} | {fmt.format(lora)} | {fmt.format(full)} | {lora / full:.3g}x |")


if __name__ == "__main__":
    main()
