"""One training step (forward, backward, AdamW) of TinyFluxDeep against diffusers' FluxTransformer2DModel of the same
size, side by side in one process. Prints one table with samples/s and the ratio.

    python bench/bench_step.py                       # CPU: the `small` size, batch 2, 16x16 latents
    python bench/bench_step.py --preset deep --batch 16 --latent 32 --dtype bfloat16   # GPU: 256px, deep preset

Both models get the same width, depth, heads, RoPE axes, text length and token count. TinyFlux is timed twice: with
its Lune and Sol heads fed teacher features (the real training step; diffusers' model has no such heads) and without
them (the same transformer as diffusers', apples to apples).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import describe_device, diffusers_twin, make_config, time_calls

from tinyflux.model.model import TinyFluxDeep, count_parameters, pack_latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="small (CPU) | deep | default | tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=16, help="latent side: 32 = 256px, 64 = 512px")
    ap.add_argument("--text_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each repeated block of both models")
    ap.add_argument(
        "--rounds", type=int, default=1, help="timed rounds of --steps steps, the three models in turn; fastest counts"
    )
    ap.add_argument(
        "--flush_denormal",
        action="store_true",
        help="CPU: flush subnormal floats to zero (x86 handles them ~100x slower; see bench/NOTES.md)",
    )
    args = ap.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = make_config(args.preset)
    b, s, p = args.batch, args.latent, cfg.patch_size
    n = (s // p) ** 2
    torch.manual_seed(0)
    latents = torch.randn(b, cfg.in_channels, s, s, device=device)
    x = pack_latents(latents, p)  # (B, N, C*p*p)
    txt = torch.randn(b, args.text_len, cfg.t5_hidden_size, device=device)
    pooled = torch.randn(b, cfg.pooled_projection_dim, device=device)
    t = torch.rand(b, device=device)
    img_ids = TinyFluxDeep.create_img_ids(b, s // p, s // p, device)
    target = torch.randn_like(x)
    lune = torch.randn(b, cfg.lune_expert_dim, device=device)
    sol_stats = torch.rand(b, 4, device=device)
    sol_spatial = torch.full(
        (b, cfg.sol_spatial_size, cfg.sol_spatial_size), 1 / cfg.sol_spatial_size**2, device=device
    )

    def make_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", foreach=device.type != "cuda")

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = (forward().float() - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    ours = TinyFluxDeep(cfg).to(device)
    bare = TinyFluxDeep(cfg.replace(use_lune_expert=False, use_sol_prior=False)).to(device)
    theirs = diffusers_twin(cfg).to(device)
    if args.compile:
        for blocks in (*(m.double_blocks for m in (ours, bare)), *(m.single_blocks for m in (ours, bare))):
            for blk in blocks:
                blk.compile()
        for blk in (*theirs.transformer_blocks, *theirs.single_transformer_blocks):
            blk.compile()

    def ours_fwd() -> torch.Tensor:
        v, info = ours(x, txt, pooled, t, img_ids, lune, sol_stats, sol_spatial, return_expert_pred=True)
        return v + 0 * (info["lune_pred"].sum() + info["sol_stats_pred"].sum() + info["sol_spatial_pred"].sum())

    def bare_fwd() -> torch.Tensor:
        return bare(x, txt, pooled, t, img_ids)

    txt_ids = torch.zeros(args.text_len, 3, device=device)

    def theirs_fwd() -> torch.Tensor:
        return theirs(x, txt, pooled, t, img_ids[0], txt_ids, return_dict=False)[0]  # diffusers scales t by 1000 itself

    runs = (
        ("TinyFluxDeep (Lune + Sol, teacher)", ours, ours_fwd),
        ("TinyFluxDeep (no experts)", bare, bare_fwd),
        ("diffusers FluxTransformer2DModel", theirs, theirs_fwd),
    )
    steps = [make_step(model, fwd) for _, model, fwd in runs]
    best = [float("inf")] * len(runs)
    peaks = [float("nan")] * len(runs)
    for r in range(max(args.rounds, 1)):  # round-robin, so a burst of load from other processes hits all three alike
        for i, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, sec = time_calls(step, args.steps, args.warmup if r == 0 else 0, device)
            best[i] = min(best[i], sec)
            if device.type == "cuda":
                peaks[i] = torch.cuda.max_memory_allocated() / 2**30
    rows = [
        (name, count_parameters(model), b / sec, sec * 1e3, peak)
        for (name, model, _), sec, peak in zip(runs, best, peaks, strict=True)
    ]

    print(
        f"\none training step: preset={args.preset} batch={b} latent={s}x{s} ({n} image + {args.text_len} text tokens) "
        f"dtype={args.dtype} compile={args.compile} device={describe_device(device)} "
        f"flush_denormal={args.flush_denormal} fastest of {max(args.rounds, 1)} x {args.steps} steps"
    )
    print(f"{'model':34s} {'params':>10s} {'samples/s':>10s} {'ms/step':>9s} {'peak GiB':>9s}")
    for name, params, sps, ms, peak in rows:
        print(f"{name:34s} {params / 1e6:9.1f}M {sps:10.2f} {ms:9.1f} {peak:9.2f}")
    for name, _, sps, _, _ in rows[:2]:
        print(f"ratio {name} / diffusers: {sps / rows[2][2]:.2f}x samples/s")


if __name__ == "__main__":
    main()
