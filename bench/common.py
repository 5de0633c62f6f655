"""What every bench/ script shares: device and dtype choice, timing that synchronises CUDA only around the timed region,
the measured matmul ceiling, FLOPs per training sample, the model sizes and the diffusers twin, synthetic caches, and
the one table format (figure, peer, ratio, fraction of the ceiling).

FLOPs per sample use tinyflux.trainer.metrics.flops_per_sample (the one owner of the formula) with the parameters that
act on every token (`token_matmul_params`), counted by hooks on a meta-device forward: modulation and the expert heads
run once per sample and each double-block stream sees only its own tokens, so counting all parameters would overstate
the work (1.7x at the `deep` preset).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.memory import DatasetCache, EncodingCache, LuneFeatureCache, SolFeatureCache
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer.metrics import flops_per_sample
from tinyflux.trainer.runtime import exclude_cudnn_attention

# A CPU-sized stand-in for `deep`: same shape rules (heads x 64, 3-axis RoPE), 1/4 of the width and 1/5 of the depth.
SMALL = dict(
    hidden_size=128,
    num_attention_heads=2,
    attention_head_dim=64,
    num_double_layers=3,
    num_single_layers=5,
    axes_dims_rope=(16, 24, 24),
    t5_layers=(12,),
    use_cross_attention_sharing=False,
)
PRESET_CHOICES = ("small", "tiny", "deep", "default")


def make_config(preset: str) -> TinyFluxConfig:
    """`small` (CPU stand-in for deep, above) or one of TinyFluxConfig's presets."""
    return TinyFluxConfig(**SMALL) if preset == "small" else TinyFluxConfig.preset(preset)


def diffusers_twin(cfg: TinyFluxConfig) -> nn.Module:
    """diffusers' FluxTransformer2DModel with the same width, depth, heads, RoPE axes and text / pooled widths."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.token_channels,
        num_layers=cfg.num_double_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.t5_hidden_size,
        pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=False,
        axes_dims_rope=cfg.axes_dims_rope,
    )


def compile_twin(model: nn.Module, scope: str, mode: str = "default") -> None:
    """Compile diffusers' twin as the Trainer's compile_scope compiles TinyFlux: each repeated block ("blocks",
    diffusers' compile_repeated_blocks) or the whole model as one graph ("model", nn.Module.compile)."""
    mode_arg = None if mode == "default" else mode
    if scope == "model":
        model.compile(mode=mode_arg)
    else:
        model.compile_repeated_blocks(mode=mode_arg)


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu) | bfloat16 | float32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--flush_denormal",
        action="store_true",
        help="CPU: flush subnormal floats to zero (x86 handles them ~100x slower; see bench/NOTES.md)",
    )


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on a GPU; float32 on a CPU, where bf16 matmuls are emulated and slower."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype {name}: choose auto, bfloat16 or float32")
    return getattr(torch, name)


def setup_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the parsed --device / --dtype / --threads ask for."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "flush_denormal", False):
        torch.set_flush_denormal(True)
    device = pick_device(args.device)
    exclude_cudnn_attention()  # as the Trainer does: the peer runs the same attention kernels
    return device, pick_dtype(args.dtype, device)


def add_zoo_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--zoo",
        default=None,
        help="a zoo directory (default: a tiny zoo written to a temp dir); 'hub': the real models (Hugging Face "
        "cache); 'random-full': the real architectures with random weights, written once to --random_zoo_dir and "
        "reused (4.1 GB); 'random-small': the same writer at the tiny preset's widths",
    )
    ap.add_argument(
        "--random_zoo_dir", default=None, help="where --zoo random-* lives (default runs/random_zoo_full or _small)"
    )


@dataclass
class ZooChoice:
    """What --zoo resolved to: the directory ModelZoo(zoo=...) takes (None: the Hub sources), the TinyFluxConfig preset
    whose text and teacher widths fit its models, and a name for table titles."""

    path: str | None
    preset: str
    label: str


def resolve_zoo(name: str | None, random_dir: str | None, work: Path) -> ZooChoice:
    """--zoo NAME: write the tiny zoo into `work` (None), write or reuse a random zoo ('random-full' / '-small'), or
    take the Hub ('hub') or a directory as it is (its preset from a random zoo's marker, else the tiny zoo's)."""
    from tinyflux.tools.random_zoo import SPECS, ensure_random_zoo, read_marker
    from tinyflux.tools.tiny_zoo import make_tiny_zoo

    if name is None:
        return ZooChoice(str(make_tiny_zoo(work / "zoo")), "tiny", "tiny")
    if name == "hub":
        return ZooChoice(None, "deep", "hub")
    if name.startswith("random-") and name.removeprefix("random-") in SPECS:
        spec = SPECS[name.removeprefix("random-")]
        start = time.perf_counter()
        path = ensure_random_zoo(random_dir or f"runs/random_zoo_{spec.name}", spec=spec)
        print(f"{name} zoo at {path} ({time.perf_counter() - start:.1f} s to write or find)", flush=True)
        return ZooChoice(str(path), spec.preset, name)
    marker = read_marker(name)
    return ZooChoice(name, marker["preset"] if marker else "tiny", f"random-{marker['size']}" if marker else "tiny")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Wall-clock seconds once the device has finished what was queued: the edges of a timed region."""
    sync(device)
    return time.perf_counter()


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the `warmup` first calls, seconds per call after them). Only the edges synchronise, so queued
    device work overlaps the host's as it would in a real loop."""
    start = now(device)
    for _ in range(warmup):
        fn()
    mid = now(device)
    for _ in range(steps):
        fn()
    return mid - start, (now(device) - mid) / max(steps, 1)


def best_of_rounds(
    fn: Callable[[], Any], steps: int, warmup: int, rounds: int, device: torch.device
) -> tuple[float, float]:
    """(seconds of the warm-up calls, the fastest of `rounds` rounds of `steps` calls, per call). On a shared machine
    other processes only ever slow a round down, so the fastest round is what the code costs."""
    warm, best = time_calls(fn, 0, warmup, device)[0], math.inf
    for _ in range(max(rounds, 1)):
        best = min(best, time_calls(fn, steps, 0, device)[1])
    return warm, best


def interleaved_best(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, float]:
    """Fastest seconds per call of each function over `rounds` rounds that call them in turn (after one untimed call
    each), so a burst of load from other processes hits them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(max(rounds, 1)):
        for name, fn in fns.items():
            best[name] = min(best[name], time_calls(fn, 1, 0, device)[1])
    return best


_rss_base_kib = 0.0  # resident memory when reset_peak was last called on a CPU


def _proc_status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return math.nan


def reset_peak(device: torch.device) -> None:
    global _rss_base_kib
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Linux + glibc: hand freed heap pages back first (else the next run reuses them unseen), then "5" resets the
        # process's peak resident set size (VmHWM) to what is resident now
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        _rss_base_kib = _proc_status_kib("VmRSS")
    except OSError:
        _rss_base_kib = math.nan


def peak_gib(device: torch.device) -> float:
    """Peak allocated device memory since reset_peak; on a CPU (Linux) the process's peak resident memory since then,
    above what was resident at the reset (what the measured run added: its model, optimizer, activations); NaN where
    neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return (_proc_status_kib("VmHWM") - _rss_base_kib) / 2**20
    except OSError:
        return math.nan


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """TFLOP/s of a large square matmul in `dtype`, fastest of 5 rounds: what the device really sustains, the
    denominator of every "of ceiling" column (2 * n^3 FLOPs per product). n = 8192 on a GPU, 1024 on a CPU."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    _, sec = best_of_rounds(lambda: torch.mm(a, b), reps, 3, 5, device)
    return 2 * n**3 / sec / 1e12


def token_matmul_params(model: nn.Module, forward: Callable[[], Any], tokens: int) -> float:
    """Linear-layer multiply-adds per token of one forward, as an equivalent parameter count: the P of 6 * P * S.
    `forward` runs the model once on inputs of `tokens` tokens in total (batch x sequence)."""
    macs = 0

    def count(module: nn.Linear, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        nonlocal macs
        macs += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return macs / tokens


def train_flops_per_sample(cfg: TinyFluxConfig, image_tokens: int, text_tokens: int) -> float:
    """Training FLOPs (forward + backward) of one sample of TinyFluxDeep(cfg), with teacher features, through
    metrics.flops_per_sample with the per-token matmul parameters. Counted on the meta device: no memory, no time."""
    side = int(round(image_tokens**0.5))
    with torch.device("meta"):
        model = TinyFluxDeep(cfg)
        b = 1
        args = (
            torch.randn(b, image_tokens, cfg.token_channels),
            torch.randn(b, text_tokens, cfg.num_t5_layers, cfg.t5_hidden_size),
            torch.randn(b, cfg.pooled_projection_dim),
            torch.rand(b),
            TinyFluxDeep.create_img_ids(b, side, image_tokens // side),
        )
        params = token_matmul_params(model, lambda: model(*args), b * (image_tokens + text_tokens))
    layers = cfg.num_double_layers + cfg.num_single_layers
    return flops_per_sample(int(params), image_tokens, text_tokens, layers, cfg.hidden_size)


def peer_train_flops_per_sample(cfg: TinyFluxConfig, image_tokens: int, text_tokens: int) -> float:
    """The same count for diffusers_twin(cfg)."""
    side = int(round(image_tokens**0.5))
    with torch.device("meta"):
        model = diffusers_twin(cfg)
        inputs = (
            torch.randn(1, image_tokens, cfg.token_channels),
            torch.randn(1, text_tokens, cfg.t5_hidden_size),
            torch.randn(1, cfg.pooled_projection_dim),
            torch.rand(1),
            TinyFluxDeep.create_img_ids(1, side, image_tokens // side)[0],
            torch.zeros(text_tokens, 3),
        )
        params = token_matmul_params(model, lambda: model(*inputs, return_dict=False), image_tokens + text_tokens)
    layers = cfg.num_double_layers + cfg.num_single_layers
    return flops_per_sample(int(params), image_tokens, text_tokens, layers, cfg.hidden_size)


def sample_flops_per_image(
    cfg: TinyFluxConfig, image_tokens: int, text_tokens: int, steps: int, cfg_scale: bool
) -> float:
    """Forward FLOPs of one generated image: a third of the training FLOPs per forward, x2 with CFG, x steps."""
    return train_flops_per_sample(cfg, image_tokens, text_tokens) / 3 * steps * (2 if cfg_scale else 1)


@dataclass
class Row:
    """One line of a bench table. `flops`: FLOPs per unit of the figure (per sample, per image), for the ceiling
    fraction; None where it means nothing (seconds, GiB). Ratio is ours / peer."""

    name: str
    ours: float
    peer: float | None = None
    unit: str = ""
    flops: float | None = None
    peer_flops: float | None = None


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _pct(x: float | None, flops: float | None, ceiling: float) -> str:
    if x is None or flops is None or math.isnan(x):
        return "-"
    return f"{100 * x * flops / (ceiling * 1e12):.1f}%"


def print_table(title: str, rows: list[Row], ceiling_tflops: float, device: str, peer: str) -> str:
    """Print (and return) one markdown table: figure, peer's figure, ratio, fraction of the measured matmul ceiling."""
    lines = [
        f"\n{title}",
        f"device: {device}; measured matmul ceiling {ceiling_tflops:.3g} TFLOP/s; peer: {peer}",
        "",
        "| measure | unit | TinyFlux | peer | ratio | TinyFlux of ceiling | peer of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.ours / r.peer if r.peer not in (None, 0) and not math.isnan(r.peer) else None
        lines.append(
            f"| {r.name} | {r.unit} | {_fmt(r.ours)} | {_fmt(r.peer)} | "
            f"{(_fmt(ratio) + 'x') if ratio is not None and not math.isnan(ratio) else '-'} | "
            f"{_pct(r.ours, r.flops, ceiling_tflops)} | {_pct(r.peer, r.peer_flops, ceiling_tflops)} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def synthetic_cache(cfg: TinyFluxConfig, n: int, latent: int, text_len: int, seed: int = 0) -> DatasetCache:
    """n random samples with cfg's shapes, every caption `text_len` T5 tokens long, Lune and Sol features at the
    cache's buckets, stored in float16 as build_cache.py stores them."""
    g = torch.Generator().manual_seed(seed)
    t = len(T_BUCKETS)
    encodings = EncodingCache(
        torch.randn(n, cfg.in_channels, latent, latent, generator=g),
        torch.randn(n, text_len, cfg.num_t5_layers, cfg.t5_hidden_size, generator=g),
        torch.randn(n, cfg.pooled_projection_dim, generator=g),
        captions=[f"synthetic caption {i}" for i in range(n)],
        keys=[f"bench{i:06d}" for i in range(n)],
    )
    spatial = torch.rand(n, t, cfg.sol_spatial_size, cfg.sol_spatial_size, generator=g)
    lune = LuneFeatureCache(torch.randn(n, t, cfg.lune_expert_dim, generator=g), T_BUCKETS)
    sol = SolFeatureCache(torch.rand(n, t, 4, generator=g), spatial / spatial.sum((-1, -2), keepdim=True), T_BUCKETS)
    settings = {"t5_layers": list(cfg.t5_layers), "resolution": latent * 8, "text_regime": cfg.text_regime}
    settings["latent_shift"] = cfg.latent_shift  # the deep preset's: padded text, no VAE shift (released v4.2)
    return DatasetCache(encodings, lune, sol, "bench", settings=settings)


def write_synthetic_shards(
    cfg: TinyFluxConfig, out: Path, n: int, latent: int, text_len: int, shard_size: int = 64
) -> Path:
    """A streaming cache of n synthetic samples, written by the real shard writer (shards, manifest, report)."""
    synthetic_cache(cfg, n, latent, text_len).to_shards(out, shard_size=shard_size)
    return out


@contextmanager
def cold_compile_caches(enabled: bool = True) -> Iterator[None]:
    """Point inductor's and Triton's on-disk caches at an empty directory for the duration, so compile times are
    those of a first run on a fresh machine (a warm cache on a reused machine cuts them several times)."""
    if not enabled:
        yield
        return
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    before = {name: os.environ.get(name) for name in names}
    with scratch_dir() as path:
        for name in names:
            os.environ[name] = str(path / name.lower())
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextmanager
def scratch_dir(keep: str | None = None) -> Iterator[Path]:
    """A temporary directory removed on exit, or `keep` (created, left in place)."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="tinyflux_bench_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
