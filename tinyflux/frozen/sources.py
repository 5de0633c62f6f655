"""Where the zoo's models come from: the real Hub repos and files, local paths, and the errors when neither works.

Every source is a Hub repo id or a local path (a directory in Hugging Face layout, or a .safetensors file for a
teacher). Failures become one ZooError that names the source and the file and says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError

from tinyflux.errors import TinyFluxError

VAE_REPO = "black-forest-labs/FLUX.1-dev"
VAE_SUBFOLDER = "vae"
T5_REPO = "google/flan-t5-base"
CLIP_REPO = "openai/clip-vit-large-patch14"
EXPERTS_REPO = "AbstractPhil/tinyflux-experts"
LUNE_FILENAME = "sd15-flow-lune-unet.safetensors"
SOL_FILENAME = "sd15-flow-sol-unet.safetensors"
UNET_CONFIG_NAME = "config.json"  # a local teacher's UNet config, beside its .safetensors
T5_MAX_LENGTH = 128  # T5 tokens per prompt (padded / truncated)
CLIP_MAX_LENGTH = 77  # CLIP's context length
VAE_DOWNSAMPLE = 8  # pixels per latent pixel: the Flux VAE and the tiny zoo's (four blocks, three 2x downsamplings)
ZOO_SUBFOLDERS = {"vae": "vae", "t5": "t5", "clip": "clip", "experts": "experts"}  # a tiny zoo's layout
# The UNet a partial teacher file is laid over, as the original project loads the experts (docs/EXPERT_CACHE.md).
TEACHER_BASE_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TEACHER_BASE_SUBFOLDER = "unet"
ZOO_TEACHER_BASE = "teacher_base"  # a tiny zoo's base UNet, in TEACHER_BASE_SUBFOLDER below it (older zoos lack it)

# runwayml/stable-diffusion-v1-5 unet/config.json, held here so that the teachers need no second download.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ZooError(TinyFluxError, RuntimeError):
    """A model the zoo cannot load or use; the message names the source and says what to do."""


def advice(what: str) -> str:
    return (
        f"To fix: pass a local path for the {what} (a directory in Hugging Face layout), set HF_TOKEN for gated or "
        "private repos, or work offline with the tiny zoo: `python -m tinyflux.frozen.zoo make-tiny PATH`, then "
        "ModelZoo(zoo=PATH) (--zoo PATH on the scripts)."
    )


def _hub_cause(err: BaseException) -> BaseException:
    """The huggingface_hub error behind err, if any (transformers and diffusers re-raise them as OSError)."""
    hub_errors = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, hub_errors):
        cause = cause.__cause__ or cause.__context__
    return cause or err


def describe_load_error(err: BaseException, what: str, source: str, filename: str | None = None) -> str:
    """The ZooError message for a failed load of `filename` (or the whole repo) of `what` from `source`."""
    cause = _hub_cause(err)
    target = f"{filename!r} of {source!r}" if filename else repr(source)
    if isinstance(cause, GatedRepoError):
        problem = f"{source!r} is gated: accept its licence on huggingface.co and set HF_TOKEN (or `hf auth login`)"
    elif isinstance(cause, RepositoryNotFoundError):
        problem = f"no repo {source!r} on the Hub, or it is private (private repos need HF_TOKEN)"
    elif isinstance(cause, RevisionNotFoundError):
        problem = f"{source!r} has no such revision"
    elif isinstance(cause, LocalEntryNotFoundError):
        problem = f"{target} is not in the local Hugging Face cache and the Hub cannot be reached (offline?)"
    elif isinstance(cause, EntryNotFoundError):
        problem = f"{source!r} has no file {filename!r}" if filename else f"{source!r} lacks a file the loader needs"
    else:
        problem = f"{target} could not be loaded"
    lines = str(err).strip().splitlines()
    return f"cannot load the {what}: {problem}.\n{advice(what)}\n(cause: {type(err).__name__}: {lines[0] if lines else ''})"


@contextmanager
def loading(what: str, source: str, filename: str | None = None) -> Iterator[None]:
    """Turn the errors of a Hub or disk load inside the block into a ZooError naming `what`, `source`, `filename`."""
    try:
        yield
    except ZooError:
        raise
    except (OSError, ValueError, EntryNotFoundError, SafetensorError) as err:
        raise ZooError(describe_load_error(err, what, source, filename)) from err


def resolve_source(source: str | Path, what: str) -> Path | str:
    """A local path (Path) when `source` exists on disk, else a Hub repo id (str); ZooError for a missing local path."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "~")):
        raise ZooError(f"cannot load the {what}: the local path {text!r} does not exist.\n{advice(what)}")
    return text


def check_tiny_zoo(path: str | Path) -> Path:
    """The root of a tiny zoo written by make_tiny_zoo, or a ZooError saying how to write one."""
    root = Path(path).expanduser()
    missing = [sub for sub in ZOO_SUBFOLDERS.values() if not (root / sub).is_dir()]
    if missing:
        raise ZooError(
            f"{str(root)!r} is not a tiny zoo (missing {', '.join(s + '/' for s in missing)}). "
            f"Write one with `python -m tinyflux.frozen.zoo make-tiny {root}`."
        )
    return root


def local_teacher_file(experts: Path, filename: str, what: str) -> Path:
    """`filename` inside a local experts directory, or a ZooError listing what the directory holds."""
    weights = experts / filename
    if not weights.is_file():
        present = sorted(p.name for p in experts.glob("*.safetensors")) or "none"
        raise ZooError(
            f"cannot load the {what}: {weights} does not exist (.safetensors files in {experts}: {present}). "
            "Pass the file name in experts_repo, or a path to the .safetensors file, as `filename`."
        )
    return weights
