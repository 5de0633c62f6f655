"""Inference: Euler integration of the learned velocity over the shifted schedule, with classifier-free guidance.

Start from seeded noise at t = 0 and step x <- x + (t_next - t) * v(x, t) up to t = 1 (data), then decode with the zoo's
VAE. Only the text encoders and the VAE are used: the Lune / Sol teachers are never loaded, the model's own expert
predictors stand in for them.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from tinyflux.model.model import TinyFluxDeep, pack_latents, unpack_latents
from tinyflux.sampling.conditioning import NULL_TEXT_TOKENS, TextConditioning, drop_text, null_text  # noqa: F401
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.schedules import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS, DEFAULT_SHIFT, get_schedule
from tinyflux.util.dtypes import cuda_missing

if TYPE_CHECKING:  # the zoo imports diffusers and transformers (seconds): a training process without grids skips them
    from tinyflux.frozen.zoo import ModelZoo
    from tinyflux.trainer.lora import Adapter

DEFAULT_LATENT_SIZE = 64  # latent pixels: 64 -> 512 px images with the Flux VAE
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality"


def _slug(text: str, max_len: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "prompt"


class Sampler:
    """Generates images from prompts with a TinyFluxDeep (optionally its EMA weights) and a ModelZoo.

    device: where the model runs (the model is moved there); dtype: compute dtype of the model's forward (autocast
    when the model's weights are in another dtype, e.g. fp32 training weights sampled in bf16 on a GPU).
    shift: the schedule's timestep shift; keep it equal to the training shift.
    loras: LoRA adapters (lora.Adapter: a peft adapter directory and its scale) loaded onto the model with peft, in
    place and all active, each update times its scale (0 = the base model). Not with an EMA of the base: apply that
    to the model first (ema.copy_to(model)).
    """

    def __init__(
        self,
        zoo: ModelZoo,
        model: TinyFluxDeep,
        ema: EMA | None = None,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        *,
        shift: float = DEFAULT_SHIFT,
        loras: Sequence[Adapter] = (),
    ):
        self.device = torch.device(device)
        if cuda_missing(self.device):
            raise ValueError("Sampler(device='cuda') but CUDA is not available; pass device='cpu'")
        self.peft_model = None
        if loras:
            if ema is not None:
                raise ValueError(
                    "Sampler: pass an EMA or LoRA adapters, not both: the EMA holds the base's names, which the "
                    "adapters change; apply it to the base first (ema.copy_to(model)), then add the adapters"
                )
            from tinyflux.trainer.lora import attach

            self.peft_model = attach(model, loras)  # model itself now computes with the adapters
        self.zoo, self.model, self.ema, self.dtype, self.shift = zoo, model.to(self.device), ema, dtype, shift
        zoo_layers, model_layers = tuple(zoo.t5_layers), tuple(model.config.t5_layers)
        if zoo_layers != model_layers:
            raise ValueError(
                f"the zoo encodes T5 layers {zoo_layers} but the model reads {model_layers}; "
                f"build the zoo with ModelZoo(..., t5_layers={model_layers})"
            )
        self.last_seed: int | None = None

    def encode_text(self, prompts: Sequence[str]) -> TextConditioning:
        """Prompts -> their conditioning, padded to 128 T5 tokens (CPU, float32). In the "padded" text regime (the
        released v4.2 weights) the pad positions hold T5's outputs and every token counts as real."""
        padded = self.model.config.text_regime == "padded"
        t5, pooled, lengths = self.zoo.encode_prompts_batched(list(prompts), return_lengths=True, padded=padded)
        mask = torch.arange(t5.shape[1])[None, :] < lengths[:, None]  # (B, L)
        return TextConditioning(t5, mask, pooled)

    def negative_text(self, negative_prompt: str | None, batch_size: int, like: TextConditioning) -> TextConditioning:
        """The unconditional branch: the encoded negative prompt, or the null conditioning for "" / None."""
        if not negative_prompt:
            return null_text(batch_size, like.t5.shape[1], tuple(like.t5.shape[2:]), like.pooled.shape[1])
        neg = self.encode_text([negative_prompt])
        return TextConditioning(*(x.expand(batch_size, *x.shape[1:]) for x in (neg.t5, neg.mask, neg.pooled)))

    @contextmanager
    def _weights(self, use_ema: bool) -> Iterator[None]:
        """The EMA weights swapped in (when asked and available) and eval mode, both undone on exit, errors included."""
        was_training = self.model.training
        swap = use_ema and self.ema is not None
        if swap:
            self.ema.apply_shadow(self.model)
        try:
            self.model.eval()
            yield
        finally:
            if swap:
                self.ema.restore(self.model)
            self.model.train(was_training)

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> Tensor:
        """Noise (B, C, height, width) float32 on the CPU: sample i from its own generator seeded with seeds[i], so a
        sample's noise does not depend on its batch (and is the same on every device)."""
        c = self.model.config.in_channels
        return torch.stack([torch.randn(c, height, width, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        num_steps: int = DEFAULT_NUM_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        height: int = DEFAULT_LATENT_SIZE,
        width: int = DEFAULT_LATENT_SIZE,
        seed: int | None = None,
        use_ema: bool = True,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        return_latents: bool = False,
        batch_size: int | None = None,
    ) -> Tensor:
        """Images (B, 3, 8*height, 8*width) float32 in [0, 1] on the CPU, or latents (B, C, height, width) when
        return_latents=True.

        height, width: LATENT size (64 -> 512 px with the Flux VAE), multiples of the model's patch size.
        seed: sample i starts from noise seeded with seed + i (None: a random seed, kept in self.last_seed), so a
        batch gives the same images as one prompt at a time with seeds seed, seed + 1, ...
        guidance_scale: v = v_neg + g * (v_cond - v_neg); 1 runs the conditional branch only. negative_prompt ""
        or None contrasts with the null conditioning (what the model learned from text dropout).
        use_ema: sample with the EMA weights when the Sampler has an EMA (restored afterwards, even on errors).
        batch_size: prompts per forward (None: all); results do not depend on it.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        p = self.model.config.patch_size
        if height <= 0 or width <= 0 or height % p or width % p:
            raise ValueError(
                f"height={height}, width={width} are latent sizes and must be positive multiples of the patch size {p} "
                f"(64 -> 512 px images)"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.last_seed = seed
        chunk = batch_size or len(prompts)
        latents = []
        with self._weights(use_ema):
            for start in range(0, len(prompts), chunk):
                batch = prompts[start : start + chunk]
                seeds = range(seed + start, seed + start + len(batch))
                latents.append(self._denoise(batch, seeds, num_steps, guidance_scale, height, width, negative_prompt))
        out = torch.cat(latents)  # (B, C, H, W)
        return out if return_latents else self.zoo.decode_latents(out, shift=self.model.config.latent_shift)

    def _denoise(
        self,
        prompts: list[str],
        seeds: Sequence[int],
        num_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        negative_prompt: str | None,
    ) -> Tensor:
        """Euler from noise (t = 0) to data (t = 1) for one batch; returns latents (B, C, H, W) float32 on the CPU."""
        b, p, device = len(prompts), self.model.config.patch_size, self.device
        cond = self.encode_text(prompts)
        guided = guidance_scale != 1.0
        if guided:
            neg = self.negative_text(negative_prompt, b, cond)
            cond = TextConditioning(
                torch.cat([cond.t5, neg.t5]), torch.cat([cond.mask, neg.mask]), torch.cat([cond.pooled, neg.pooled])
            )
        length = max(int(cond.mask.sum(1).max()), NULL_TEXT_TOKENS)  # trailing pads are masked: drop them
        param_dtype = next(self.model.parameters()).dtype
        t5 = cond.t5[:, :length].to(device, param_dtype)  # (B', L, K, D)
        # The padded regime reads all 128 states with no mask, as the released weights were trained.
        mask = cond.mask[:, :length].to(device) if self.model.config.text_regime == "masked" else None  # (B', L)
        pooled = cond.pooled.to(device, param_dtype)  # (B', P)
        n_rows = t5.shape[0]
        grid = (height // p, width // p)
        img_ids = TinyFluxDeep.create_img_ids(n_rows, *grid, device)  # (B', N, 3)
        x = pack_latents(self.initial_noise(seeds, height, width), p).to(device)  # (B, N, C*p*p) float32
        autocast = torch.autocast(device.type, dtype=self.dtype) if self.dtype != param_dtype else nullcontext()
        schedule = get_schedule(num_steps, self.shift).tolist()
        for t_cur, t_next in zip(schedule[:-1], schedule[1:], strict=True):
            x_in = torch.cat([x, x]) if guided else x
            t = torch.full((n_rows,), t_cur, device=device)  # float32: bf16 would round t to 1/128
            with autocast:
                v = self.model(
                    x_in.to(param_dtype), t5, pooled, t, img_ids, encoder_attention_mask=mask, img_shape=grid
                ).float()  # (B', N, C*p*p)
            if guided:
                v_cond, v_neg = v.chunk(2)
                v = v_neg + guidance_scale * (v_cond - v_neg)
            x = x + (t_next - t_cur) * v
        return unpack_latents(x, height, width, p).cpu()  # (B, C, H, W)

    def save_grid(
        self,
        prompts: list[str],
        shapes: Sequence[tuple[int, int]],
        output_dir: str,
        step: int | None = None,
        **generate: Any,
    ) -> str:
        """Generate every prompt at every latent (height, width) of `shapes` (keyword arguments: generate's) and save
        them as save_samples does; several shapes share one grid, letterboxed, each tile captioned with its size in
        pixels. Returns the grid's path."""
        generated = [self.generate(prompts, height=h, width=w, **generate) for h, w in shapes]
        if len(shapes) == 1:
            return self.save_samples(generated[0], prompts, output_dir, step=step)
        images = letterbox([image for batch in generated for image in batch])
        tiles = [f"{p} ({h * 8}x{w * 8})" for h, w in shapes for p in prompts]
        return self.save_samples(images, tiles, output_dir, step=step)

    def save_samples(
        self,
        images: Tensor,
        prompts: list[str],
        output_dir: str,
        step: int | None = None,
    ) -> str:
        """Write each image as a PNG and a grid with each prompt under its tile; returns the grid's path.

        Files: output_dir/grid[_step{step:07d}].png and output_dir/[step{step:07d}_]{i:03d}_{prompt slug}.png.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")
        grid_path, single_paths = sample_paths(output_dir, prompts, step)
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        tiles = [to_pil(image) for image in images]
        for tile, path in zip(tiles, single_paths, strict=True):
            tile.save(path)
        captioned_grid(tiles, prompts).save(grid_path)
        return str(grid_path)


def sample_paths(output_dir: str | Path, prompts: Sequence[str], step: int | None = None) -> tuple[Path, list[Path]]:
    """Where save_samples writes: the grid, and one PNG per prompt."""
    out = Path(output_dir)
    prefix = f"step{step:07d}_" if step is not None else ""
    grid = out / (f"grid_step{step:07d}.png" if step is not None else "grid.png")
    return grid, [out / f"{prefix}{i:03d}_{_slug(prompt)}.png" for i, prompt in enumerate(prompts)]


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    pixels = rearrange((image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8), "c h w -> h w c")
    return Image.fromarray(pixels.cpu().numpy())


def letterbox(images: Sequence[Tensor]) -> Tensor:
    """Images (3, H_i, W_i) of several shapes -> (B, 3, H, W) at the largest height and width, each centred on white:
    one grid shows the square, landscape and portrait samples of a run on aspect buckets."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    out = torch.ones(len(images), 3, height, width)
    for b, image in enumerate(images):
        top, left = (height - image.shape[1]) // 2, (width - image.shape[2]) // 2
        out[b, :, top : top + image.shape[1], left : left + image.shape[2]] = image
    return out


def captioned_grid(tiles: Sequence[Image.Image], captions: Sequence[str], max_lines: int = 4) -> Image.Image:
    """Tiles in a near-square grid, each caption wrapped under its tile (PIL's default font), on white."""
    font = ImageFont.load_default()
    w, h = tiles[0].size
    _, _, char_w, line_h = ImageDraw.Draw(tiles[0]).textbbox((0, 0), "M", font=font)
    placeholder = "..."
    # at least the placeholder's width: textwrap refuses a narrower one, and a tile narrower than 4 characters (an
    # 8 px sample) gets its caption clipped at the tile's right edge instead
    chars = max(len(placeholder) + 1, w // max(char_w, 1))
    wrapped = [textwrap.wrap(c, chars, max_lines=max_lines, placeholder=placeholder) or [""] for c in captions]
    caption_h = (line_h + 2) * max(len(lines) for lines in wrapped) + 4
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped, strict=True)):
        x, y = (i % cols) * w, (i // cols) * (h + caption_h)
        grid.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + j * (line_h + 2)), line, fill="black", font=font)
    return grid
