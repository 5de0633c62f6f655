"""LoRA on peft: which layers get adapters (flags and a JSON file), training them on a frozen base, their files, and
using them (stacked with scales for sampling, merged into a full checkpoint).

The adapters are peft's own LoRA layers, injected into the TinyFluxDeep in place (peft.inject_adapter_in_model), so
the Trainer, gradient checkpointing and block compile keep working on the same module tree. This module decides which
nn.Linear layers are adapted and with which settings, and hands peft the result as exact module names
(LoraConfig.target_modules, rank_pattern, alpha_pattern); peft has no per-module dropout, so that one is set on the
injected layers. The adapter files are peft's format: `adapter_config.json` and `adapter_model.safetensors` whose keys
carry PeftModel's `base_model.model.` prefix, so `PeftModel.from_pretrained(TinyFluxDeep(config), DIR)` loads them.

The JSON file (docs/LORA.md):

    {"defaults": {"rank": 8, "alpha": 8, "dropout": 0.0, "lr_scale": 1.0},
     "targets": "single_blocks\\.[20-24]\\.attn\\.(qkv|out_proj)",
     "patterns": {"single_blocks\\.2[34]\\.attn\\.qkv": {"rank": 16, "alpha": 16, "lr_scale": 2.0},
                  "single_blocks\\.20\\.attn\\.out_proj": {"enabled": false}}}

    python -m tinyflux.trainer.lora merge-lora --model BASE --lora DIR [--lora_scale S] --output OUT
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tinyflux.errors import TinyFluxError, message
from tinyflux.trainer.config import TrainerConfig, TrainerConfigError

if TYPE_CHECKING:  # peft imports transformers (seconds): a run without LoRA does not pay for it
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the wrapped model: its adapter files' keys start with it
ADAPTER_NAME = "default"  # peft's name for the one adapter the Trainer trains
# Every block's attention projections and MLP linears; the adaLN modulation linears keep their zero-init role.
DEFAULT_TARGETS = (
    r"(double_blocks\.\d+\.(attn\.(img_qkv|img_out|txt_qkv|txt_out)|(img_mlp|txt_mlp)\.(fc1|fc2))"
    r"|single_blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.(fc1|fc2))"
    r"|shared_txt_attn\.(txt_qkv|txt_out))"
)
_RANGE = re.compile(r"\[(\d+)-(\d+)\]")


class LoraConfigError(TrainerConfigError):
    """LoRA flags or a LoRA JSON file that cannot describe an adapter, with what to change."""


@dataclass(frozen=True)
class LoraSettings:
    """What one adapted layer gets."""

    rank: int = 8  # rows of lora_A (columns of lora_B)
    alpha: float | None = None  # the update is scaled by alpha / rank; None = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapter's input, training only
    lr_scale: float = 1.0  # this layer's learning rate = learning_rate * lr_scale
    enabled: bool = True  # False: the layer gets no adapter although targets matches it

    @property
    def lora_alpha(self) -> float:
        """peft's lora_alpha: alpha, or the rank when alpha is not given (scale 1)."""
        return float(self.rank if self.alpha is None else self.alpha)


_SETTING_KEYS = {f.name for f in fields(LoraSettings)}


def expand_ranges(pattern: str) -> str:
    """A regex where `[20-24]` means the numbers 20 to 24 (the original TinyFlux's block ranges), not a character
    class. Single-digit ranges such as `[0-9]` mean the same either way and are left alone."""

    def numbers(match: re.Match[str]) -> str:
        low, high = int(match.group(1)), int(match.group(2))
        if low <= 9 and high <= 9:
            return match.group(0)
        if low > high:
            raise LoraConfigError(f"LoRA pattern {pattern!r}: the range [{low}-{high}] is empty; write [{high}-{low}]")
        return "(?:" + "|".join(str(i) for i in range(low, high + 1)) + ")"

    return _RANGE.sub(numbers, pattern)


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(expand_ranges(pattern))
    except re.error as e:
        raise LoraConfigError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None


def _settings(values: Any, where: str, base: LoraSettings) -> LoraSettings:
    if not isinstance(values, dict):
        raise LoraConfigError(f"{where} must be an object of {sorted(_SETTING_KEYS)}, got {values!r}")
    unknown = sorted(set(values) - _SETTING_KEYS)
    if unknown:
        raise LoraConfigError(f"{where}: unknown key(s) {unknown}; the keys are {sorted(_SETTING_KEYS)}")
    settings = replace(base, **values)
    problems = []
    if not isinstance(settings.rank, int) or isinstance(settings.rank, bool) or settings.rank < 1:
        problems.append(f"rank={settings.rank!r} must be an integer >= 1")
    if settings.alpha is not None and not (isinstance(settings.alpha, int | float) and settings.alpha > 0):
        problems.append(f"alpha={settings.alpha!r} must be a number > 0")
    if not isinstance(settings.dropout, int | float) or not 0.0 <= settings.dropout < 1.0:
        problems.append(f"dropout={settings.dropout!r} must lie in [0, 1)")
    if not isinstance(settings.lr_scale, int | float) or settings.lr_scale <= 0:
        problems.append(f"lr_scale={settings.lr_scale!r} must be a number > 0")
    if not isinstance(settings.enabled, bool):
        problems.append(f"enabled={settings.enabled!r} must be true or false")
    if problems:
        raise LoraConfigError(f"{where}: " + "; ".join(problems))
    return settings


@dataclass
class LoraSpec:
    """Which nn.Linear layers get adapters: those whose name fully matches `targets`; each with `defaults`, updated
    by every pattern of `patterns` (regex -> settings) that fully matches its name, later patterns over earlier."""

    defaults: LoraSettings
    targets: str = DEFAULT_TARGETS
    patterns: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_trainer_config(cls, config: TrainerConfig) -> LoraSpec | None:
        """The run's spec: the lora_config file, with lora_rank / lora_alpha / lora_dropout / lora_targets (flags)
        over its values; None when the run is a full fine-tune (neither lora_rank nor lora_config)."""
        if config.lora_rank is None and config.lora_config is None:
            return None
        file: dict[str, Any] = {}
        if config.lora_config is not None:
            file = read_json(config.lora_config)
        where = f"lora_config {config.lora_config}"
        defaults = _settings(file.get("defaults", {}), f"{where}: defaults", LoraSettings())
        flags = {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
        defaults = _settings({k: v for k, v in flags.items() if v is not None}, "--lora_* flags", defaults)
        targets = config.lora_targets or file.get("targets") or DEFAULT_TARGETS
        patterns = file.get("patterns") or {}
        if not isinstance(targets, str) or not isinstance(patterns, dict):
            raise LoraConfigError(
                f"{where}: targets must be a regex string and patterns an object of regex -> settings"
            )
        spec = cls(defaults, targets, patterns)
        spec.check_patterns()
        return spec

    def check_patterns(self) -> None:
        """Raise LoraConfigError for a bad regex or a bad setting, before any model exists (at parse time)."""
        _compile(self.targets, "LoRA targets")
        for pattern, values in (self.patterns or {}).items():
            _compile(pattern, "LoRA pattern")
            _settings(values, f"LoRA pattern {pattern!r}", self.defaults)

    def resolve(self, model: nn.Module) -> dict[str, LoraSettings]:
        """Module name -> settings of every layer that gets an adapter, in model order."""
        targets = _compile(self.targets, "LoRA targets")
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        targeted = [name for name in linears if targets.fullmatch(name)]
        if not targeted:
            raise LoraConfigError(
                f"LoRA targets {self.targets!r} fully match no nn.Linear of the model; its linear layers are named "
                f"like {', '.join(linears[:3])}, ..., {linears[-1]} (see docs/LORA.md)"
            )
        settings = dict.fromkeys(targeted, self.defaults)
        for pattern, values in (self.patterns or {}).items():
            regex = _compile(pattern, "LoRA pattern")
            hits = [name for name in targeted if regex.fullmatch(name)]
            if not hits:
                raise LoraConfigError(
                    f"LoRA pattern {pattern!r} fully matches none of the {len(targeted)} targeted layers "
                    f"({', '.join(targeted[:3])}, ...): fix the pattern or widen targets"
                )
            for name in hits:
                settings[name] = _settings(values, f"LoRA pattern {pattern!r}", settings[name])
        chosen = {name: s for name, s in settings.items() if s.enabled}
        if not chosen:
            raise LoraConfigError("every targeted layer is disabled by a pattern: no adapter would train")
        return chosen

    def peft_config(self, resolved: dict[str, LoraSettings]) -> LoraConfig:
        """peft's LoraConfig for the resolved layers: exact names, and the ranks / alphas that differ from the
        defaults as rank_pattern / alpha_pattern entries (escaped names, so each matches its one layer)."""
        from peft import LoraConfig

        d = self.defaults
        return LoraConfig(
            r=d.rank,
            lora_alpha=d.lora_alpha,
            lora_dropout=d.dropout,
            target_modules=list(resolved),
            rank_pattern={re.escape(n): s.rank for n, s in resolved.items() if s.rank != d.rank},
            alpha_pattern={re.escape(n): s.lora_alpha for n, s in resolved.items() if s.lora_alpha != d.lora_alpha},
            bias="none",
        )


def read_json(path: str) -> dict[str, Any]:
    """The LoRA JSON file's top-level object (defaults, targets, patterns); LoraConfigError otherwise."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as e:
        raise LoraConfigError(f"lora_config {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise LoraConfigError(f"lora_config {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise LoraConfigError(f"lora_config {path} must be a JSON object with defaults / targets / patterns")
    unknown = sorted(set(values) - {"defaults", "targets", "patterns"})
    if unknown:
        raise LoraConfigError(f"lora_config {path}: unknown key(s) {unknown}; the keys are defaults, targets, patterns")
    return values


def apply_lora(model: nn.Module, spec: LoraSpec) -> tuple[LoraConfig, dict[nn.Parameter, float]]:
    """Inject the spec's adapters into `model` in place (peft freezes every other parameter). Returns peft's config
    and the learning-rate scale of each adapter parameter that differs from 1 (for the optimizer's groups)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    resolved = spec.resolve(model)
    config = spec.peft_config(resolved)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    scales: dict[nn.Parameter, float] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or name not in resolved:
            continue
        settings = resolved[name]
        if settings.dropout != spec.defaults.dropout:  # peft's LoraConfig has one dropout for all layers
            module.lora_dropout[ADAPTER_NAME] = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        if settings.lr_scale != 1.0:
            for p in (*module.lora_A[ADAPTER_NAME].parameters(), *module.lora_B[ADAPTER_NAME].parameters()):
                scales[p] = float(settings.lr_scale)
    return config, scales


def adapter_state(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter's tensors under peft's file keys (`base_model.model.<layer>.lora_A.weight`), from the model or
    from `state_dict` (the model's names: an EMA shadow, an FSDP-gathered state)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write peft's adapter_config.json and adapter_model.safetensors (float32) of the model's adapter (or of
    `state_dict`, e.g. the EMA's) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    path = directory / ADAPTER_WEIGHTS
    save_file(adapter_state(model, state_dict), str(path), metadata={"format": "pt"})
    return path


def read_adapter(directory: str | Path) -> dict[str, Tensor]:
    """An adapter file's tensors, keys as written (with peft's prefix)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LoraError(f"{directory}: no {ADAPTER_WEIGHTS}; --lora takes a directory that holds a peft LoRA adapter")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise LoraError(f"{path} is not a readable safetensors file ({e})") from None


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load an adapter file into the adapter already injected into `model` (a resume); every tensor must fit."""
    from peft import set_peft_model_state_dict

    state = {k.removeprefix(PEFT_PREFIX): v for k, v in read_adapter(directory).items()}
    expected = adapter_state(model)
    missing = sorted(set(expected) - {PEFT_PREFIX + k for k in state})
    if missing:
        raise LoraError(f"{directory}: the adapter lacks {missing[:3]}: it was trained with other LoRA targets")
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise LoraError(f"{directory}: tensors the model's adapter does not have: {result.unexpected_keys[:3]}")


class LoraError(TinyFluxError, ValueError):
    """An adapter that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Adapter:
    """A trained adapter to use: its directory (peft's files) and the factor on its update (0 = the base model)."""

    path: str
    scale: float = 1.0


def attach(model: nn.Module, adapters: Sequence[Adapter]) -> PeftModel:
    """Load every adapter onto `model` with peft (in place: `model` itself computes with them), all active together,
    each update multiplied by its scale. Returns the PeftModel (merge_and_unload() merges them)."""
    from peft import PeftModel

    if not adapters:
        raise LoraError("attach: no adapter given")
    names = [f"lora{i}" for i in range(len(adapters))]
    peft_model = None
    for name, adapter in zip(names, adapters, strict=True):
        read_adapter(adapter.path)  # a clear error for a wrong directory before peft's own
        if not (Path(adapter.path) / ADAPTER_CONFIG).is_file():
            raise LoraError(f"{adapter.path}: no {ADAPTER_CONFIG}; --lora takes a directory written by the trainer")
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, adapter.path, adapter_name=name)
            else:
                peft_model.load_adapter(adapter.path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise LoraError(f"{adapter.path} does not fit this model ({type(e).__name__}: {e})") from None
    peft_model.base_model.set_adapter(names)  # several active adapters add their updates
    set_scales(model, [adapter.scale for adapter in adapters])
    peft_model.eval()
    return peft_model


def set_scales(model: nn.Module, scales: Sequence[float]) -> None:
    """The factor on each attached adapter's update (attach's order), changed in place: a page's LoRA-scale slider
    sets it per request without reloading anything."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for i, scale in enumerate(scales):
                if f"lora{i}" in module.scaling:
                    module.set_scale(f"lora{i}", scale)


def merged(model: nn.Module, adapters: Sequence[Adapter]) -> nn.Module:
    """`model` with the adapters (and their scales) merged into its weights: a plain TinyFluxDeep again."""
    return attach(model, adapters).merge_and_unload()


def parse_adapters(paths: Sequence[str], scales: Sequence[float]) -> list[Adapter]:
    """--lora PATH ... with --lora_scale S ...: one scale for all, or one per adapter (default 1)."""
    scales = list(scales) or [1.0]
    if len(scales) == 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise LoraError(f"{len(paths)} --lora adapters but {len(scales)} --lora_scale values: give one, or one each")
    return [Adapter(p, float(s)) for p, s in zip(paths, scales, strict=True)]


def merge_cli(args: argparse.Namespace) -> Path:
    """merge-lora: the base from --model, the adapters merged at their scales, saved to --output (load_model reads
    it); returns the weights file."""
    from tinyflux.model.loader import load_model, save_model

    model = load_model(args.model, device="cpu", dtype=torch.float32)
    out = merged(model, parse_adapters(args.lora, args.lora_scale))
    return save_model(out, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tinyflux.trainer.lora merge-lora ...`: exit 0, or 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m tinyflux.trainer.lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge-lora", help="merge adapters into a full checkpoint that load_model reads")
    merge.add_argument("--model", required=True, help="base model: checkpoint directory, .safetensors or Hub id")
    merge.add_argument("--lora", required=True, nargs="+", help="adapter directories (adapter_model.safetensors)")
    merge.add_argument("--lora_scale", type=float, nargs="+", default=[], help="factor per adapter (default 1)")
    merge.add_argument("--output", required=True, help="directory for config.json + model.safetensors")
    args = parser.parse_args(argv)
    from tinyflux.model.loader import LoadError

    try:
        path = merge_cli(args)
    except (TinyFluxError, LoadError) as e:
        print(f"merge-lora: error: {message(e)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
