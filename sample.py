"""Generate images with a trained TinyFlux model.

    python sample.py --model checkpoints/final --prompt "a cat on a sofa" "a red car" --num_steps 28 \
        --guidance_scale 5.0 --seed 0 --height 512 --width 512 --output samples/

`--aspect W:H` asks for that shape at about the area of --height x --width: `--aspect 3:2` at the default 512 x 512 gives
416 x 624 (height x width), `--aspect 9:16` 680 x 384, sides rounded to 8 x the patch size.

--model takes anything tinyflux.model.loader.load_model takes (a .safetensors file, a directory with config.json, a Hub
id "user/repo[:subfolder]"); `--lora DIR [DIR ...] --lora_scale S [S ...]` adds LoRA adapters (peft's format) on top
of it (docs/LORA.md). Only the text encoders and the VAE are loaded, never the teachers. Prints the paths it writes.
Exit code 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

from tinyflux.cache.buckets import BucketError, aspect_size
from tinyflux.errors import TinyFluxError, message, os_error_message
from tinyflux.frozen import zoo as zoo_sources
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.frozen.zoo import ModelZoo, ZooError
from tinyflux.model.loader import LoadError, load_config, load_model
from tinyflux.sampling import sampler as sampling
from tinyflux.sampling.sampler import Sampler
from tinyflux.trainer.checkpoint import TRAINER_CONFIG
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.lora import parse_adapters
from tinyflux.trainer.schedules import DEFAULT_SHIFT
from tinyflux.util.dtypes import cuda_missing, pick_device, pick_dtype


@dataclass
class SampleArgs:
    model: str = field(metadata={"help": "model source: .safetensors / .pt file, directory, or Hub id user/repo[:sub]"})
    prompt: list[str] = field(
        default_factory=list,  # "extend": --prompt A --prompt B keeps both, as --prompt A B does
        metadata={"help": "one or more prompts (the flag may be repeated)", "action": "extend"},
    )
    prompts_file: str | None = field(default=None, metadata={"help": "text file with one prompt per line"})
    negative_prompt: str = field(
        default=sampling.DEFAULT_NEGATIVE_PROMPT, metadata={"help": 'CFG negative prompt; "" = the null conditioning'}
    )
    num_steps: int = field(default=sampling.DEFAULT_NUM_STEPS, metadata={"help": "Euler steps"})
    guidance_scale: float = field(default=sampling.DEFAULT_GUIDANCE_SCALE, metadata={"help": "CFG scale (1 = off)"})
    shift: Optional[float] = field(
        default=None,
        metadata={
            "help": f"timestep shift of the schedule; default: the training shift from the checkpoint's "
            f"{TRAINER_CONFIG}, else {DEFAULT_SHIFT}"
        },
    )
    seed: int = field(default=0, metadata={"help": "prompt i uses seed + i"})
    height: int = field(
        default=sampling.DEFAULT_LATENT_SIZE * VAE_DOWNSAMPLE,
        metadata={"help": f"image height in PIXELS, a multiple of {VAE_DOWNSAMPLE} x the model's patch size"},
    )
    width: int = field(
        default=sampling.DEFAULT_LATENT_SIZE * VAE_DOWNSAMPLE, metadata={"help": "image width in PIXELS"}
    )
    aspect: Optional[str] = field(
        default=None,
        metadata={
            "help": "W:H shape (3:2 landscape, 9:16 portrait) at about the area of --height x --width, sides "
            "rounded to a multiple of 8 x the patch size"
        },
    )
    output: str = field(default="samples", metadata={"help": "directory for the grid and the single images"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts per forward pass (default: all)"})
    config: str | None = field(
        default=None, metadata={"help": "model config (preset name or config.json) when the weights carry none"}
    )
    ema: str | None = field(default=None, metadata={"help": "EMA weights (.safetensors from EMA.save) to sample with"})
    lora: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRA adapter directories (peft format, e.g. a LoRA checkpoint or its ema/), stacked",
            "action": "extend",
        },
    )
    lora_scale: list[float] = field(
        default_factory=list,
        metadata={
            "help": "factor on each --lora's update: one for all or one per adapter (default 1; 0 = base)",
            "action": "extend",
        },
    )
    zoo: str | None = field(default=None, metadata={"help": "offline tiny zoo directory (replaces the repos below)"})
    vae_repo: str = field(default=zoo_sources.VAE_REPO, metadata={"help": "VAE repo or path"})
    t5_repo: str = field(default=zoo_sources.T5_REPO, metadata={"help": "T5 repo or path"})
    clip_repo: str = field(default=zoo_sources.CLIP_REPO, metadata={"help": "CLIP text encoder repo or path"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:1"})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16"})


class UsageError(TinyFluxError, ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def read_prompts(args: SampleArgs) -> list[str]:
    prompts = [p for p in args.prompt if p.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT [TEXT ...] or --prompts_file FILE (one prompt per line)")
    return prompts


def resolve_device(args: SampleArgs) -> tuple[str, torch.dtype]:
    device = str(pick_device(args.device))
    if cuda_missing(device):
        raise UsageError(f"--device {device} but CUDA is not available; use --device cpu")
    try:
        return device, pick_dtype(args.dtype, device)
    except ValueError as e:
        raise UsageError(f"--dtype: {e} (or auto)") from None


def training_shift(args: SampleArgs) -> float:
    """--shift, else the shift the checkpoint was trained with (its trainer_config.json), else the default."""
    if args.shift is not None:
        return args.shift
    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    config = model_dir / TRAINER_CONFIG
    if config.is_file():
        return float(json.loads(config.read_text()).get("shift", DEFAULT_SHIFT))
    return DEFAULT_SHIFT


def latent_size(pixels: int, name: str, patch_size: int) -> int:
    multiple = VAE_DOWNSAMPLE * patch_size
    if pixels <= 0 or pixels % multiple:
        raise UsageError(f"--{name} {pixels} must be a positive multiple of {multiple} (VAE factor x patch size)")
    return pixels // VAE_DOWNSAMPLE


def load_sampler(args: SampleArgs) -> Sampler:
    """The --model checkpoint on the device, its --ema weights, --lora adapters and the --zoo encoders (loaded when
    first used): what sample.py and the Space (app.py) generate with."""
    device, dtype = resolve_device(args)
    config = load_config(args.config) if args.config else None
    model = load_model(args.model, config=config, device=device, dtype=dtype)
    ema = None
    if args.ema:
        if not Path(args.ema).is_file():
            raise UsageError(f"--ema {args.ema}: no such file")
        ema = EMA.load(args.ema, model)
    if args.lora_scale and not args.lora:
        raise UsageError("--lora_scale without --lora: pass the adapter directories with --lora DIR [DIR ...]")
    adapters = parse_adapters(args.lora, args.lora_scale) if args.lora else []
    if adapters and ema is not None:
        ema.copy_to(model)  # the base's EMA weights first; the adapters then apply on top of them
        ema = None
    zoo = ModelZoo(
        device=device,
        dtype=dtype,
        vae_repo=args.vae_repo,
        t5_repo=args.t5_repo,
        clip_repo=args.clip_repo,
        zoo=args.zoo,
        t5_layers=model.config.t5_layers,
    )
    return Sampler(zoo, model, ema=ema, device=device, dtype=dtype, shift=training_shift(args), loras=adapters)


def main(args: SampleArgs) -> list[str]:
    """Generate and save; returns the written paths (grid first)."""
    prompts = read_prompts(args)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a file; --output names a directory for the grid and the images")
    sampler = load_sampler(args)
    patch = sampler.model.config.patch_size
    pixels = (args.height, args.width)
    if args.aspect is not None:
        try:
            pixels = aspect_size(args.aspect, *pixels, VAE_DOWNSAMPLE * patch)
        except BucketError as e:
            raise UsageError(str(e)) from None
    height, width = latent_size(pixels[0], "height", patch), latent_size(pixels[1], "width", patch)
    images = sampler.generate(
        prompts,
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        height=height,
        width=width,
        seed=args.seed,
        use_ema=sampler.ema is not None,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
    )
    grid = sampler.save_samples(images, prompts, args.output)
    return [grid, *(str(p) for p in sampling.sample_paths(args.output, prompts)[1])]


def cli(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(SampleArgs).parse_args_into_dataclasses(args=argv)
    try:
        paths = main(args)
    except (TinyFluxError, LoadError, ZooError, FileNotFoundError, ValueError) as e:
        print(f"sample.py: error: {message(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the images: a full disk, a read-only --output
        print(f"sample.py: error: {os_error_message(e, 'writing the samples')}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
