"""Command line of train_tinyflux.py, generated from the dataclasses: ScriptArgs, TrainerConfig and TinyFluxConfig.

Every field of those three is a flag of the same name (`--learning_rate 3e-4`, `--hidden_size 256`) and a key of the
`--config FILE.yaml` file; the help text is the field's one-line comment. Precedence: flags > YAML > defaults.
Model fields override the architecture chosen with --model and default to "not given", so only what is on the command
line or in the YAML changes the preset. Unknown keys and flags are refused; contradictions fail here, at parse time.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from transformers import HfArgumentParser

from tinyflux.cache.buckets import BucketError, parse_buckets
from tinyflux.errors import TinyFluxError
from tinyflux.model.config import PRESETS, ConfigError, TinyFluxConfig
from tinyflux.trainer.config import TrainerConfig, TrainerConfigError
from tinyflux.trainer.resolution_schedule import ScheduleError, parse_resolution_schedule


class ArgsError(TinyFluxError, ValueError):
    """A command line or YAML config that cannot be turned into a run, with what to change."""


@dataclass
class ScriptArgs:
    """What to train on and from: the run-level flags that are neither trainer nor architecture fields."""

    config: Optional[str] = None  # YAML file whose keys are any of these flags' names; command-line flags win over it
    model: str = "default"  # architecture preset (default, deep, tiny), a config .json, or a checkpoint to start from
    cache: list[str] = field(default_factory=list)  # build_cache.py outputs to train on: directories or URL prefixes
    cache_weights: list[float] = field(default_factory=list)  # mixing weight of each --cache set; default all equal
    in_memory: bool = (
        False  # load the --cache sets into RAM: global shuffle, batches sharded by accelerate (no weights)
    )
    bucket_batch: str = "samples"  # on buckets / several resolutions: batch_size per shape, or "tokens" (equal tokens)
    resolution_schedule: Optional[str] = None  # "STEP:CACHE,...": stream each --cache set from its step on (first 0)
    zoo: Optional[str] = None  # encoders for sample grids: a zoo directory (make-tiny), or "hub" for the real models
    epochs: Optional[int] = None  # stop after this many epochs of the whole run; None = train until total_steps
    images: Optional[str] = None  # train from an image folder (same-stem .txt captions or a prompts.txt): cached first
    repeats: int = 1  # --images: times each image is seen per epoch
    cache_dir: Optional[str] = None  # --images: where its cache goes; default IMAGES/.tinyflux_cache
    resolution: int = 512  # --images: square side in pixels the images are cached at (multiple of 8)
    buckets: Optional[str] = None  # --images: aspect buckets, "auto" or "h,w;h,w" in pixels (build_cache.py --buckets)
    validation_cache: Optional[str] = None  # held-out cache (build_cache.py output) for the validation loss
    validation_fraction: Optional[float] = None  # or hold out this fraction of each training cache for it (fixed split)
    validation_samples: int = 256  # at most this many held-out samples are evaluated (validation_timesteps each)


@dataclass
class RunArgs:
    """A parsed command line: everything run_training needs."""

    script: ScriptArgs
    trainer: TrainerConfig
    model_config: TinyFluxConfig
    model_overrides: dict[str, Any]


def field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each field of a dataclass, read from its source: the help text of its flag."""
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = pattern.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _nullable(tp: type) -> Any:
    """argparse type for an Optional scalar with a non-None default: "none" / "null" turn it off."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def _cli_type(tp: Any, nullable: bool = True) -> Any:
    """The type argparse can read for a field type: dtypes as names, tuples as lists (nargs='+'), Optional scalars
    that also read "none" (when nullable)."""
    if _is_optional(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if nullable and inner in (int, float, str):
            return _nullable(inner)
        return Optional[_cli_type(inner)]
    if tp is torch.dtype:
        return str
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def _cli_default(value: Any) -> Any:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def cli_dataclass(cls: type, all_optional: bool = False) -> type:
    """A dataclass with cls's fields in argparse-readable types; with all_optional, every field defaults to None
    (not given) so that only flags actually passed are reported."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    specs = []
    for f in fields(cls):
        tp = _cli_type(hints[f.name], nullable=not all_optional)
        help_text = comments.get(f.name, "").replace("%", "%%")
        if all_optional:
            tp = tp if _is_optional(tp) else Optional[tp]
            spec = field(default=None, metadata={"help": help_text})
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory, metadata={"help": help_text})
        elif isinstance(f.default, tuple):
            spec = field(default_factory=lambda value=f.default: list(value), metadata={"help": help_text})
        else:
            spec = field(default=_cli_default(f.default), metadata={"help": help_text})
        specs.append((f.name, tp, spec))
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", specs)


ScriptFlags = cli_dataclass(ScriptArgs)
TrainerFlags = cli_dataclass(TrainerConfig)
ModelFlags = cli_dataclass(TinyFluxConfig, all_optional=True)
_GROUPS = (ScriptFlags, TrainerFlags, ModelFlags)


def _check_disjoint() -> None:
    seen: dict[str, str] = {}
    for cls in _GROUPS:
        for f in fields(cls):
            if f.name in seen:
                raise RuntimeError(f"field {f.name!r} is in both {seen[f.name]} and {cls.__name__}: rename one")
            seen[f.name] = cls.__name__


_check_disjoint()
KNOWN_KEYS = frozenset(f.name for cls in _GROUPS for f in fields(cls))


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        list(_GROUPS),
        description="Train a TinyFlux student. Flags are fields of ScriptArgs, TrainerConfig and TinyFluxConfig.",
        allow_abbrev=False,  # a typo must not silently set another field
    )
    parser.prog = "train_tinyflux.py"
    return parser


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(KNOWN_KEYS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_yaml(path: str) -> dict[str, Any]:
    """Flat mapping of a YAML config; refuses unknown keys with a suggestion."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ArgsError(f"--config {path}: cannot read it ({e})") from e
    except yaml.YAMLError as e:
        raise ArgsError(f"--config {path} is not valid YAML: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ArgsError(f"--config {path} must be a mapping of flag names to values, got {type(values).__name__}")
    unknown = sorted(set(values) - KNOWN_KEYS)
    if unknown:
        raise ArgsError(
            f"--config {path}: unknown key(s): "
            + ", ".join(f"{k!r}{_suggest(k)}" for k in unknown)
            + ". Keys are the flags of train_tinyflux.py --help (TrainerConfig, TinyFluxConfig and run fields)."
        )
    if "config" in values:
        raise ArgsError(f"--config {path}: a config file cannot name another config file")
    problems = [f"{key}: {problem}" for key, value in values.items() if (problem := _yaml_type_problem(key, value))]
    if problems:
        raise ArgsError(f"--config {path}: " + "; ".join(problems))
    return values


def _field_types() -> dict[str, Any]:
    return {
        name: tp
        for cls in (ScriptArgs, TrainerConfig, TinyFluxConfig)
        for name, tp in typing.get_type_hints(cls).items()
    }


def _type_name(tp: Any) -> str:
    if _is_optional(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, "a dtype name")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a YAML value has the field's type (argparse never sees YAML values, so nothing converts them)."""
    if _is_optional(tp):
        return value is None or _fits(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(value, list) and all(_fits(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, str) and tp in (int, float):  # YAML reads 1e-4 (no dot) as a string; argparse converts it
        try:
            value = tp(value)
        except ValueError:
            return False
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # NaN passes every `x <= 0` range check, so it is refused here
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if tp is str or tp is torch.dtype:
        return isinstance(value, str)
    return True


def _yaml_type_problem(key: str, value: Any) -> str | None:
    tp = _field_types()[key]
    return None if _fits(value, tp) else f"{value!r} is not {_type_name(tp)}"


def _normalise_resume(argv: list[str]) -> list[str]:
    """`--resume` with no value means `--resume latest`."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("latest")
    return out


def resolve_model_config(model: str, overrides: dict[str, Any]) -> TinyFluxConfig:
    """The architecture that --model names (preset, .json, or checkpoint), with overrides applied."""
    from tinyflux.model.loader import LoadError, load_config

    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+(:\S+)?", model) is not None  # user/repo[:subfolder]
    if model not in PRESETS and not Path(model).exists() and not hub_id:
        raise ArgsError(
            f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config .json, "
            f"checkpoint directory or .safetensors file, nor a Hub id user/repo[:subfolder]"
        )
    try:
        base = load_config(model)
        return TinyFluxConfig.from_dict({**base.to_dict(), **overrides})
    except (ConfigError, LoadError) as e:
        raise ArgsError(f"--model {model}: {e}") from e


def _check_folder_and_validation(script: ScriptArgs) -> None:
    """The --images and validation flags: one data source, values in range."""
    if script.images is not None and script.cache:
        raise ArgsError("pass --images DIR (a folder, cached on the fly) or --cache DIR ..., not both")
    if script.images is not None and not Path(script.images).is_dir():
        raise ArgsError(f"--images {script.images}: not a directory; pass a folder of images with .txt captions")
    if script.images is None and (script.repeats != 1 or script.cache_dir is not None):
        raise ArgsError("--repeats and --cache_dir belong to --images DIR: pass the image folder too")
    if script.repeats < 1:
        raise ArgsError(f"--repeats {script.repeats} must be >= 1")
    if script.resolution < 8 or script.resolution % 8:
        raise ArgsError(f"--resolution {script.resolution} must be a positive multiple of 8 (the VAE's downsampling)")
    if script.validation_cache is not None and script.validation_fraction is not None:
        raise ArgsError("pass --validation_cache DIR or --validation_fraction F, not both")
    if script.validation_fraction is not None and not 0.0 < script.validation_fraction < 1.0:
        raise ArgsError(f"--validation_fraction {script.validation_fraction} must lie in (0, 1), e.g. 0.1")
    if script.validation_cache is not None and not Path(script.validation_cache).is_dir():
        raise ArgsError(f"--validation_cache {script.validation_cache}: not a directory written by build_cache.py")
    if script.validation_samples < 1:
        raise ArgsError(f"--validation_samples {script.validation_samples} must be >= 1")


def _check_schedule(script: ScriptArgs) -> None:
    """--resolution_schedule: streamed --cache sets, one at a time, each named once or more."""
    if script.in_memory or script.images is not None or script.cache_weights:
        given = "--in_memory" if script.in_memory else "--images" if script.images is not None else "--cache_weights"
        raise ArgsError(f"--resolution_schedule streams its --cache sets one at a time: drop {given}")
    try:
        parse_resolution_schedule(script.resolution_schedule or "", script.cache)
    except ScheduleError as e:
        raise ArgsError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """Parse a command line (sys.argv[1:] when None) into a validated RunArgs; raises ArgsError on bad input."""
    import sys

    argv = _normalise_resume(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_yaml(known.config))
    script_flags, trainer_flags, model_flags, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if rest:
        flags = [a for a in rest if a.startswith("--")]
        hints = ", ".join(f"{a}{_suggest(a.lstrip('-').split('=')[0])}" for a in flags) or " ".join(rest)
        raise ArgsError(f"unknown argument(s): {hints}. See train_tinyflux.py --help.")
    script = ScriptArgs(**dataclasses.asdict(script_flags))
    try:
        trainer = TrainerConfig(**dataclasses.asdict(trainer_flags))
        if trainer.is_lora:  # a bad LoRA JSON fails here, before any data or model is loaded
            from tinyflux.trainer.lora import LoraSpec

            LoraSpec.from_trainer_config(trainer)
    except TrainerConfigError as e:
        raise ArgsError(str(e)) from e
    overrides = {k: v for k, v in dataclasses.asdict(model_flags).items() if v is not None}
    model_config = resolve_model_config(script.model, overrides)
    if script.epochs is not None and script.epochs < 1:
        raise ArgsError(f"--epochs {script.epochs} must be >= 1 (or left out to train until total_steps)")
    if script.cache_weights and len(script.cache_weights) != len(script.cache):
        raise ArgsError(
            f"--cache_weights has {len(script.cache_weights)} values for {len(script.cache)} --cache sets: "
            f"give one weight per set, or none for equal weights"
        )
    if any(w <= 0 for w in script.cache_weights):
        raise ArgsError(f"--cache_weights {script.cache_weights}: every weight must be > 0")
    _check_folder_and_validation(script)
    if script.bucket_batch not in ("samples", "tokens"):
        raise ArgsError(f"--bucket_batch {script.bucket_batch!r}: choose samples or tokens")
    if script.in_memory and script.cache_weights:
        raise ArgsError("--cache_weights mixes streamed caches; with --in_memory every sample is drawn once per epoch")
    if script.resolution_schedule is not None:
        _check_schedule(script)
    if script.buckets is not None:
        if script.images is None:
            raise ArgsError(
                "--buckets belongs to --images DIR (a --cache has its buckets from build_cache.py --buckets)"
            )
        try:
            parse_buckets(script.buckets, script.resolution)
        except BucketError as e:
            raise ArgsError(str(e)) from None
    return RunArgs(script=script, trainer=trainer, model_config=model_config, model_overrides=overrides)
