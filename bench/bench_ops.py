"""Kernel-launching ops per whole training step: TinyFlux's Trainer step against diffusers' FluxTransformer2DModel of
the same size in a plain fused-AdamW loop, counted on the CPU with torch.profiler. Prints one table, with TinyFlux's
ops split into forward, backward, optimizer and the rest of the step.

    python bench/bench_ops.py                        # `deep`, batch 1, 8x8 latents (16 image + 128 text tokens)
    python bench/bench_ops.py --compile              # the same with each block compiled (both sides)
    python bench/bench_ops.py --compile --compile_scope model   # each whole model compiled as one graph

On a GPU each such op is (at least) one kernel launch, 5-10 us of host time; at the sizes users train, the step is
bound by them (bench/NOTES.md). The count does not depend on batch or resolution, so a small latent keeps the CPU run
short. An op counts when it is an aten op that is not a view (its schema returns an alias of an input) nor pure
metadata, or a kernel inductor generated for a compiled region, and no such op runs below it (until 2026-12-06 any aten
op below it, an `empty` included, hid it: matmuls and attention were not counted); a multi-tensor op (_foreach_*, _fused_*) counts once, as on CUDA (the CPU loops over its tensors). TinyFlux's step is the real one (Trainer.train: text padding, draws, teacher interpolation, forward with both
expert heads, three losses, backward, gradient clipping, verdict, fused AdamW, LR schedule, EMA) on one pre-collated
batch; the peer's is forward, MSE, backward, AdamW on tensors already on the device.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
import torch._inductor.config as inductor_config
from common import PRESET_CHOICES, Row, compile_twin, diffusers_twin, make_config, print_table
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import IterableDataset

from tinyflux.cache.format import T_BUCKETS
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer.config import COMPILE_SCOPES
from tinyflux.trainer.optim import FUSED_ADAMW_DEVICES
from tinyflux.trainer.trainer import Trainer, TrainerConfig

OP_NAMESPACES = ("aten::", "mkldnn::", "onednn::")  # the last two: the CPU matmuls compiled regions call
NO_KERNEL = {  # allocate, relabel or answer a question: no kernel (_unsafe_view: a view whose schema does not say so;
    # type_as to its own dtype returns its input, and to another one it calls a copy, which counts instead)
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::set_", "aten::result_type",
    "aten::_nnpack_available", "aten::_unsafe_view", "aten::type_as",
}  # fmt: skip


@cache
def _is_view(name: str) -> bool:
    try:
        schemas = torch._C._jit_get_schemas_for_operator(name)
    except RuntimeError:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for s in schemas for r in s.returns)


def _phase(event: Any) -> str:
    """forward (under the model's record_function), backward (the autograd engine), optimizer, or other."""
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if e.name.startswith("Optimizer.step#"):
            return "optimizer"
        if e.name == "model forward":
            return "forward"
        e = e.cpu_parent
    return "other"


def _multi_tensor(name: str) -> bool:
    return name.startswith(("aten::_foreach_", "aten::_fused_"))


def _launching(e: Any) -> bool:
    """A kernel of a compiled region ("graph_N_cpp_fused_...", profiled: see main), or an aten op that is not a view
    and not pure metadata."""
    if "cpp_fused" in e.name:
        return True
    return e.name.startswith(OP_NAMESPACES) and e.name not in NO_KERNEL and not _is_view(e.name)


def _launches_below(e: Any, memo: dict[int, bool]) -> bool:
    if id(e) not in memo:
        memo[id(e)] = any(_launching(c) or _launches_below(c, memo) for c in e.cpu_children)
    return memo[id(e)]


def launching_ops(prof: Any, by_name: Counter | None = None) -> Counter:
    """Leaf launching ops of a profile (no launching op below them: an `mm` that only allocates its output counts),
    by phase (and into by_name, by (phase, op name)). A multi-tensor op (_foreach_*, _fused_*) counts once: on CUDA
    it is one launch per chunk of tensors, where the CPU loops over them one aten call each."""
    counts: Counter = Counter()
    memo: dict[int, bool] = {}
    for e in prof.events():
        if not _launching(e):
            continue
        parent, inside_multi = e.cpu_parent, False
        while parent is not None and not inside_multi:
            inside_multi, parent = _multi_tensor(parent.name), parent.cpu_parent
        if inside_multi:
            continue
        if not _multi_tensor(e.name) and _launches_below(e, memo):
            continue
        counts[_phase(e)] += 1
        if by_name is not None:
            by_name[_phase(e), e.name] += 1
    return counts


def _marked(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` inside a record_function named "model forward". Around the call, not in hooks: a model compiled whole
    (--compile_scope model) would trace its hooks into its graph."""

    def marked(*args: Any, **kwargs: Any) -> Any:
        with record_function("model forward"):
            return call(*args, **kwargs)

    return marked


class _OneBatch(IterableDataset):
    """One pre-collated batch, forever: the data is already made, as the peer's is."""

    def __init__(self, batch: dict[str, Any], events: dict[int, Any]):
        self.batch, self.events = batch, events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = 0
        while True:
            if k in self.events:
                self.events[k]()
            yield dict(self.batch)
            k += 1


class _Loader:
    """A loader whose .dataset is iterable: Trainer.setup takes it as self-sharding and uses it as it is, as it does
    the streaming loader (a DataLoader would be re-wrapped by accelerate)."""

    def __init__(self, dataset: _OneBatch):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)


def synthetic_batch(cfg: TinyFluxConfig, batch: int, latent: int, text_len: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    t = len(T_BUCKETS)
    spatial = torch.rand(batch, t, cfg.sol_spatial_size, cfg.sol_spatial_size, generator=g)
    return {
        "latents": torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
        "t5_embeds": torch.randn(batch, text_len, cfg.num_t5_layers, cfg.t5_hidden_size, generator=g),
        "t5_mask": torch.ones(batch, text_len, dtype=torch.bool),
        "clip_pooled": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "lune": torch.randn(batch, t, cfg.lune_expert_dim, generator=g),
        "sol_stats": torch.rand(batch, t, 4, generator=g),
        "sol_spatial": spatial / spatial.sum((-1, -2), keepdim=True),
        "t_buckets": T_BUCKETS.clone(),
        "index": torch.arange(batch),
        "dataset_id": torch.zeros(batch, dtype=torch.long),
    }


def trainer_ops(cfg: TinyFluxConfig, args: argparse.Namespace, by_name: Counter) -> Counter:
    """Ops of `args.steps` Trainer steps after `args.warmup`, per step, by phase."""
    torch.manual_seed(0)
    model = TinyFluxDeep(cfg)
    work = tempfile.mkdtemp(prefix="bench_ops_")
    config = TrainerConfig(
        batch_size=args.batch, gradient_accumulation=1, total_steps=10**9, dtype=torch.float32,
        compile_mode="default" if args.compile else None, compile_scope=args.compile_scope if args.compile else "blocks",
        save_every_steps=None, sample_every=None,
        log_every=10**9, log_with="none", checkpoint_dir=work, warmup_steps=0,
    )  # fmt: skip
    prof = profile(activities=[ProfilerActivity.CPU])
    events = {args.warmup: prof.start, args.warmup + args.steps: prof.stop}
    trainer = Trainer(model, config)
    trainer.setup(_Loader(_OneBatch(synthetic_batch(cfg, args.batch, args.latent, args.text_len), events)))
    trainer._model = _marked(trainer._model)  # one process: the prepared model is the model, its wrapper no module
    try:  # one step more: asking for its batch stops the profiler, once the counted steps (EMA included) ended
        trainer.train(epochs=None, max_steps=args.warmup + args.steps + 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Counter({k: v / args.steps for k, v in launching_ops(prof, by_name).items()})


def peer_ops(cfg: TinyFluxConfig, args: argparse.Namespace) -> Counter:
    """Ops of `args.steps` steps of the plain loop after `args.warmup`, per step, by phase."""
    b, s, p = args.batch, args.latent, cfg.patch_size
    g = torch.Generator().manual_seed(0)
    x = pack_latents(torch.randn(b, cfg.in_channels, s, s, generator=g), p)  # (B, N, C*p*p)
    txt = torch.randn(b, args.text_len, cfg.t5_hidden_size, generator=g)  # (B, L, D)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    t = torch.rand(b, generator=g)
    img_ids = TinyFluxDeep.create_img_ids(1, s // p, s // p, None)[0]  # (N, 3)
    txt_ids = torch.zeros(args.text_len, 3)
    target = torch.randn_like(x)
    model = diffusers_twin(cfg)
    if args.compile:
        compile_twin(model, args.compile_scope)
    forward = _marked(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="cpu" in FUSED_ADAMW_DEVICES)

    def step() -> None:
        v = forward(x, txt, pooled, t, img_ids, txt_ids, return_dict=False)[0]
        (v.float() - target).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    return Counter({k: v / args.steps for k, v in launching_ops(prof).items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deep", choices=PRESET_CHOICES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", type=int, default=8, help="latent side (the count does not depend on it)")
    ap.add_argument("--text_len", type=int, default=128, help="T5 tokens per caption")
    ap.add_argument("--warmup", type=int, default=2, help="steps before counting (compilation, lazy state)")
    ap.add_argument("--steps", type=int, default=1, help="steps counted (the table gives ops per step)")
    ap.add_argument("--compile", action="store_true", help="compile each repeated block on both sides")
    ap.add_argument(
        "--compile_scope",
        default="blocks",
        choices=COMPILE_SCOPES,
        help="with --compile: each block (diffusers' compile_repeated_blocks) or the whole model (nn.Module.compile)",
    )
    ap.add_argument("--top", type=int, default=0, help="also list TinyFlux's N most frequent ops of each phase")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # inductor's CPU kernels are not aten ops: this makes each call of one a profiler event ("graph_N_cpp_fused_...")
    inductor_config.cpp.enable_kernel_profile = True
    cfg = make_config(args.preset)
    by_name: Counter = Counter()
    ours, peer = trainer_ops(cfg, args, by_name), peer_ops(cfg, args)
    rows = [Row("whole step", sum(ours.values()), sum(peer.values()), "ops")]
    for phase in ("forward", "backward", "optimizer", "other"):
        rows.append(Row(f"  {phase}", ours[phase], peer[phase], "ops"))
    label = ("compiled blocks" if args.compile_scope == "blocks" else "compiled whole") if args.compile else "eager"
    title = (
        f"Launching ops per training step, {label}: preset={args.preset} batch={args.batch} latent={args.latent} "
        f"text={args.text_len} (other: draws, padding, teacher interpolation, losses, clipping, verdict, EMA, "
        "schedule, zero_grad)"
    )
    print_table(title, rows, float("nan"), "CPU", "diffusers FluxTransformer2DModel + MSE + fused AdamW")
    for phase in ("forward", "backward", "optimizer", "other") if args.top else ():
        top = sorted(((n, op) for (p, op), n in by_name.items() if p == phase), reverse=True)[: args.top]
        print(f"{phase}: " + ", ".join(f"{op.removeprefix('aten::')} {n / args.steps:g}" for n, op in top))


if __name__ == "__main__":
    main()
