"""Load and save TinyFlux students: one code path for files, directories and Hub repos.

A saved model is a directory with `config.json` (TinyFluxConfig) and `model.safetensors` (the config is also kept in
the safetensors metadata, so a lone .safetensors file is self-describing). An EMA file (`ema.safetensors`, written by
tinyflux.trainer.ema.EMA.save) has the same keys and loads the same way.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tinyflux.errors import TinyFluxError
from tinyflux.model.config import PRESETS, TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep, released_shapes
from tinyflux.util.dtypes import cuda_missing

# The files of a model directory (a checkpoint is one): every module that names them imports them from here.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"  # the EMA's weights, same keys (EMA.save)
CONFIG_METADATA_KEY = "tinyflux_config"
# Name components that DDP, torch.compile, FSDP1 and activation-checkpoint wrappers insert into parameter names.
WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


class LoadError(TinyFluxError, RuntimeError):
    """A model source that cannot be found, read, or does not fit the config."""


def _resolve(source: str, filename: str) -> Path | None:
    """Local path of `filename` for source: a file, a directory, or a Hub id "user/repo[:subfolder]"."""
    path = Path(source)
    if path.is_file():
        return path if path.name == filename or filename == WEIGHTS_NAME else path.parent / filename
    if path.is_dir():
        return path / filename
    if source.count("/") < 1 or source.startswith((".", "/", "~")):
        raise LoadError(
            f"model source {source!r} is neither an existing file or directory nor a Hub id 'user/repo[:subfolder]'"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, subfolder = source.partition(":")
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: catch it first
        raise LoadError(
            f"{filename} of Hub repo {repo_id!r}{' subfolder ' + subfolder if subfolder else ''} is not in the local "
            f"Hub cache and the Hub cannot be reached (offline?). Download it once, or pass a local path."
        ) from e
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        raise LoadError(
            f"could not fetch {filename} from Hub repo {repo_id!r}: {e}. For a private or gated repo set HF_TOKEN; "
            f"otherwise check the repo id, or pass a local path."
        ) from e


def clean_name(name: str) -> str:
    """Parameter name without wrapper components: "module._orig_mod.a.b" -> "a.b"."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def _unwrap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare model names, and the released 0-dim shape for the scalar parameters (model.SCALAR_PARAMETERS)."""
    return released_shapes({clean_name(key): value for key, value in state.items()})


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return _unwrap_keys(load_file(str(path)))
        except SafetensorError as e:
            raise LoadError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from e
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise LoadError(f"{path} is not a readable torch checkpoint ({e}); re-save or re-download it") from e
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        return _unwrap_keys(obj)
    raise LoadError(f"{path}: unsupported weights format {path.suffix!r}; use .safetensors or .pt")


def _config_from_metadata(path: Path) -> TinyFluxConfig | None:
    if path.suffix != ".safetensors" or not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise LoadError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from e
    return TinyFluxConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY])) if CONFIG_METADATA_KEY in meta else None


def load_config(source: str) -> TinyFluxConfig:
    """Config from a preset name, a JSON file, a directory with config.json, a .safetensors with the config in its
    metadata, or a Hub id "user/repo[:subfolder]"."""
    if source in PRESETS:
        return TinyFluxConfig.preset(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return TinyFluxConfig.from_json(path)
    if path.is_file():
        from_meta = _config_from_metadata(path)
        if from_meta is not None:
            return from_meta
    config_path = _resolve(source, CONFIG_NAME)
    if config_path is None or not config_path.exists():
        raise LoadError(
            f"no {CONFIG_NAME} found for model source {source!r}; pass config=TinyFluxConfig(...) or a preset name "
            f"({', '.join(sorted(PRESETS))}), or save the model with tinyflux.model.loader.save_model"
        )
    return TinyFluxConfig.from_json(config_path)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise LoadError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"checkpoint {source} does not fit the model config:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {head(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {head(unexpected)}")
        if mis_shaped:
            parts.append(f"  shape mismatches ({len(mis_shaped)}): {head(mis_shaped)}")
        parts.append("  pass the config the checkpoint was trained with (config=... or a directory with config.json)")
        raise LoadError("\n".join(parts))


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if cuda_missing(device):
        warnings.warn("CUDA is not available: loading the model on CPU instead", stacklevel=3)
        return torch.device("cpu")
    return device


def load_model(
    source: str,
    config: TinyFluxConfig | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    weights_name: str = WEIGHTS_NAME,
) -> TinyFluxDeep:
    """Load a TinyFluxDeep from a .safetensors / .pt file, a directory (config.json + model.safetensors), or a Hub id
    "user/repo" / "user/repo:subfolder". `weights_name="ema.safetensors"` picks the EMA weights of a directory.

    The config comes from `config`, else the safetensors metadata, else a config.json beside the weights.
    """
    source = str(source)
    weights = Path(source) if Path(source).is_file() else _resolve(source, weights_name)
    if weights is None or not weights.exists():
        raise LoadError(f"no {weights_name} found for model source {source!r}")
    if config is None:
        config = _config_from_metadata(weights) or load_config(source)
    state = _read_state_dict(weights)
    model = TinyFluxDeep(config)
    check_state_dict(model, state, source)
    model.load_state_dict(state)
    return model.to(device=_device(device), dtype=dtype).eval()


def save_model(
    model: TinyFluxDeep,
    directory: str | os.PathLike,
    weights_name: str = WEIGHTS_NAME,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json and weights_name (safetensors, config in its metadata) into directory; returns the weights
    path. `state_dict` overrides the model's tensors (e.g. EMA weights or an FSDP-gathered state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_json(directory / CONFIG_NAME)
    state = _unwrap_keys(state_dict if state_dict is not None else model.state_dict())
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in state.items()
    }
    path = directory / weights_name
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path
