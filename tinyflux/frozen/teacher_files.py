"""Teacher files as published: what a Lune / Sol .safetensors file holds, and the whole UNet it is loaded as.

The original project loads each teacher as the SD1.5 base UNet with the expert file laid over it
(`load_state_dict(..., strict=False)`). The same files load here, saying what they used and never on random weights:

- a whole UNet in diffusers names: the file alone, no base; keys beyond the UNet's are ignored and named;
- part of a UNet: the base UNet (`teacher_base`, default SD1.5's `unet` subfolder) with the file laid over it;
- the original SD single-file layout (`model.diffusion_model.*`): renamed by diffusers' own single-file conversion,
  then whole or part as above; the VAE and text-encoder keys of a whole SD checkpoint are ignored and named.

Refused with a ZooError: a file whose shapes do not fit the UNet config, or one sharing fewer than half of its keys
with the UNet (not a UNet for this config). Layouts and how to check a file first: docs/EXPERT_CACHE.md, "Teacher files".
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint
from safetensors.torch import load_file

from tinyflux.frozen.sources import (
    SD15_UNET_CONFIG,
    TEACHER_BASE_SUBFOLDER,
    UNET_CONFIG_NAME,
    ZooError,
    loading,
    resolve_source,
)

logger = logging.getLogger(__name__)

DIFFUSERS_LAYOUT = "diffusers"
ORIGINAL_LAYOUT = f"original SD single-file ({LDM_UNET_KEY}*)"
_LDM_GROUPS = ("input_blocks", "middle_block", "output_blocks")


def teacher_config(folder: Path) -> dict[str, Any]:
    """The UNet config of teacher weights in `folder`: its config.json, else the SD1.5 UNet config."""
    if (folder / UNET_CONFIG_NAME).is_file():
        return dict(UNet2DConditionModel.load_config(str(folder), config_name=UNET_CONFIG_NAME))
    return dict(SD15_UNET_CONFIG)


def original_to_diffusers(raw: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The `model.diffusion_model.*` tensors of an original SD file under diffusers names, by diffusers' conversion.

    diffusers counts a group's blocks by the distinct indices present, so a file holding only some blocks (say the
    attention of input_blocks 1, 2, 4, 5, 7, 8) would lose its last ones: an empty placeholder for every missing index
    keeps that count equal to the index range. Placeholders land under names of their own and are dropped here.
    """
    placeholder = torch.empty(0)
    padded = dict(raw)
    for group in _LDM_GROUPS:
        prefix = f"{LDM_UNET_KEY}{group}."
        present = {int(k[len(prefix) :].split(".")[0]) for k in raw if k.startswith(prefix)}
        padded |= {f"{prefix}{i}.placeholder": placeholder for i in set(range(max(present, default=-1) + 1)) - present}
    converted = convert_ldm_unet_checkpoint(padded, config)
    return {name: w for name, w in converted.items() if w is not None and w is not placeholder}


def _name_keys(keys: list[str]) -> str:
    """A few keys by name; many by prefix with counts (a whole SD checkpoint has hundreds of VAE / CLIP keys)."""
    if len(keys) <= 6:
        return ", ".join(keys)
    groups = sorted(Counter(".".join(k.split(".")[: 3 if k.startswith(LDM_UNET_KEY) else 1]) for k in keys).items())
    named = ", ".join(f"{group}.* ({n})" for group, n in groups[:8])
    return named + (f" and {len(groups) - 8} more prefixes" if len(groups) > 8 else "")


@dataclass
class TeacherFile:
    """One teacher file read against the UNet of its config: what it holds and what the base must add."""

    path: Path
    layout: str  # DIFFUSERS_LAYOUT or ORIGINAL_LAYOUT
    tensors: dict[str, torch.Tensor]  # the file's UNet tensors under diffusers names
    shapes: dict[str, torch.Size]  # every tensor of the UNet for the config
    ignored: list[str]  # the file's keys that are no tensor of this UNet
    num_keys: int  # keys in the file
    candidates: int  # keys that may be UNet tensors: all of a diffusers file, model.diffusion_model.* of an SD one

    @property
    def total(self) -> int:
        return len(self.shapes)

    @property
    def from_file(self) -> int:
        return len(self.tensors)

    @property
    def needs_base(self) -> bool:
        return self.from_file < self.total

    def problem(self) -> str | None:
        """Why this file cannot be the teacher (one line), or None."""
        if self.from_file == 0 or 2 * self.from_file < self.candidates:
            return (
                f"{self.path} is not a UNet for this config: only {self.from_file} of its {self.candidates} "
                f"{self.layout} keys are tensors of the UNet (ignored: {_name_keys(self.ignored)}); it must hold "
                "UNet2DConditionModel weights in diffusers names or in the original SD layout (model.diffusion_model.*)"
            )
        wrong = [(k, w.shape, self.shapes[k]) for k, w in self.tensors.items() if w.shape != self.shapes[k]]
        if wrong:
            name, found, expected = wrong[0]
            return (
                f"{self.path} does not fit the UNet config: {len(wrong)} of its {self.from_file} UNet tensors have "
                f"other shapes (e.g. {name}: {tuple(found)} in the file, {tuple(expected)} in the config); put the "
                f"UNet's {UNET_CONFIG_NAME} beside the file, or use a file made for the SD1.5 UNet"
            )
        return None

    def check(self, what: str) -> None:
        problem = self.problem()
        if problem:
            raise ZooError(f"cannot load the {what}: {problem}")

    def counts(self, base: str) -> str:
        """`N of N tensors from FILE` or `K from FILE, N-K from BASE`, with the layout when converted."""
        if self.needs_base:
            counts = f"{self.from_file} from {self.path}, {self.total - self.from_file} from {base}"
        else:
            counts = f"{self.total} of {self.total} tensors from {self.path}"
        converted = " (original SD layout, converted by diffusers)" if self.layout == ORIGINAL_LAYOUT else ""
        return counts + converted

    def summary(self, what: str, base: str) -> str:
        return f"{what}: {self.counts(base)}"

    def ignored_line(self, what: str) -> str:
        return f"{what}: ignored {len(self.ignored)} keys of {self.path} beyond the UNet: {_name_keys(self.ignored)}"

    def state(
        self, base: dict[str, torch.Tensor], base_name: str, what: str, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Every tensor of the UNet: the file's, else the base's; a ZooError when the base lacks one or has another
        shape, rather than a UNet with some weights left out."""
        missing = [k for k in self.shapes if k not in self.tensors and k not in base]
        wrong = [k for k in self.shapes if k not in self.tensors and k in base and base[k].shape != self.shapes[k]]
        if missing or wrong:
            raise ZooError(
                f"cannot load the {what}: the base UNet {base_name} does not fit the teacher's UNet config: "
                f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(wrong)} of other shapes (e.g. {wrong[:2]}); "
                "pass a base UNet of that config as teacher_base (--teacher_base)"
            )
        return {k: self.tensors.get(k, base.get(k)).to(device=device, dtype=dtype) for k in self.shapes}


def read_teacher_file(path: Path, unet: UNet2DConditionModel, device: str = "cpu") -> TeacherFile:
    """Read `path` against `unet` (its config and tensor shapes; a meta-device UNet will do)."""
    raw = load_file(path, device=device)
    shapes = {name: w.shape for name, w in unet.state_dict().items()}
    if any(k.startswith(LDM_UNET_KEY) for k in raw):
        layout = ORIGINAL_LAYOUT
        unet_part = {k: w for k, w in raw.items() if k.startswith(LDM_UNET_KEY)}
        converted = original_to_diffusers(unet_part, unet.config)
        placed = {id(w) for name, w in converted.items() if name in shapes}
        ignored = [k for k, w in raw.items() if id(w) not in placed]  # VAE, text encoder, EMA, unconverted keys
        candidates = len(unet_part)
    else:
        layout, converted, candidates = DIFFUSERS_LAYOUT, raw, len(raw)
        ignored = [k for k in raw if k not in shapes]
    tensors = {name: w for name, w in converted.items() if name in shapes}
    return TeacherFile(path, layout, tensors, shapes, sorted(ignored), len(raw), candidates)


def load_base_state(source: str, what: str, dtype: torch.dtype, token: str | None) -> tuple[dict[str, Any], str]:
    """The base UNet's tensors and its name: `source` is a Hub repo (its `unet` subfolder) or a local folder holding
    the UNet (config.json + weights) or a whole pipeline with it in `unet/`."""
    where = resolve_source(source, f"{what}'s base UNet")
    subfolder: str | None = TEACHER_BASE_SUBFOLDER
    if isinstance(where, Path):
        if (where / UNET_CONFIG_NAME).is_file():
            subfolder = None
        elif not (where / TEACHER_BASE_SUBFOLDER / UNET_CONFIG_NAME).is_file():
            raise ZooError(
                f"cannot load the {what}'s base UNet: no {UNET_CONFIG_NAME} in {where} or {where / subfolder}; pass "
                "a UNet folder or a Stable Diffusion 1.5 folder as teacher_base (--teacher_base)"
            )
    name = f"{source}/{subfolder}" if subfolder else str(source)
    with loading(f"{what}'s base UNet", str(source), f"{subfolder}/" if subfolder else None):
        base = UNet2DConditionModel.from_pretrained(str(where), subfolder=subfolder, torch_dtype=dtype, token=token)
    return base.state_dict(), name


def load_teacher_unet(
    weights: Path,
    config: dict[str, Any],
    what: str,
    base: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    token: str | None = None,
) -> UNet2DConditionModel:
    """The teacher UNet of `config` from `weights`, laid over the base UNet `base` when the file holds only part of it.

    Built on the meta device (no random init of ~860M weights, and none to fall back on): a strict load then proves
    that every tensor came from the file or the base.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    with loading(what, str(weights)):
        teacher = read_teacher_file(weights, unet, device=str(device))
    teacher.check(what)
    base_state, base_name = load_base_state(base, what, dtype, token) if teacher.needs_base else ({}, base)
    unet.load_state_dict(teacher.state(base_state, base_name, what, device, dtype), assign=True)
    logger.info(teacher.summary(what, base_name))
    if teacher.ignored:
        logger.info(teacher.ignored_line(what))
    return unet


def check_teacher(path: str, base: str, config_folder: str | None = None, token: str | None = None) -> bool:
    """Print a teacher file's layout, what it would take from the base, what it ignores, and whether it loads."""
    weights = Path(path).expanduser()
    if not weights.is_file():
        print(f"{path}: no such file")
        return False
    folder = Path(config_folder).expanduser() if config_folder else weights.parent
    config = teacher_config(folder)
    source = folder / UNET_CONFIG_NAME if (folder / UNET_CONFIG_NAME).is_file() else "the SD1.5 UNet config (in code)"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    teacher = read_teacher_file(weights, unet)
    print(f"file:   {weights} ({teacher.layout} layout, {teacher.num_keys} keys)")
    print(f"config: {source} ({teacher.total} tensors)")
    print(f"counts: {teacher.counts(base)}")
    if teacher.ignored:
        print(f"ignored: {_name_keys(teacher.ignored)}")
    try:
        # bfloat16: loading checks fit and sources without the memory of a float32 copy (3.4 GB for SD1.5)
        load_teacher_unet(
            weights, config, "teacher", base, device=torch.device("cpu"), dtype=torch.bfloat16, token=token
        )
    except ZooError as err:
        print(f"loads:  no: {err}")
        return False
    print(f"loads:  yes{f', with the base {base}' if teacher.needs_base else ', alone (no base needed)'}")
    return True
