"""The dtype names TinyFlux accepts on command lines and in files, and what "auto" picks, in one place."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO = "auto"  # --device auto / --dtype auto: pick_device / pick_dtype


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch dtype from 'float32' / 'fp32' / 'bfloat16' / 'bf16' / 'float16' / 'fp16' (or 'torch.float32', or a dtype)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the canonical name written to manifests and configs."""
    return str(dtype).removeprefix("torch.")


def pick_device(name: str | torch.device = AUTO) -> torch.device:
    """ "auto": the GPU when CUDA is available, else the CPU; any other name as it is (see cuda_missing)."""
    if str(name) == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_missing(device: str | torch.device) -> bool:
    """A CUDA device asked for on a machine without CUDA (each caller says what to do instead)."""
    return torch.device(device).type == "cuda" and not torch.cuda.is_available()


def pick_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """ "auto": bfloat16 on a GPU, float32 elsewhere (the CPU has no fast bf16 matmul); else parse_dtype(name)."""
    if str(name) == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return parse_dtype(name)
