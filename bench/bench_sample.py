"""Images/s of Sampler.generate (Euler, 28 steps, CFG 5.0) against diffusers' FluxTransformer2DModel of the same size
running the same denoising loop (same steps, CFG batch doubling, same text length) without text encoders or VAE.
Prints one table.

    python bench/bench_sample.py                                        # CPU: tiny zoo, tiny preset, 64 px
    python bench/bench_sample.py --preset deep --latents 32 64 --batch 16 --compile      # GPU, tiny-zoo encoders
    python bench/bench_sample.py --preset deep --zoo hub --latents 32 64 --batch 16      # GPU, the real encoders
    python bench/bench_sample.py --zoo random-full --latents 32 64 --batch 16           # GPU, real sizes, random weights

The transformer is what sampling spends its time on, so on a machine without the Hub models `--preset deep` keeps the
deep transformer and takes only the text widths (t5_hidden_size, pooled_projection_dim, t5_layers) from the tiny zoo
it runs with; the VAE decode row is then the tiny VAE's, not the Flux VAE's. `--zoo hub` uses the real encoders and
VAE (they must be in the local Hugging Face cache on a machine without internet); `--zoo random-full` uses the same
architectures with random weights (written once to --random_zoo_dir and reused), so the text-encode and VAE-decode
rows are real-size timings offline. `--preset` defaults to the zoo's (deep for hub and random-full, else tiny). Both
transformers run with their weights in the compute dtype (bf16 on a GPU), no autocast; `--compile` compiles each block
of both.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    PRESET_CHOICES,
    Row,
    add_device_args,
    add_zoo_args,
    cold_compile_caches,
    describe_device,
    diffusers_twin,
    interleaved_best,
    make_config,
    matmul_ceiling_tflops,
    now,
    peer_train_flops_per_sample,
    print_table,
    resolve_zoo,
    scratch_dir,
    setup_device,
    train_flops_per_sample,
)

from tinyflux.frozen.zoo import ModelZoo
from tinyflux.model.config import PRESETS, TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep
from tinyflux.sampling.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_NUM_STEPS, Sampler
from tinyflux.tools.tiny_zoo import CAPTION_CORPUS
from tinyflux.trainer.runtime import compile_blocks
from tinyflux.trainer.schedules import get_schedule

TEXT_FIELDS = ("t5_layers", "t5_hidden_size", "pooled_projection_dim")


def sampling_config(preset: str, zoo_preset: str) -> TinyFluxConfig:
    """The preset, with the tiny zoo's text widths when the zoo's encoders are the tiny ones (see the docstring)."""
    cfg = make_config(preset)
    narrow = zoo_preset == "tiny" and preset != "tiny"
    return cfg.replace(**{k: PRESETS["tiny"][k] for k in TEXT_FIELDS}) if narrow else cfg


def peer_loop(model: torch.nn.Module, cfg: TinyFluxConfig, b: int, latent: int, text_len: int, steps: int, scale: float,
              device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
    """diffusers' transformer through the Sampler's loop: Euler over the shifted schedule, CFG by a doubled batch."""
    p = cfg.patch_size
    n = (latent // p) ** 2
    x = torch.randn(b, n, cfg.token_channels, device=device)  # (B, N, C*p*p) float32, as the Sampler keeps it
    txt = torch.randn(2 * b, text_len, cfg.t5_hidden_size, device=device, dtype=dtype)
    pooled = torch.randn(2 * b, cfg.pooled_projection_dim, device=device, dtype=dtype)
    img_ids = TinyFluxDeep.create_img_ids(1, latent // p, latent // p, device)[0]
    txt_ids = torch.zeros(text_len, 3, device=device)
    schedule = get_schedule(steps).tolist()
    for t_cur, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        t = torch.full((2 * b,), t_cur, device=device)
        v = model(torch.cat([x, x]).to(dtype), txt, pooled, t, img_ids, txt_ids, return_dict=False)[0].float()
        v_cond, v_neg = v.chunk(2)
        x = x + (t_next - t_cur) * (v_neg + scale * (v_cond - v_neg))


def text_length(zoo: ModelZoo, prompts: list[str]) -> int:
    """The T5 length the Sampler runs with: the longest real prompt, negative prompt included (pads are dropped)."""
    _, _, lengths = zoo.encode_prompts_batched([*prompts, DEFAULT_NEGATIVE_PROMPT], return_lengths=True)
    return int(lengths.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=PRESET_CHOICES, help="default: the zoo's (tiny or deep)")
    ap.add_argument("--latents", type=int, nargs="+", default=[8], help="latent sides: 32 = 256px, 64 = 512px")
    ap.add_argument("--batch", type=int, default=4, help="prompts per generate call")
    ap.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    ap.add_argument("--rounds", type=int, default=3, help="timed generate calls; the fastest counts")
    ap.add_argument("--warm_cache", action="store_true", help="let compilation use the on-disk caches of earlier runs")
    ap.add_argument("--compile", action="store_true", help="compile each transformer block of both models")
    add_zoo_args(ap)
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    prompts = [CAPTION_CORPUS[i % len(CAPTION_CORPUS)] for i in range(args.batch)]
    rows = []
    with scratch_dir() as work, cold_compile_caches(args.compile and not args.warm_cache):
        choice = resolve_zoo(args.zoo, args.random_zoo_dir, work)
        args.preset = args.preset or choice.preset
        cfg = sampling_config(args.preset, choice.preset)
        where = {"zoo": choice.path} if choice.path else {}
        zoo = ModelZoo(device=str(device), dtype=dtype, t5_layers=cfg.t5_layers, **where)
        torch.manual_seed(0)
        model = TinyFluxDeep(cfg).to(device, dtype).eval()
        peer = diffusers_twin(cfg).to(device, dtype).eval()
        if args.compile:
            compile_blocks(model, "default")
            peer.compile_repeated_blocks()
        sampler = Sampler(zoo, model, None, device=str(device), dtype=dtype)
        text_len = text_length(zoo, prompts)
        ceiling = matmul_ceiling_tflops(device, dtype)
        for latent in args.latents:
            px, n = latent * 8, (latent // cfg.patch_size) ** 2
            forwards = args.steps * (2 if args.guidance != 1.0 else 1)
            flops = train_flops_per_sample(cfg, n, text_len) / 3 * forwards  # one forward = a third of a train step
            peer_flops = peer_train_flops_per_sample(cfg, n, text_len) / 3 * forwards

            def generate(decode: bool, latent: int = latent) -> None:
                sampler.generate(prompts, args.steps, args.guidance, latent, latent, seed=0, return_latents=not decode)

            def theirs(latent: int = latent) -> None:
                with torch.inference_mode():
                    peer_loop(peer, cfg, args.batch, latent, text_len, args.steps, args.guidance, device, dtype)

            latents = torch.randn(args.batch, cfg.in_channels, latent, latent)
            start = now(device)
            generate(False)
            warm = now(device) - start
            start = now(device)
            theirs()
            peer_warm = now(device) - start
            best = interleaved_best(
                {
                    "gen": lambda: generate(False),
                    "peer": theirs,
                    "full": lambda: generate(True),
                    "decode": lambda z=latents: zoo.decode_latents(z),
                    "text": lambda: sampler.encode_text(prompts),
                },
                args.rounds,
                device,
            )
            gen_s, peer_s, full_s, decode_s, text_s = (best[k] for k in ("gen", "peer", "full", "decode", "text"))
            b = args.batch
            rows += [
                Row(f"{px}px generate, text + denoise (no VAE)", b / gen_s, b / peer_s, "images/s", flops, peer_flops),
                Row(f"{px}px generate, full (with VAE decode)", b / full_s, None, "images/s", flops),
                Row(f"{px}px VAE decode alone", b / decode_s, None, "images/s"),
                Row(f"{px}px first call (compile, warm-up)", warm, peer_warm, "s"),
            ]
        rows.append(Row("text encode alone (T5 + CLIP)", args.batch / text_s, None, "prompts/s"))
    title = (
        f"Sampling: Sampler.generate, preset={args.preset} batch={args.batch} steps={args.steps} CFG={args.guidance} "
        f"text={text_len} T5 tokens, dtype={str(dtype).removeprefix('torch.')} compile={args.compile} "
        f"zoo={choice.label}, best of {args.rounds}"
    )
    peer_name = "diffusers FluxTransformer2DModel, same size, same Euler + CFG loop, no encoders / VAE"
    ceiling = max(ceiling, matmul_ceiling_tflops(device, dtype))  # again at the end: a busy moment only lowers it
    print_table(title, rows, ceiling, describe_device(device), peer_name)


if __name__ == "__main__":
    main()
