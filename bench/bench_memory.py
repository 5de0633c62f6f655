"""Peak training memory of TinyFlux at `deep`, estimated on the CPU without allocating it: one forward under
FakeTensorMode (shapes and dtypes, no data) with torch.autograd.graph.saved_tensors_hooks counting what autograd
saves for backward, plus the weights, gradients, AdamW's two moments and the EMA copy (all float32, as the Trainer
keeps them). Prints one table, with and without gradient checkpointing, against issue 7's 12 GiB target.

    python bench/bench_memory.py                                # deep, batch 16, 256 px (latent 32), bf16 autocast
    python bench/bench_memory.py --batch 8 --latent 64          # 512 px

Saved activations are counted once per storage (views share one), parameters excluded (counted as weights). With
checkpointing a block keeps only its inputs (which reach the same hooks) and recomputes the rest in backward, so the
peak adds the largest block's own saved activations once. Not counted: the allocator's fragmentation and workspaces (cuBLAS, attention kernels),
the gradients of activations in flight during backward (at most about one block's), the data batch.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from common import PRESET_CHOICES, Row, make_config, print_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from tinyflux.model.model import TinyFluxDeep, pack_latents

GIB = 2**30


def saved_bytes(model: TinyFluxDeep, inputs: dict[str, Any], dtype: torch.dtype) -> tuple[float, float]:
    """(bytes autocast + autograd save for one forward, the largest of any one block), parameters excluded."""
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen: set[StorageWeakRef] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in params and ref not in seen:
            seen.add(ref)
            total[0] += t.untyped_storage().nbytes()
        return t

    per_block: list[int] = []
    blocks = [b for child in model.children() if isinstance(child, torch.nn.ModuleList) for b in child]

    for block in blocks:
        block.register_forward_pre_hook(lambda *_: per_block.append(total[0]))
        block.register_forward_hook(lambda *_: per_block.append(total[0] - per_block.pop()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(**inputs, return_expert_pred=True)
    return float(total[0]), float(max(per_block))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deep", choices=PRESET_CHOICES)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--latent", type=int, default=32, help="latent side: 32 = 256 px, 64 = 512 px")
    ap.add_argument("--text_len", type=int, default=128, help="T5 tokens (the padded regime reads 128)")
    ap.add_argument("--dtype", default="bfloat16", help="autocast dtype (float32: none)")
    ap.add_argument("--target_gib", type=float, default=12.0, help="the budget to compare with")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = make_config(args.preset)
    rows = []
    with FakeTensorMode():
        model = TinyFluxDeep(cfg)
        weights = sum(p.numel() for p in model.parameters()) * 4  # float32 master weights
        b, s, p = args.batch, args.latent, cfg.patch_size
        inputs = {
            "hidden_states": pack_latents(torch.randn(b, cfg.in_channels, s, s), p),  # (B, N, C*p*p)
            "encoder_hidden_states": torch.randn(b, args.text_len, cfg.num_t5_layers, cfg.t5_hidden_size),
            "pooled_projections": torch.randn(b, cfg.pooled_projection_dim),
            "timestep": torch.rand(b),
            "img_ids": TinyFluxDeep.create_img_ids(b, s // p, s // p, None),
            "lune_features": torch.randn(b, cfg.lune_expert_dim),
            "sol_stats": torch.rand(b, cfg.sol_num_stats),
            "sol_spatial": torch.rand(b, cfg.sol_spatial_size, cfg.sol_spatial_size),
        }
        states = 4 * weights  # weights + gradients + AdamW exp_avg and exp_avg_sq, float32
        ema = weights
        block = 0.0
        for ckpt in (False, True):  # the largest block's own activations are the uncheckpointed run's
            model.gradient_checkpointing = ckpt
            saved, largest = saved_bytes(model, inputs, dtype)
            block = block or largest
            peak = states + ema + saved + (block if ckpt else 0.0)
            label = "with" if ckpt else "without"
            rows.append(Row(f"saved activations, {label} checkpointing", saved / GIB, None, "GiB"))
            if ckpt:
                rows.append(Row("largest block's activations, recomputed in backward", block / GIB, None, "GiB"))
            rows.append(Row(f"peak estimate, {label} checkpointing", peak / GIB, args.target_gib, "GiB"))
    rows.insert(0, Row("weights + gradients + AdamW moments + EMA (float32)", (states + ema) / GIB, None, "GiB"))
    title = (
        f"Training memory estimate (CPU, no allocation): preset={args.preset} batch={args.batch} "
        f"latent={args.latent} ({(args.latent // cfg.patch_size) ** 2} image + {args.text_len} text tokens) "
        f"autocast={args.dtype}; peer = the {args.target_gib:g} GiB target"
    )
    print_table(title, rows, float("nan"), "CPU (FakeTensorMode)", f"{args.target_gib:g} GiB target")


if __name__ == "__main__":
    main()
