"""ModelZoo: the frozen encoders and teachers that cache building and sampling need.

The Flux VAE (latents), T5 (flan-t5-base hidden states), CLIP (ViT-L/14 text, pooled vector and teacher context) and
the two SD1.5-flow teachers, Lune (mid-block feature) and Sol (self-attention statistics + spatial map). Every source is
a Hub repo id or a local path; `ModelZoo(zoo=PATH)` points all of them at an offline tiny zoo written by
`python -m tinyflux.frozen.zoo make-tiny PATH`, or at real size with random weights (`make-random PATH`, for timing
offline). Feature definitions and conventions: docs/EXPERT_CACHE.md.

Outputs are float32 on the CPU whatever the zoo's device and dtype. On a CPU use dtype=torch.float32: bf16 convolutions
are slow there.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from einops import rearrange
from huggingface_hub import hf_hub_download
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

from tinyflux.frozen.sources import (
    CLIP_MAX_LENGTH,
    CLIP_REPO,
    EXPERTS_REPO,
    LUNE_FILENAME,
    SD15_UNET_CONFIG,
    SOL_FILENAME,
    T5_MAX_LENGTH,
    T5_REPO,
    TEACHER_BASE_REPO,
    VAE_REPO,
    VAE_SUBFOLDER,
    ZOO_SUBFOLDERS,
    ZOO_TEACHER_BASE,
    ZooError,
    advice,
    check_tiny_zoo,
    loading,
    local_teacher_file,
    resolve_source,
)
from tinyflux.frozen.teacher_files import check_teacher, load_teacher_unet, teacher_config
from tinyflux.frozen.teachers import (
    SolAttentionRecorder,
    install_sol_recorder,
    lune_from_context,
    per_sample_seeds,
    per_sample_timesteps,
    seeded_noise,
    sol_from_context,
)
from tinyflux.model.config import SOL_SPATIAL_SIZE, TinyFluxConfig
from tinyflux.util.dtypes import cuda_missing

__all__ = ["MODEL_NAMES", "ModelZoo", "ZooError", "seeded_noise"]

MODEL_NAMES = ("vae", "t5", "clip", "lune", "sol")


def _check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if cuda_missing(device):
        raise ZooError(
            f"device={str(device)!r} was asked for but CUDA is not available here. "
            "Pass device='cpu' (with dtype=torch.float32), or run on a machine with a GPU."
        )
    # "cpu:0" (what accelerate reports on several CPU processes) is refused by safetensors' loader: drop the index.
    return torch.device("cpu") if device.type == "cpu" else device


def _check_t5_layers(layers: tuple[int, ...], num_layers: int, source: str) -> None:
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise ZooError(
            f"t5_layers={layers} asks for hidden state(s) {bad}, but the T5 encoder from {source!r} has {num_layers} "
            f"layers: valid hidden-state indices are 0..{num_layers} (0 = embeddings, {num_layers} = final output). "
            "Pick t5_layers that fit this encoder (TinyFluxConfig.t5_layers; the `tiny` preset fits the tiny zoo)."
        )


def _batches(n: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Slices of range(n), with a progress bar when there is more than one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    yield from (slice(s, s + batch_size) for s in tqdm(starts, desc=desc, disable=len(starts) <= 1))


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("pass a list of prompts, not a single string (encode_prompt takes one prompt)")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts[:3]!r}")
    return prompts


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _images_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])  # (B, H, W, 3)
    return rearrange(torch.from_numpy(array), "b h w c -> b c h w").float() / 127.5 - 1.0


class ModelZoo:
    """Loads, runs and frees the models that cache building needs; see the module docstring.

    Loading is lazy: every encode/extract method loads what it needs; `load_*` load ahead and return the modules.
    Sources: Hub repo ids (defaults: the real models) or local paths; `zoo=PATH` overrides all four with a tiny zoo's
    subfolders. `teacher_base` (default SD1.5's `unet` subfolder; with `zoo`, the zoo's teacher_base/) completes a
    teacher file that holds part of a UNet (teacher_files.py). `t5_layers` selects T5 hidden states (index i = output
    of layer i, 0 = embeddings, num_layers = final).
    Device "cuda" without CUDA raises ZooError rather than silently running a cache build on the CPU.
    """

    def __init__(
        self,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        vae_repo: str = VAE_REPO,
        t5_repo: str = T5_REPO,
        clip_repo: str = CLIP_REPO,
        experts_repo: str = EXPERTS_REPO,
        *,
        zoo: str | Path | None = None,
        t5_layers: tuple[int, ...] = TinyFluxConfig().t5_layers,
        vae_subfolder: str = VAE_SUBFOLDER,
        teacher_base: str | None = None,
        token: str | None = None,
    ):
        self.device = _check_device(device)
        self.dtype = dtype
        if zoo is not None:
            root = check_tiny_zoo(zoo)
            vae_repo, t5_repo, clip_repo, experts_repo = (
                str(root / ZOO_SUBFOLDERS[name]) for name in ("vae", "t5", "clip", "experts")
            )
            teacher_base = teacher_base or str(root / ZOO_TEACHER_BASE)
        # Used only for a teacher file that holds part of a UNet (teacher_files.py), so it is never fetched otherwise.
        self.teacher_base = teacher_base or TEACHER_BASE_REPO
        self.vae_repo, self.t5_repo, self.clip_repo, self.experts_repo = vae_repo, t5_repo, clip_repo, experts_repo
        self.vae_subfolder = vae_subfolder
        self.t5_layers = tuple(int(i) for i in t5_layers)
        self.token = token  # None: huggingface_hub's default (HF_TOKEN or `hf auth login`)
        self._models: dict[str, torch.nn.Module] = {}
        self._tokenizers: dict[str, Any] = {}
        self._sol_recorder: SolAttentionRecorder | None = None
        self._vae_config: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"ModelZoo(device={str(self.device)!r}, dtype={self.dtype}, loaded={list(self.loaded)})"

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._models)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        # Loaded in self.dtype already: the libraries keep their few float32-only layers (T5's `wo` in float16) as is.
        return module.to(self.device).eval().requires_grad_(False)

    def _vae_location(self) -> tuple[str, str | None]:
        source = resolve_source(self.vae_repo, "VAE")
        if isinstance(source, str):
            return source, self.vae_subfolder
        # A local VAE directory, or a local copy of the whole repo with the VAE in its subfolder.
        for subfolder in (None, self.vae_subfolder):
            if (source / (subfolder or "") / "config.json").is_file():
                return str(source), subfolder
        raise ZooError(f"cannot load the VAE: no config.json in {source} or {source / self.vae_subfolder}")

    def load_vae(self) -> AutoencoderKL:
        if "vae" not in self._models:
            location, subfolder = self._vae_location()
            with loading("VAE", self.vae_repo, f"{subfolder}/" if subfolder else None):
                vae = AutoencoderKL.from_pretrained(
                    location, subfolder=subfolder, torch_dtype=self.dtype, token=self.token
                )
            self._vae_config = dict(vae.config)
            self._models["vae"] = self._freeze(vae)
        return self._models["vae"]

    def load_t5(self) -> tuple[T5TokenizerFast, T5EncoderModel]:
        if "t5" not in self._models:
            location = str(resolve_source(self.t5_repo, "T5 encoder"))
            with loading("T5 encoder", self.t5_repo):
                tokenizer = T5TokenizerFast.from_pretrained(location, token=self.token)
                model = T5EncoderModel.from_pretrained(location, dtype=self.dtype, token=self.token)
            _check_t5_layers(self.t5_layers, model.config.num_layers, self.t5_repo)
            self._tokenizers["t5"] = tokenizer
            self._models["t5"] = self._freeze(model)
        return self._tokenizers["t5"], self._models["t5"]

    def load_clip(self) -> tuple[CLIPTokenizerFast, CLIPTextModel]:
        if "clip" not in self._models:
            location = str(resolve_source(self.clip_repo, "CLIP text encoder"))
            with loading("CLIP text encoder", self.clip_repo):
                tokenizer = CLIPTokenizerFast.from_pretrained(location, token=self.token)
                model = CLIPTextModel.from_pretrained(location, dtype=self.dtype, token=self.token)
            self._tokenizers["clip"] = tokenizer
            self._models["clip"] = self._freeze(model)
        return self._tokenizers["clip"], self._models["clip"]

    def load_lune(self, filename: str = LUNE_FILENAME) -> UNet2DConditionModel:
        """The Lune teacher: `filename` in experts_repo, or a path to a local .safetensors file.

        Loaded once: to switch files, unload("lune") first.
        """
        if "lune" not in self._models:
            self._models["lune"] = self._load_teacher("Lune teacher", filename)
        return self._models["lune"]

    def load_sol(self, filename: str = SOL_FILENAME) -> UNet2DConditionModel:
        """The Sol teacher, with SolAttentionRecorder on its self-attention layers (see load_lune for `filename`)."""
        if "sol" not in self._models:
            unet = self._load_teacher("Sol teacher", filename)
            self._sol_recorder = install_sol_recorder(unet)
            self._models["sol"] = unet
        return self._models["sol"]

    def load_all(self) -> None:
        self.load_vae()
        self.load_t5()
        self.load_clip()
        self.load_lune()
        self.load_sol()

    def _teacher_files(self, what: str, filename: str) -> tuple[Path, dict[str, Any]]:
        """Weights file and UNet config of a teacher: config.json beside local weights, else the SD1.5 config.

        `filename` is a file in experts_repo, or a local path when it is absolute or starts with '.' or '~' (or names
        a file that exists and has a folder part); a bare name is always looked up in experts_repo.
        """
        direct = Path(filename).expanduser()
        explicit_path = direct.is_absolute() or filename.startswith((".", "~"))
        if (explicit_path or len(direct.parts) > 1) and direct.is_file():
            return direct, teacher_config(direct.parent)
        if explicit_path:
            raise ZooError(f"cannot load the {what}: the local file {filename!r} does not exist.\n{advice(what)}")
        source = resolve_source(self.experts_repo, what)
        if isinstance(source, Path):
            return local_teacher_file(source, filename, what), teacher_config(source)
        with loading(what, self.experts_repo, filename):
            weights = Path(hf_hub_download(self.experts_repo, filename, token=self.token))
        return weights, dict(SD15_UNET_CONFIG)

    def _load_teacher(self, what: str, filename: str) -> UNet2DConditionModel:
        weights, config = self._teacher_files(what, filename)
        unet = load_teacher_unet(
            weights, config, what, self.teacher_base, device=self.device, dtype=self.dtype, token=self.token
        )
        return self._freeze(unet)

    def unload(self, *names: str) -> None:
        """Drop models (and their tokenizers) and free their memory; a no-op for a model not loaded.

        The zoo then holds no reference to them: memory is freed once the caller drops its own references too.
        """
        unknown = [name for name in names if name not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the zoo holds {MODEL_NAMES}")
        for name in names:
            self._models.pop(name, None)
            self._tokenizers.pop(name, None)
        if "sol" in names:
            self._sol_recorder = None
        gc.collect()  # library modules hold reference cycles; collect them now, not at some later gc pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unload_all(self) -> None:
        self.unload(*self._models)

    def offload(self) -> None:
        """Move every loaded model to the CPU (they still work there, slowly); reload() moves them back."""
        for module in self._models.values():
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(self) -> None:
        for module in self._models.values():
            module.to(self.device)

    def _vae_factors(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) from the VAE config, read without loading the weights when needed."""
        if self._vae_config is None:
            location, subfolder = self._vae_location()
            with loading("VAE", self.vae_repo, f"{subfolder}/config.json" if subfolder else "config.json"):
                self._vae_config = dict(AutoencoderKL.load_config(location, subfolder=subfolder, token=self.token))
        return float(self._vae_config["scaling_factor"]), float(self._vae_config.get("shift_factor") or 0.0)

    @property
    def vae_scale(self) -> float:
        """The VAE's scaling_factor (0.3611 for Flux): latents = (encode(x) - vae_shift) * vae_scale."""
        return self._vae_factors()[0]

    @property
    def vae_shift(self) -> float:
        """The VAE's shift_factor (0.1159 for Flux; 0 for VAEs without one)."""
        return self._vae_factors()[1]

    @torch.no_grad()
    def encode_images_batched(
        self, images: Sequence[Image.Image], batch_size: int = 32, shift: bool = True
    ) -> torch.Tensor:
        """PIL images, all of one size with sides divisible by 8 -> latents (N, C_lat, H/8, W/8) float32 on the CPU.

        Latents are the posterior mode (deterministic), shifted and scaled: (mode - shift_factor) * scaling_factor;
        shift=False leaves the shift out (mode * scaling_factor), the convention the released v4.2 weights saw.
        """
        images = list(images)
        vae = self.load_vae()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        sizes = sorted({image.size for image in images})
        if len(sizes) != 1 or sizes[0][0] % factor or sizes[0][1] % factor:
            raise ValueError(
                f"images must be non-empty, share one size and have sides divisible by {factor}; got sizes "
                f"{sizes[:4]}. Resize / centre-crop them first (the cache builder does)."
            )
        scale, offset = self._vae_factors()
        offset = offset if shift else 0.0
        latents = []
        for batch in _batches(len(images), batch_size, "VAE encode"):
            pixels = _images_to_pixels(images[batch]).to(_module_device(vae), self.dtype)  # (B, 3, H, W)
            mode = vae.encode(pixels).latent_dist.mode().float()  # (B, C_lat, H/8, W/8)
            latents.append(((mode - offset) * scale).cpu())
        return torch.cat(latents)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """One image -> latent (C_lat, H/8, W/8), see encode_images_batched."""
        return self.encode_images_batched([image])[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 32, shift: bool = True) -> torch.Tensor:
        """Shifted and scaled latents (B, C_lat, h, w) -> images (B, 3, 8h, 8w) float32 in [0, 1] on the CPU.
        shift=False: latents that are only scaled (encode_images_batched(shift=False))."""
        vae = self.load_vae()
        channels = vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"latents must be (B, {channels}, h, w), got shape {tuple(latents.shape)}")
        scale, offset = self._vae_factors()
        offset = offset if shift else 0.0
        images = []
        for batch in _batches(latents.shape[0], batch_size, "VAE decode"):
            z = latents[batch].to(_module_device(vae), torch.float32) / scale + offset  # undo the shift and scale
            pixels = vae.decode(z.to(self.dtype)).sample.float()  # (B, 3, 8h, 8w) in about [-1, 1]
            images.append(((pixels + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
        return torch.cat(images)

    def _clip_outputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP (last_hidden_state (B, 77, D), pooler_output (B, D)) on CLIP's device, without an attention mask, as
        SD1.5 pipelines call it (the causal mask already keeps pads out of the real tokens)."""
        tokenizer, clip = self.load_clip()
        ids = tokenizer(
            prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        out = clip(input_ids=ids.to(_module_device(clip)))
        return out.last_hidden_state, out.pooler_output

    @torch.no_grad()
    def encode_clip_context(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last_hidden_state (B, 77, D) float32 on the CPU: the teachers' cross-attention context."""
        return self._clip_outputs(_check_prompts(prompts))[0].float().cpu()

    @torch.no_grad()
    def encode_prompts_batched(
        self, prompts: Sequence[str], batch_size: int = 128, return_lengths: bool = False, padded: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Prompts -> (t5 (N, 128, K, D), clip_pooled (N, P)) [+ lengths (N,) long], float32 on the CPU.

        t5[:, :, k] is T5 hidden state t5_layers[k]; prompts are padded / truncated to 128 tokens and T5 runs with the
        attention mask. Pad positions are zero, so embeddings trimmed to `lengths` (real tokens, EOS included) and
        re-padded with zeros are identical. padded=True (the "padded" text regime of the released v4.2 weights) keeps
        T5's outputs at the pad positions too, and every length is 128.
        """
        prompts = _check_prompts(prompts)
        tokenizer, t5 = self.load_t5()
        _check_t5_layers(self.t5_layers, t5.config.num_layers, self.t5_repo)
        embeds, pooled, lengths = [], [], []
        for batch in _batches(len(prompts), batch_size, "Text encode"):
            tokens = tokenizer(
                prompts[batch], padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt"
            )
            mask = tokens.attention_mask.to(_module_device(t5))  # (B, L)
            out = t5(input_ids=tokens.input_ids.to(mask.device), attention_mask=mask, output_hidden_states=True)
            hidden = torch.stack([out.hidden_states[i] for i in self.t5_layers], dim=2).float()  # (B, L, K, D)
            embeds.append((hidden if padded else hidden * mask[:, :, None, None]).cpu())
            lengths.append(torch.full_like(mask[:, 0], mask.shape[1]).cpu() if padded else tokens.attention_mask.sum(1))
            pooled.append(self._clip_outputs(prompts[batch])[1].float().cpu())  # (B, P)
        result = (torch.cat(embeds), torch.cat(pooled))
        return (*result, torch.cat(lengths).long()) if return_lengths else result

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt -> (t5 (128, K, D), clip_pooled (P,))."""
        t5, pooled = self.encode_prompts_batched([prompt])
        return t5[0], pooled[0]

    @torch.no_grad()
    def extract_lune(
        self,
        prompts: Sequence[str],
        timesteps: float | torch.Tensor,
        seed: int | Sequence[int] = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Lune features (B, C_mid) float32 on the CPU: the teacher's mid-block output averaged over space.

        The teacher sees seeded pure noise (one map per seed: an int seed gives every prompt the same map), noise level
        (1 - t) * 1000 for TinyFlux timesteps t in [0, 1] (float or (B,)), and the CLIP context of the prompt.
        """
        prompts = _check_prompts(prompts)
        t, seeds = per_sample_timesteps(timesteps, len(prompts)), per_sample_seeds(seed, len(prompts))
        features = []
        for batch in _batches(len(prompts), batch_size, "Lune features"):
            context = self._clip_outputs(prompts[batch])[0]  # (B, 77, D)
            features.append(self.lune_of_context(context, t[batch], seeds[batch], batch_size))
        return torch.cat(features)

    @torch.no_grad()
    def lune_of_context(
        self,
        context: torch.Tensor,
        timesteps: float | torch.Tensor,
        seed: int | Sequence[int] = 0,
        batch_size: int = 64,
        teacher_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """extract_lune of prompts given by their teacher context (B, 77, D) (encode_clip_context), `batch_size` rows
        per UNet call, on the noise grid `teacher_grid` (h, w) or the teacher's square: the one place the Lune teacher
        runs, for extract_lune and for a cache's features at its t-buckets (cache_encode.lune_features)."""
        t, seeds = per_sample_timesteps(timesteps, len(context)), per_sample_seeds(seed, len(context))
        return lune_from_context(self.load_lune(), context, t, seeds, self.dtype, batch_size, teacher_grid)

    @torch.no_grad()
    def extract_sol(
        self,
        prompts: Sequence[str],
        timesteps: float | torch.Tensor,
        seed: int | Sequence[int] = 0,
        batch_size: int = 64,
        spatial_size: int = SOL_SPATIAL_SIZE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sol features, float32 on the CPU: stats (B, 4) (locality, entropy, clustering, sparsity; each in [0, 1])
        and spatial (B, S, S) summing to 1, averaged over the teacher's self-attention layers. Inputs as extract_lune.
        """
        prompts = _check_prompts(prompts)
        t, seeds = per_sample_timesteps(timesteps, len(prompts)), per_sample_seeds(seed, len(prompts))
        stats, spatial = [], []
        for batch in _batches(len(prompts), batch_size, "Sol features"):
            context = self._clip_outputs(prompts[batch])[0]  # (B, 77, D)
            out = self.sol_of_context(context, t[batch], seeds[batch], batch_size, spatial_size)
            stats.append(out[0])
            spatial.append(out[1])
        return torch.cat(stats), torch.cat(spatial)

    @torch.no_grad()
    def sol_of_context(
        self,
        context: torch.Tensor,
        timesteps: float | torch.Tensor,
        seed: int | Sequence[int] = 0,
        batch_size: int = 64,
        spatial_size: int = SOL_SPATIAL_SIZE,
        teacher_grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """extract_sol of prompts given by their teacher context, as lune_of_context: the one place the Sol teacher
        runs, for extract_sol and for a cache's features at its t-buckets (cache_encode.sol_features)."""
        t, seeds = per_sample_timesteps(timesteps, len(context)), per_sample_seeds(seed, len(context))
        unet = self.load_sol()
        return sol_from_context(unet, context, t, seeds, self.dtype, batch_size, spatial_size, teacher_grid)


def _print_zoo(root: Path, what: str, seed: int) -> None:
    print(f"{what} written to {root} (seed {seed}):")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}  ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv: Sequence[str] | None = None) -> int:
    """The zoo's command line: write the tiny or the random zoo (test and benchmark tools), check a teacher file."""
    from tinyflux.tools.random_zoo import SPECS, ensure_random_zoo, make_random_zoo  # tools, only for this CLI
    from tinyflux.tools.tiny_zoo import make_tiny_zoo

    parser = argparse.ArgumentParser(prog="python -m tinyflux.frozen.zoo", description="ModelZoo utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-tiny", help="write the offline tiny zoo (random weights, real formats)")
    make.add_argument("path", help="directory to write the tiny zoo into")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    random_zoo = commands.add_parser(
        "make-random", help="write the real architectures with random bfloat16 weights (4.1 GB), for timing offline"
    )
    random_zoo.add_argument("path", help="directory to write the random zoo into")
    random_zoo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    random_zoo.add_argument(
        "--size", choices=sorted(SPECS), default="full", help="full: the real sizes; small: the tiny preset's widths"
    )
    random_zoo.add_argument(
        "--reuse", action="store_true", help="keep a zoo already at PATH whose marker says the same seed and size"
    )
    check = commands.add_parser(
        "check-teacher", help="print a teacher file's layout, where its tensors come from, and whether it loads"
    )
    check.add_argument("file", help="the teacher's .safetensors file")
    check.add_argument("--teacher_base", default=TEACHER_BASE_REPO, help="base UNet for a file holding part of one")
    check.add_argument("--config", default=None, help="folder of the UNet's config.json (default: beside the file)")
    args = parser.parse_args(argv)
    if args.command == "check-teacher":
        return 0 if check_teacher(args.file, args.teacher_base, args.config) else 1
    if args.command == "make-tiny":
        root = make_tiny_zoo(args.path, seed=args.seed)
        _print_zoo(root, "tiny zoo", args.seed)
        print(f"use it with ModelZoo(device='cpu', dtype=torch.float32, zoo={str(root)!r}) or --zoo {root}")
        return 0
    spec = SPECS[args.size]
    write = ensure_random_zoo if args.reuse else make_random_zoo
    root = write(args.path, args.seed, spec=spec)
    _print_zoo(root, f"{args.size} random zoo", args.seed)
    print(f"use it with ModelZoo(zoo={str(root)!r}, t5_layers=TinyFluxConfig.preset({spec.preset!r}).t5_layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
