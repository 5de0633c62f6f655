"""The random full-size zoo: the real architectures with random weights, so cache building and sampling can be timed at
real size on a machine that cannot download the real weights.

`make_random_zoo(PATH)` (or `python -m tinyflux.frozen.zoo make-random PATH`) writes, in the tiny zoo's layout:

    PATH/vae/      the FLUX.1-dev VAE (AutoencoderKL, 128-256-512-512, 16 latent channels, Flux's scale and shift)
    PATH/t5/       the flan-t5-base encoder (T5EncoderModel, 12 layers x 768) + the tiny zoo's T5 tokenizer
    PATH/clip/     the CLIP ViT-L/14 text model (CLIPTextModel, 12 layers x 768) + the tiny zoo's CLIP tokenizer
    PATH/experts/  Lune and Sol: two UNet2DConditionModels with SD1.5's config (859.5M parameters each)
    PATH/random_zoo.json  what wrote it (seed, size, dtype, parameter counts); written last, so it marks a whole zoo

`ModelZoo(zoo=PATH)` loads it through the code paths that load the Hub models. Speed does not depend on the weights'
values, so timings taken with it are the real models' timings; the features it produces mean nothing. Weights are
bfloat16 (4.1 GB in all; float32 would be twice that) and drawn on the CPU in place, after building each model on the
meta device: no default init runs, so writing costs the random draws and the disk (bench/NOTES.md has the time).

The tokenizers are the tiny zoo's, trained locally on its caption corpus: their ids (< 1000) lie inside the real
vocabularies, and the models keep the real embedding tables. `SMALL_SPEC` is the same writer at the `tiny` preset's
widths, for tests and for checking scripts on a CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tinyflux.frozen import sources as layout
from tinyflux.model.config import TinyFluxConfig

# The tokenizer trainers of the tiny zoo (private there: the random zoo is their only other user).
from tinyflux.tools.tiny_zoo import VAE_CHANNELS, train_clip_tokenizer, train_t5_tokenizer

MARKER = "random_zoo.json"
MARKER_VERSION = 1  # bump when the layout or the weights' recipe changes: ensure_random_zoo then rewrites old zoos

# black-forest-labs/FLUX.1-dev vae/config.json as published on the Hub (diffusers 0.30), the same architecture as the
# reference code's `ae_params` in black-forest-labs/flux (ch 128, ch_mult (1, 2, 4, 4), num_res_blocks 2,
# z_channels 16, scale_factor 0.3611, shift_factor 0.1159); Flux's VAE has no quant / post-quant convolutions.
FLUX_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# google/flan-t5-base config.json, architecture fields (T5EncoderModel reads the encoder's; the rest are kept as
# published so the written config reads like the real one).
FLAN_T5_BASE_CONFIG: dict[str, Any] = {
    "d_ff": 2048,
    "d_kv": 64,
    "d_model": 768,
    "dropout_rate": 0.1,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 12,
    "num_heads": 12,
    "num_layers": 12,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# openai/clip-vit-large-patch14 config.json, its text_config.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}


@dataclass(frozen=True)
class RandomZooSpec:
    """The configs of a random zoo's models (one UNet config for both teachers) and the TinyFluxConfig preset whose
    widths they fit."""

    name: str
    preset: str
    vae: Mapping[str, Any]
    t5: Mapping[str, Any]
    clip: Mapping[str, Any]
    unet: Mapping[str, Any]


FULL_SPEC = RandomZooSpec(
    "full", "deep", FLUX_VAE_CONFIG, FLAN_T5_BASE_CONFIG, CLIP_L_TEXT_CONFIG, layout.SD15_UNET_CONFIG
)

# The same block structures at the `tiny` preset's widths (T5 64 x 4 layers, CLIP 64, UNet mid block 64, 16x16 teacher
# latents), with the real vocabulary sizes: a few MB, written in a second or two.
SMALL_SPEC = RandomZooSpec(
    "small",
    "tiny",
    {**FLUX_VAE_CONFIG, "block_out_channels": list(VAE_CHANNELS), "layers_per_block": 1, "norm_num_groups": 8},
    {**FLAN_T5_BASE_CONFIG, "d_ff": 128, "d_kv": 16, "d_model": 64, "num_heads": 4, "num_layers": 4},
    {
        **CLIP_L_TEXT_CONFIG,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": 64,
    },
    {
        **layout.SD15_UNET_CONFIG,
        "attention_head_dim": 2,
        "block_out_channels": [32, 32, 64, 64],
        "cross_attention_dim": 64,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 16,
    },
)
SPECS = {spec.name: spec for spec in (FULL_SPEC, SMALL_SPEC)}

# nn.Embedding std of each model's own _init_weights (T5: initializer_factor 1.0; CLIP: initializer_range 0.02).
_EMBEDDING_STD = {"t5": 1.0, "clip": 0.02}
_SEED_OFFSETS = {"vae": 0, "t5": 1, "clip": 2, "lune": 3, "sol": 4}  # as make_tiny_zoo seeds its models


def check_fits(spec: RandomZooSpec) -> TinyFluxConfig:
    """The preset spec.preset names, after checking that every width a student reads from the zoo fits it.

    Raises ValueError naming each field that does not fit.
    """
    cfg = TinyFluxConfig.preset(spec.preset)
    vae_factor = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    unet_width, clip_width = spec.unet["block_out_channels"][-1], spec.clip["hidden_size"]
    checks = [
        (
            spec.vae["latent_channels"] == cfg.in_channels,
            f"VAE latent_channels {spec.vae['latent_channels']} != in_channels",
        ),
        (vae_factor == layout.VAE_DOWNSAMPLE, f"VAE downsampling {vae_factor}x, not {layout.VAE_DOWNSAMPLE}x"),
        (spec.t5["d_model"] == cfg.t5_hidden_size, f"T5 d_model {spec.t5['d_model']} != t5_hidden_size"),
        (max(cfg.t5_layers) <= spec.t5["num_layers"], f"T5 has {spec.t5['num_layers']} layers < max(t5_layers)"),
        (clip_width == cfg.pooled_projection_dim, f"CLIP hidden_size {clip_width} != pooled_projection_dim"),
        (spec.clip["max_position_embeddings"] == layout.CLIP_MAX_LENGTH, "CLIP max_position_embeddings != 77"),
        (unet_width == cfg.lune_expert_dim, f"UNet mid block {unet_width} wide != lune_expert_dim"),
        (spec.unet["cross_attention_dim"] == clip_width, "UNet cross_attention_dim != CLIP hidden_size"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise ValueError(
            f"the {spec.name!r} random zoo does not fit the {spec.preset!r} preset ({cfg.in_channels} latent "
            f"channels, T5 {cfg.t5_hidden_size} wide with t5_layers {cfg.t5_layers}, pooled "
            f"{cfg.pooled_projection_dim}, lune_expert_dim {cfg.lune_expert_dim}): " + "; ".join(bad)
        )
    return cfg


def meta_models(
    spec: RandomZooSpec, clip_token_ids: Mapping[str, int] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, nn.Module]:
    """The four architectures of `spec` (vae, t5, clip, unet) on the meta device in `dtype`: no memory, no init.

    `clip_token_ids`: bos / eos / pad ids for the CLIP config (default: the real tokenizer's); CLIP finds its pooled
    (EOS) token by eos_token_id, so a zoo's config must carry its own tokenizer's. T5's are the real ones: 0 / 1.
    """
    with torch.device("meta"), _default_dtype(dtype):
        return {
            "vae": AutoencoderKL.from_config(dict(spec.vae)),
            "t5": T5EncoderModel(T5Config(**spec.t5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
            "clip": CLIPTextModel(CLIPTextConfig(**spec.clip, **(clip_token_ids or {}))),
            "unet": UNet2DConditionModel.from_config(dict(spec.unet)),
        }


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created in `dtype` directly: casting a diffusers model afterwards warns about float32 modules.
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def parameter_count(module: nn.Module) -> int:
    """Distinct parameters (tied weights once), as the published figures count them."""
    return sum(p.numel() for p in module.parameters())


def _is_norm(module: nn.Module) -> bool:
    # GroupNorm, LayerNorm and T5LayerNorm (T5's RMSNorm): their weights start at 1, their biases at 0.
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, embedding_std: float = 1.0) -> nn.Module:
    """Fill every parameter in place from a generator seeded with `seed`, at the scale of the default inits.

    Norm weights 1 and biases 0 (as every default init); embeddings N(0, embedding_std); every other weight
    N(0, 1 / fan_in): T5's own init, and within sqrt(3) of PyTorch's Linear / Conv default (uniform, bound
    1 / sqrt(fan_in)). Values do not change speed; this scale keeps activations finite in bfloat16.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: drawn once
                continue
            seen.add(id(param))
            if name == "bias":
                param.zero_()
            elif _is_norm(sub):
                param.fill_(1.0)
            elif isinstance(sub, nn.Embedding):
                param.normal_(0.0, embedding_std, generator=generator)
            else:
                fan_in = param[0].numel()  # (out, in, *kernel) -> in * kernel
                param.normal_(0.0, fan_in**-0.5, generator=generator)
    return module


def materialize(module: nn.Module, seed: int, embedding_std: float = 1.0) -> nn.Module:
    """A meta-device module allocated on the CPU in its own dtype (no float32 copy) and filled by randomize_."""
    module = module.to_empty(device="cpu")
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # to_empty gives tied weights separate storage; tie them again before drawing them
    return randomize_(module, seed, embedding_std)


def make_random_zoo(
    path: str | Path, seed: int = 0, *, spec: RandomZooSpec = FULL_SPEC, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a random zoo of `spec` (default: full size) to `path`, created if needed; return it as a Path.

    Existing files are overwritten; the marker file is removed first and written last, so an interrupted write is
    never taken for a whole zoo. The same seed writes the same weights (the tokenizers come from the tiny zoo's
    trainers, whose vocabularies can differ between processes; no model size depends on them).
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; make_random_zoo needs a directory to write the zoo into")
    check_fits(spec)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    start = time.perf_counter()
    tokenizers = {
        "t5": train_t5_tokenizer(layout.T5_MAX_LENGTH),
        "clip": train_clip_tokenizer(layout.CLIP_MAX_LENGTH),
    }
    clip_ids = {k: getattr(tokenizers["clip"], k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    models = meta_models(spec, clip_ids, dtype)
    if models["t5"].config.pad_token_id != tokenizers["t5"].pad_token_id:
        raise ValueError("the T5 tokenizer's pad id differs from the T5 config's")
    for name, tokenizer in tokenizers.items():
        vocab = models[name].config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"the {name} tokenizer has {len(tokenizer)} ids but the model only {vocab} embeddings")

    counts = {}
    for name in ("vae", "t5", "clip"):
        model = materialize(models.pop(name), seed + _SEED_OFFSETS[name], _EMBEDDING_STD.get(name, 1.0))
        counts[name] = parameter_count(model)
        out = root / layout.ZOO_SUBFOLDERS[name]
        model.save_pretrained(out)
        if name in tokenizers:
            tokenizers[name].save_pretrained(out)
        del model  # one model in memory at a time: the full zoo's largest is a 1.7 GB UNet
    experts = root / layout.ZOO_SUBFOLDERS["experts"]
    experts.mkdir(parents=True, exist_ok=True)
    unet = materialize(models.pop("unet"), seed + _SEED_OFFSETS["lune"])
    unet.save_config(experts)
    for name, filename in (("lune", layout.LUNE_FILENAME), ("sol", layout.SOL_FILENAME)):
        if name != "lune":  # both teachers are drawn, in turn, into the one UNet's memory
            randomize_(unet, seed + _SEED_OFFSETS[name])
        counts[name] = parameter_count(unet)
        save_file(unet.state_dict(), experts / filename)
    del unet
    info = {
        "written_by": "tinyflux.frozen.zoo make-random",
        "version": MARKER_VERSION,
        "seed": seed,
        "size": spec.name,
        "preset": spec.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": counts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (root / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return root


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a whole random zoo at `path`, or None where there is none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_random_zoo(
    path: str | Path, seed: int = 0, *, spec: RandomZooSpec = FULL_SPEC, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """`path` holding a random zoo of `spec`, `seed` and `dtype`: reused when its marker says so, else written."""
    marker = read_marker(path)
    wanted = {"version": MARKER_VERSION, "seed": seed, "size": spec.name, "dtype": str(dtype).removeprefix("torch.")}
    if marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
        return Path(path)
    return make_random_zoo(path, seed, spec=spec, dtype=dtype)
