"""The whole Trainer step of TinyFlux against diffusers' FluxTransformer2DModel of the same size in a plain fused-AdamW
loop, side by side in one process. Prints one table: samples/s, compile warm-up, peak memory, the ratio and the
fraction of the measured matmul ceiling.

    python bench/bench_train.py                          # CPU: `small` size, batch 2, 16x16 latents, 128 text tokens
    python bench/bench_train.py --preset deep --batch 16 --latent 32 --compile            # GPU, 256px
    python bench/bench_train.py --preset deep --batch 16 --latent 64 --compile            # GPU, 512px
    python bench/bench_train.py --preset deep --latent 32 --grad_ckpt --find_max_batch    # GPU: batch that fits
    python bench/bench_train.py --preset tiny --batch 8 --latent 8 --text_len 16 --profile   # where a step's time goes
    python bench/bench_train.py --preset tiny --batch 8 --latent 8 --text_len 16 --phases    # each phase, both sides

TinyFlux's step is the real one: Trainer.train on a streaming cache of synthetic samples written by the real shard
writer (Lune and Sol teacher features included), read by make_stream_loader with --workers DataLoader workers, so it
counts data loading, the forward with both expert heads, the losses, backward, gradient clipping, the finiteness
verdict, the optimizer (fused AdamW), the LR scheduler and the EMA. The peer reads pre-made tensors already
on the device and does forward, MSE, backward and AdamW only. `--compile` adds regional compilation of both models
(each repeated block: Trainer's compile_mode, diffusers' compile_repeated_blocks; with `--compile_scope model`
each whole model as one graph).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import pstats
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    PRESET_CHOICES,
    Row,
    add_device_args,
    best_of_rounds,
    cold_compile_caches,
    compile_twin,
    describe_device,
    diffusers_twin,
    make_config,
    matmul_ceiling_tflops,
    now,
    peak_gib,
    peer_train_flops_per_sample,
    print_table,
    reset_peak,
    scratch_dir,
    setup_device,
    time_calls,
    train_flops_per_sample,
    write_synthetic_shards,
)

from tinyflux.cache.loaders import make_stream_loader
from tinyflux.model.config import ATTENTION_BACKENDS, TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer.config import COMPILE_MODES, COMPILE_SCOPES
from tinyflux.trainer.optim import FUSED_ADAMW_DEVICES
from tinyflux.trainer.trainer import Trainer, TrainerConfig

# Device-side and host-side events that make the host wait for the device (or are the wait itself).
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass
class RunResult:
    samples_per_s: float
    step_s: float
    warmup_s: float  # the warm-up steps, compilation and DataLoader start included
    first_step_s: float
    peak_gib: float
    graphs: int  # graphs torch.compile produced (0 in eager)


class TimedLoader:
    """A data loader passed through unchanged, calling events[k]() just before batch k is requested (k counts from
    0 in each iteration). Everything else (state_dict, set_epoch, dataset, epoch) is the wrapped loader's."""

    def __init__(self, loader: Any, events: dict[int, Callable[[], None]]):
        self.loader, self.events = loader, events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        k = 0
        while True:
            if k in self.events:
                self.events[k]()
            batch = next(batches, None)
            if batch is None:
                return
            yield batch
            k += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _reset_dynamo() -> None:
    """A cold compile for the next run; dynamo's counters survive reset(), so clear them too."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def trainer_config(
    args: argparse.Namespace, dtype: torch.dtype, workdir: Path, batch: int, compile: bool
) -> TrainerConfig:
    """The spec's training recipe with the knobs a benchmark needs: one micro-batch per optimizer step, no periodic
    checkpoints, samples or logs (the end-of-train checkpoint falls outside the timed steps)."""
    return TrainerConfig(
        batch_size=batch,
        gradient_accumulation=1,
        total_steps=10**9,
        dtype=dtype,
        compile_mode=args.compile_mode if compile else None,
        compile_scope=args.compile_scope if compile else "blocks",
        gradient_checkpointing=args.grad_ckpt,
        attention_backend=args.attention_backend,
        save_every_steps=None,
        sample_every=None,
        log_every=10**9,
        log_with="none",
        # One directory per run: the Trainer refuses a directory that holds another run's checkpoints.
        checkpoint_dir=tempfile.mkdtemp(prefix="checkpoints_", dir=workdir),
        num_workers=args.workers,
        # every synthetic caption is text_len long: padding to a larger bucket would add tokens the peer lacks
        text_buckets=[args.text_len],
    )


def run_trainer(
    cfg: TinyFluxConfig,
    cache_dir: Path,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    workdir: Path,
    *,
    batch: int,
    compile: bool,
    steps: int,
    warmup: int,
    rounds: int = 1,
    profile_events: dict[int, Callable[[], None]] | None = None,
) -> RunResult:
    """Trainer.train for warmup + rounds * steps (+1) optimizer steps on the streaming cache, in one call (one
    DataLoader start). Times from the loader's side: batch k is requested right after step k-1 has finished (EMA
    included); the step time is that of the fastest round."""
    _reset_dynamo()
    reset_peak(device)
    trainer = Trainer(TinyFluxDeep(cfg), trainer_config(args, dtype, workdir, batch, compile))
    loader = make_stream_loader(
        str(cache_dir),
        batch_size=batch,
        num_workers=args.workers,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=trainer.config.shuffle_buffer,
        infinite=True,
        model_config=cfg,
        pin_memory=device.type == "cuda",
    )
    # Marks before batch 0 and 1 (the first step), at the end of warm-up and after each timed round of `steps`.
    edges = [0, 1] + [warmup + r * steps for r in range(rounds + 1)]
    marks: dict[int, float] = {}
    events: dict[int, Callable[[], None]] = {k: (lambda k=k: marks.__setitem__(k, now(device))) for k in edges}
    for k, extra in (profile_events or {}).items():
        base = events.get(k)
        events[k] = lambda base=base, extra=extra: (base() if base else None, extra())
    trainer.setup(TimedLoader(loader, events))
    try:
        trainer.train(epochs=None, max_steps=warmup + rounds * steps + 1)
        ends = [warmup + r * steps for r in range(rounds + 1)]
        step_s = min(marks[b] - marks[a] for a, b in zip(ends, ends[1:], strict=False)) / steps
        return RunResult(
            samples_per_s=batch / step_s,
            step_s=step_s,
            warmup_s=marks[warmup] - marks[0],
            first_step_s=marks[1] - marks[0],
            peak_gib=peak_gib(device),
            graphs=_unique_graphs() if compile else 0,
        )
    finally:
        shutil.rmtree(trainer.config.checkpoint_dir, ignore_errors=True)  # a `deep` checkpoint is ~4 GB
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()


class PeerLoop:
    """diffusers' FluxTransformer2DModel of the same size in a plain loop: forward + MSE, backward, fused AdamW (as the
    Trainer) on pre-made tensors already on the device; bf16 autocast over float32 weights, as the Trainer does."""

    def __init__(
        self, cfg: TinyFluxConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, compile: bool
    ):
        self.device, self.dtype = device, dtype
        b, s, p = args.batch, args.latent, cfg.patch_size
        g = torch.Generator().manual_seed(0)
        self.inputs = (
            pack_latents(torch.randn(b, cfg.in_channels, s, s, generator=g), p).to(device),  # (B, N, C*p*p)
            torch.randn(b, args.text_len, cfg.t5_hidden_size, generator=g).to(device),  # (B, L, D)
            torch.randn(b, cfg.pooled_projection_dim, generator=g).to(device),
            torch.rand(b, generator=g).to(device),  # diffusers scales by 1000 itself
            TinyFluxDeep.create_img_ids(1, s // p, s // p, device)[0],  # (N, 3)
            torch.zeros(args.text_len, 3, device=device),
        )
        self.target = torch.randn_like(self.inputs[0])
        self.model = diffusers_twin(cfg).to(device)
        if args.grad_ckpt:
            self.model.enable_gradient_checkpointing()
        if compile:
            compile_twin(self.model, args.peer_compile_scope or args.compile_scope, args.compile_mode)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type in FUSED_ADAMW_DEVICES)

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            v = self.model(*self.inputs, return_dict=False)[0]
        return (v.float() - self.target).square().mean()

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.loss().backward()
        self.optimizer_step()


def run_peer(
    cfg: TinyFluxConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, *, compile: bool
) -> RunResult:
    """The PeerLoop's steps, timed as run_trainer times the Trainer's."""
    _reset_dynamo()
    reset_peak(device)
    peer = PeerLoop(cfg, args, device, dtype, compile)
    first, _ = time_calls(peer.step, 0, 1, device)
    rest, step_s = best_of_rounds(peer.step, args.steps, max(args.warmup - 1, 0), args.rounds, device)
    b = args.batch
    return RunResult(b / step_s, step_s, first + rest, first, peak_gib(device), _unique_graphs() if compile else 0)


def _median_run(runs: list[RunResult]) -> RunResult:
    """Each field's median over the runs (the samples/s and step time of the same run)."""
    mid = sorted(runs, key=lambda r: r.samples_per_s)[len(runs) // 2]
    return RunResult(
        mid.samples_per_s, mid.step_s, *(statistics.median(getattr(r, f) for r in runs)
                                         for f in ("warmup_s", "first_step_s", "peak_gib", "graphs")),
    )  # fmt: skip


def compile_seconds(r: RunResult, warmup: int) -> float:
    """Warm-up time beyond `warmup` warm steps: compilation, autotuning, DataLoader start."""
    return max(r.warmup_s - warmup * r.step_s, 0.0)


def benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    cfg = make_config(args.preset)
    n_img = (args.latent // cfg.patch_size) ** 2
    flops, peer_flops = (
        train_flops_per_sample(cfg, n_img, args.text_len),
        peer_train_flops_per_sample(cfg, n_img, args.text_len),
    )
    ceiling = matmul_ceiling_tflops(device, dtype)
    modes = [False, True] if args.compile else [False]
    rows: list[Row] = []
    with scratch_dir(args.workdir) as work:
        cache = write_synthetic_shards(cfg, work / "cache", args.cache_samples, args.latent, args.text_len)
        for compiled in modes:
            label = f"compiled ({args.compile_scope})" if compiled else "eager"
            pairs = []
            for _ in range(args.repeats):  # interleaved: a busy spell on a shared machine hits both sides
                ours = run_trainer(
                    cfg, cache, args, device, dtype, work, batch=args.batch, compile=compiled, steps=args.steps,
                    warmup=args.warmup, rounds=args.rounds,
                )  # fmt: skip
                pairs.append((ours, run_peer(cfg, args, device, dtype, compile=compiled)))
            if args.repeats > 1:
                print(
                    f"{label}: ratio per pair " + " ".join(f"{o.samples_per_s / q.samples_per_s:.3f}" for o, q in pairs)
                )
            ours, peer = (_median_run([pair[i] for pair in pairs]) for i in (0, 1))
            rows.append(
                Row(f"train step, {label}", ours.samples_per_s, peer.samples_per_s, "samples/s", flops, peer_flops)
            )
            rows.append(Row(f"time per step, {label}", ours.step_s * 1e3, peer.step_s * 1e3, "ms"))
            rows.append(Row(f"warm-up beyond steady steps, {label}", compile_seconds(ours, args.warmup),
                            compile_seconds(peer, args.warmup), "s"))  # fmt: skip
            if compiled:
                rows.append(Row("graphs compiled", ours.graphs, peer.graphs, "graphs"))
            rows.append(Row(f"peak memory, {label}", ours.peak_gib, peer.peak_gib, "GiB"))
    title = (
        f"Trainer step vs diffusers: preset={args.preset} batch={args.batch} latent={args.latent}x{args.latent} "
        f"({n_img} image + {args.text_len} text tokens) dtype={str(dtype).removeprefix('torch.')} "
        f"workers={args.workers} grad_ckpt={args.grad_ckpt}, best of {args.rounds} x {args.steps} steps, median of "
        f"{args.repeats} interleaved run(s); "
        f"{flops / 1e12:.4g} TFLOP per TinyFlux sample (peer {peer_flops / 1e12:.4g})"
    )
    ceiling = max(ceiling, matmul_ceiling_tflops(device, dtype))  # again at the end: a busy moment only lowers it
    print_table(
        title, rows, ceiling, describe_device(device), "diffusers FluxTransformer2DModel, same size, plain AdamW loop"
    )


def find_max_batch(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """The largest batch whose Trainer step fits in the device's memory (with --grad_ckpt: the 80 GiB question).
    Peak memory is linear in the batch: measured at two batches, extrapolated, then the prediction is run and
    backed off by 10% until it fits."""
    if device.type != "cuda":
        raise SystemExit("--find_max_batch measures GPU memory: run it on a CUDA device")
    cfg = make_config(args.preset)
    budget = min(args.memory_gib, torch.cuda.get_device_properties(device).total_memory / 2**30)
    tried: list[tuple[int, float]] = []
    with scratch_dir(args.workdir) as work:
        cache = write_synthetic_shards(cfg, work / "cache", args.cache_samples, args.latent, args.text_len)

        def peak_at(batch: int) -> float:
            try:
                r = run_trainer(cfg, cache, args, device, dtype, work, batch=batch, compile=args.compile, steps=1,
                                warmup=1)  # fmt: skip
                peak = r.peak_gib
            except RuntimeError as e:  # torch.OutOfMemoryError, or a cuBLAS / cuDNN workspace allocation failing
                if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                    raise
                peak = math.inf
            gc.collect()
            torch.cuda.empty_cache()
            tried.append((batch, peak))
            print(f"batch {batch}: peak {peak:.2f} GiB", flush=True)
            return peak

        b1, b2 = args.batch, 2 * args.batch
        p1, p2 = peak_at(b1), peak_at(b2)
        per_sample = (p2 - p1) / (b2 - b1)
        best = b2 if p2 <= budget else (b1 if p1 <= budget else 0)
        guess = int((budget - p1) / per_sample) + b1 if math.isfinite(per_sample) and per_sample > 0 else b2
        for _ in range(4):
            guess = max(guess // 8 * 8, best + 1)
            if peak_at(guess) <= budget:
                best = max(best, guess)
                break
            guess = int(guess * 0.9)
    rows = [Row(f"peak memory at batch {b}", peak, None, "GiB") for b, peak in tried]
    rows.append(Row(f"largest batch that fits in {budget:.1f} GiB", best, None, "samples"))
    rows.append(Row("memory per sample (slope)", per_sample, None, "GiB"))
    title = (
        f"Largest Trainer batch: preset={args.preset} latent={args.latent}x{args.latent} grad_ckpt={args.grad_ckpt} "
        f"compile={args.compile} dtype={str(dtype).removeprefix('torch.')}"
    )
    print_table(title, rows, matmul_ceiling_tflops(device, dtype), describe_device(device), "none")


def profile(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Where a Trainer step's time goes: torch.profiler over `steps` steps (ops by self CPU time, host syncs per step,
    on CUDA the share of wall time the GPU is busy), then cProfile over as many (Python functions by own time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = make_config(args.preset)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = torch_profile(activities=activities)
    py = cProfile.Profile()
    w, n = args.warmup, args.steps
    marks: dict[str, float] = {}
    events = {
        w: lambda: (marks.__setitem__("t0", now(device)), prof.__enter__()),
        w + n: lambda: (prof.__exit__(None, None, None), marks.__setitem__("t1", now(device)), py.enable()),
        w + 2 * n: lambda: py.disable(),
    }
    with scratch_dir(args.workdir) as work:
        cache = write_synthetic_shards(cfg, work / "cache", args.cache_samples, args.latent, args.text_len)
        run_trainer(cfg, cache, args, device, dtype, work, batch=args.batch, compile=args.compile, steps=2 * n,
                    warmup=w, profile_events=events)  # fmt: skip
    wall_us = (marks["t1"] - marks["t0"]) * 1e6
    averages = prof.key_averages()
    print(
        f"\nprofile: preset={args.preset} batch={args.batch} latent={args.latent} {n} steps "
        f"on {describe_device(device)}"
    )
    print(f"wall time per step {wall_us / n / 1e3:.2f} ms")
    syncs = {e.key: e.count / n for e in averages if e.key in SYNC_EVENTS}
    print(f"host syncs per step: {syncs or 'none'}")
    if device.type == "cuda":
        # Kernels and copies on the device, one stream: their summed durations are the time the GPU was busy.
        kernels_on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels_on_device)
        print(f"device kernels / copies per step: {len(kernels_on_device) / n:.0f}")
        print(f"GPU busy {100 * busy / wall_us:.1f}% of wall time (kernels {busy / n / 1e3:.2f} ms per step)")
    kernels = sum(e.count for e in averages if e.key.startswith("aten::")) / n
    print(f"aten ops per step: {kernels:.0f}")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    out = io.StringIO()
    pstats.Stats(py, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"Python functions by own time (cProfile, {n} steps):\n{out.getvalue()[-6000:]}")


@contextmanager
def timed_phases(totals: dict[str, float], device: torch.device) -> Iterator[None]:
    """Wall seconds spent in each phase of the Trainer's step, summed into `totals` (the device synchronised at
    each edge, so on a GPU a phase's own kernels are in it): methods patched for the duration of the block."""
    from accelerate import Accelerator

    import tinyflux.trainer.trainer as trainer_module

    patched = [
        (Trainer, "_micro_step", "step"),
        # the call, not forward: a model compiled whole (compile_scope="model") would trace a patched forward
        (TinyFluxDeep, "__call__", "model forward"),
        (Trainer, "train_step", "train_step"),
        (Trainer, "_draws", "draws and teacher features"),
        (Trainer, "_teacher", "draws and teacher features"),
        (Accelerator, "backward", "backward"),
        (trainer_module, "clip_in_fused_step", "gradient norm (and clipping)"),
        (Accelerator, "clip_grad_norm_", "gradient norm (and clipping)"),
        # The torch optimizer's own methods: the Trainer calls them past accelerate's wrapper where it adds nothing.
        (torch.optim.AdamW, "step", "optimizer step"),
        (torch.optim.Optimizer, "zero_grad", "zero_grad"),
        (trainer_module.EMA, "update", "EMA"),
    ]
    # (owner, name, function, whether the owner defines it itself: an inherited one is deleted again, not copied in)
    originals = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name, _ in patched]

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            start = now(device)
            try:
                return fn(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + now(device) - start

        return call

    try:
        for (owner, name, label), (_, _, fn, _) in zip(patched, originals, strict=True):
            setattr(owner, name, timed(fn, label))
        yield
    finally:
        for owner, name, fn, own in originals:
            if own:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)


def phases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Where the time of a whole step goes, TinyFlux's Trainer beside the peer's plain loop: each phase's mean wall
    time over `steps` steps after `warmup`. Every edge synchronises the device (so this is no throughput figure)."""
    cfg = make_config(args.preset)
    n, w = args.steps * args.rounds, args.warmup
    totals: dict[str, float] = {}
    marks: dict[str, float] = {}
    counted: dict[str, float] = {}  # totals of the n steps between the marks
    events = {
        w: lambda: (totals.clear(), marks.__setitem__("t0", now(device))),
        w + n: lambda: (marks.__setitem__("t1", now(device)), counted.update(totals)),
    }
    with scratch_dir(args.workdir) as work:
        cache = write_synthetic_shards(cfg, work / "cache", args.cache_samples, args.latent, args.text_len)
        with timed_phases(totals, device):
            run_trainer(cfg, cache, args, device, dtype, work, batch=args.batch, compile=args.compile, steps=n + 1,
                        warmup=w, profile_events=events)  # fmt: skip
    ours = {k: v / n for k, v in counted.items()}
    ours["whole step (data included)"] = (marks["t1"] - marks["t0"]) / n
    ours["losses and inputs"] = ours["train_step"] - ours["model forward"] - ours["draws and teacher features"]
    ours["data"] = ours["whole step (data included)"] - ours["step"]
    accounted = ("backward", "gradient norm (and clipping)", "optimizer step", "zero_grad", "EMA", "train_step")
    ours["bookkeeping (accumulation, verdict, meter, schedule)"] = ours["step"] - sum(ours.get(k, 0) for k in accounted)
    peer = run_peer_phases(cfg, args, device, dtype, n, w)
    rows = [
        Row(name, ours.get(name, 0.0) * 1e3, peer.get(name, 0.0) * 1e3, "ms")
        for name in (
            "whole step (data included)", "data", "draws and teacher features", "model forward", "losses and inputs",
            "backward", "gradient norm (and clipping)", "optimizer step", "zero_grad", "EMA",
            "bookkeeping (accumulation, verdict, meter, schedule)",
        )
    ]  # fmt: skip
    print_table(
        f"Where a step's time goes: preset={args.preset} batch={args.batch} latent={args.latent} text={args.text_len}"
        f" compile={args.compile}, mean of {n} steps after {w}, every phase's edges synchronised",
        rows, float("nan"), describe_device(device),
        "diffusers FluxTransformer2DModel, plain loop (its forward row holds the MSE, its optimizer row zero_grad)",
    )  # fmt: skip


def run_peer_phases(
    cfg: TinyFluxConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, n: int, w: int
) -> dict[str, float]:
    """The PeerLoop's three phases, each timed: mean seconds over n steps after w."""
    peer = PeerLoop(cfg, args, device, dtype, args.compile)
    totals = dict.fromkeys(("model forward", "backward", "optimizer step"), 0.0)
    for i in range(w + n):
        t0 = now(device)
        loss = peer.loss()
        t1 = now(device)
        loss.backward()
        t2 = now(device)
        peer.optimizer_step()
        t3 = now(device)
        if i >= w:
            for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                totals[k] += dt
    out = {k: v / n for k, v in totals.items()}
    out["whole step (data included)"] = sum(out.values())
    return out


def attention_check(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """SDPA forward + backward at the step's attention shape, with the text key mask the Trainer always passes and
    without one (diffusers' call), for each SDPA backend that accepts the call. The cuDNN backend is never tried.
    Then FlexAttention, compiled as its docs require, with the same mask as the BlockMask the model's "flex" backend
    builds (TinyFluxDeep.set_attention_backend), and without one; plus that BlockMask's build time (once per forward)
    and flex's largest difference from SDPA's output. Flex has no CPU backward: on a CPU its timed rows read NaN."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from tinyflux.model.math import flex_masked_attention, key_padding_block_mask

    cfg = make_config(args.preset)
    b, h, d = args.batch, cfg.num_attention_heads, cfg.attention_head_dim
    seq = (args.latent // cfg.patch_size) ** 2 + args.text_len
    layers = cfg.num_double_layers + cfg.num_single_layers
    q, k, v = (torch.randn(b, h, seq, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, 1, 1, seq, dtype=torch.bool, device=device)
    mask[:, ..., args.text_len // 2 : args.text_len] = False  # half the text padded, as a mixed-length batch has
    flops = 4 * b * h * seq * seq * d * 3  # QK^T and PV, 2 FLOPs per multiply-add, x3 with backward
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    rows = []

    def add_rows(name: str, times: dict[str, float]) -> None:
        rows.append(Row(f"{name} fwd+bwd, one layer (x{layers} per step)", times["masked"] * 1e3,
                        times["no mask"] * 1e3, "ms"))  # fmt: skip
        rows.append(Row(f"{name} throughput", flops / times["masked"] / 1e12, flops / times["no mask"] / 1e12,
                        "TFLOP/s", 1e12, 1e12))  # fmt: skip

    for backend in backends:
        times = {}
        for label, m in (("masked", mask), ("no mask", None)):

            def call(m: torch.Tensor | None = m) -> None:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
                out.sum().backward()

            try:
                with sdpa_kernel([backend]):
                    times[label] = best_of_rounds(call, args.steps, 2, args.rounds, device)[1]
            except RuntimeError:
                times[label] = math.nan  # this backend refuses the call (e.g. flash with a mask)
        add_rows(backend.name, times)

    # Flex: the same mask as one BlockMask (its tiles of only padding are skipped, the rest run fused). The dense
    # FLOPs count stays the throughput's numerator, so skipped tiles show up as a higher figure, not fewer FLOPs.
    keep = mask[:, 0, 0]  # (B, S)
    block_mask = key_padding_block_mask(keep)
    compiled = torch.compile(flex_attention)
    times, warm = {}, {}
    for label, bm in (("masked", block_mask), ("no mask", None)):

        def call(bm: Any = bm) -> None:
            compiled(q, k, v, block_mask=bm).sum().backward()

        try:
            warm[label], times[label] = best_of_rounds(call, args.steps, 2, args.rounds, device)
        except Exception as err:  # any refusal (no CPU backward, no Triton) leaves a NaN row
            warm[label] = times[label] = math.nan
            print(f"FLEX {label}: refused ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    add_rows("FLEX (torch.compile)", times)
    rows.append(Row("FLEX compile + 2 warm-up calls", warm["masked"], warm["no mask"], "s"))
    build = best_of_rounds(lambda: key_padding_block_mask(keep), args.steps, 2, args.rounds, device)[1]
    rows.append(Row("FLEX BlockMask build (once per forward)", build * 1e3, None, "ms"))
    # The model's own call (math.flex_masked_attention): compiled on an accelerator, the eager reference on CPU.
    qd, kd, vd, diffs = q.detach(), k.detach(), v.detach(), []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # CPU: known and intended
        for bm, m in ((block_mask, mask), (None, None)):
            ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=m).transpose(1, 2).flatten(2)
            diffs.append((flex_masked_attention(qd, kd, vd, bm) - ref).abs().max().item())
    rows.append(Row("FLEX max abs difference from SDPA's output", diffs[0], diffs[1], "abs"))
    dtype_name = str(dtype).removeprefix("torch.")
    title = (
        f"Attention kernels: B={b} H={h} S={seq} Dh={d} dtype={dtype_name}; TinyFlux column = with the "
        f"(B,1,1,S) text key mask the Trainer passes (flex: the same keys as a BlockMask), peer column = without "
        f"(diffusers), NaN = refused"
    )
    print_table(title, rows, matmul_ceiling_tflops(device, dtype), describe_device(device), "the same call, no mask")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=PRESET_CHOICES, help="small = CPU stand-in for deep")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=16, help="latent side: 32 = 256px, 64 = 512px")
    ap.add_argument("--text_len", type=int, default=128, help="T5 tokens of every cached caption")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest counts (shared machines)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="TinyFlux / peer run pairs, interleaved; the table shows medians"
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, autotune)")
    ap.add_argument(
        "--workers", type=int, default=None, help="streaming DataLoader workers (default 4 on cuda, 0 on cpu)"
    )
    ap.add_argument(
        "--cache_samples", type=int, default=None, help="samples in the synthetic cache (default 8 batches)"
    )
    ap.add_argument("--warm_cache", action="store_true", help="let compilation use the on-disk caches of earlier runs")
    ap.add_argument("--compile", action="store_true", help="also run both models with each block compiled")
    ap.add_argument(
        "--compile_mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode of --compile on both sides (reduce-overhead: CUDA graphs, static shapes only)",
    )
    ap.add_argument(
        "--compile_scope",
        default="blocks",
        choices=COMPILE_SCOPES,
        help="what --compile compiles on both sides: each block (the Trainer's and diffusers' regional compilation) "
        "or the whole model as one graph (compile_scope='model'; diffusers' nn.Module.compile)",
    )
    ap.add_argument(
        "--peer_compile_scope", default=None, choices=COMPILE_SCOPES, help="the peer's, when not --compile_scope"
    )
    ap.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in both models")
    ap.add_argument("--find_max_batch", action="store_true", help="GPU: the largest batch that fits (see --memory_gib)")
    ap.add_argument("--memory_gib", type=float, default=80.0, help="memory budget of --find_max_batch")
    ap.add_argument("--profile", action="store_true", help="profile the Trainer step instead of the side-by-side table")
    ap.add_argument("--phases", action="store_true", help="time each phase of both steps instead (edges synchronised)")
    ap.add_argument(
        "--attention", action="store_true", help="time SDPA backends and FlexAttention with and without the text mask"
    )
    ap.add_argument(
        "--attention_backend", default="sdpa", choices=ATTENTION_BACKENDS, help="the Trainer's attention kernel"
    )
    ap.add_argument("--top", type=int, default=15, help="rows of the --profile tables")
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep the synthetic cache here (default: a temp dir); checkpoints are deleted after each run",
    )
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else 0
    if args.cache_samples is None:
        args.cache_samples = max(8 * args.batch, 16 * max(args.workers, 1))
    mode = (
        find_max_batch
        if args.find_max_batch
        else attention_check
        if args.attention
        else profile
        if args.profile
        else phases
        if args.phases
        else None
    )
    with cold_compile_caches(args.compile and not args.warm_cache):
        (mode or benchmark)(args, device, dtype)


if __name__ == "__main__":
    main()
