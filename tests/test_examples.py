"""Every fenced ```bash / ```sh / ```python example of README.md and docs/*.md is checked, so no example can rot.

docs/TECHNICAL.md is generated from docstrings and skipped. A fence in a language not classified here fails
(IGNORED_LANGS lists the ones that are not commands or code: diagrams, JSON, YAML).

Shell blocks (test_shell_example_parses): `\\` continuations joined, comments stripped, split at `&&`, `||`, `;`,
`|`, `&`; redirections dropped. Each command of ours is parsed by its script's real parser, so a renamed or removed
flag or a bad value fails naming the command's file:line:
- `python build_cache.py` (BuildCacheArgs with its checks), `python train_tinyflux.py` (tinyflux.trainer.args.parse_args
  with all its checks, the `--config` YAML included), `python sample.py` / `python app.py` (their HfArgumentParser
  dataclasses; sample.py's prompt, size and aspect checks), `python -m tinyflux.MODULE` (the module's own argparse,
  main() stopped right after parsing), `python bench/NAME.py` (the same, its main() reading sys.argv),
  `python -c CODE` (compiled, its imports resolved);
- `accelerate launch` (accelerate's launch_command_parser, the config file loaded by its validation, then the launched
  script's parser on the script's flags);
- `DRY_RUN=1 bash slurm/train.sbatch ...` and `sbatch ... slurm/train.sbatch ...` (rendered with DRY_RUN=1, a 2-node
  SLURM environment and a fake `scontrol`; the accelerate launch line it prints is parsed as above);
- `make TARGET` (a target of the Makefile); `echo "key: value" >> run.yaml` (the line loads as a run file: known keys,
  right types).
Other programs must be in ALLOWED_PROGRAMS, `python -m` modules of others in ALLOWED_MODULES, environment prefixes in
ALLOWED_ENV: an unclassified new example fails until it is classified. A token naming a file of the repository
(accelerate_configs/..., slurm/..., tests/...) must exist.

The parse checks run in a scratch directory that looks like the repository root (accelerate_configs/, slurm/ and the
scripts linked in) and holds `run.yaml` and `runs/deep.yaml` (docs/APPLICATIONS.md's ```yaml run file) and `lora.json`
(docs/LORA.md's ```json file). Inputs a parser checks for existence are created empty first (`--images DIR`,
`--validation_cache DIR`, local `--wds` tars; an absolute path moves under the scratch directory). One substitution:
a train_tinyflux.py `--model` that is a Hub id or a checkpoint that does not exist here becomes the `deep` preset
(AbstractPhil/tiny-flux-deep is the `deep` preset's network).

Blocks that run, each in a fresh directory, offline on the tiny zoo (tests/fixtures_zoo.py), in this process:
- README "Fine-tune on your own images", the offline block, as written (40 `tiny` steps); the validation losses it
  logs are compared with the ones the README states after it;
- docs/CACHE_FORMAT.md "Commands", its offline lines: `n=256` -> `n=8` demo images;
- docs/APPLICATIONS.md "Train from scratch", the offline block: `n=256` -> `n=8`, `--total_steps 200` -> `2` (and
  `step_0000200` -> `step_0000002`), `--sample_every 100` -> `1`;
- every ```python block, with its PYTHON_RUNS entry (found by a line of the block; a new block fails until it has
  one): the names it uses without defining them, files its relative paths name (links to the session's tiny caches
  of tests/fixtures_cache.py: `caches/mine`, `runs/cache` -> the built demo cache, `caches/a` / `caches/b` -> the two
  synthetic shard sets; `my_cache.safetensors` written from the built cache; tiny checkpoints where a checkpoint path
  is named), and substitutions. For every block: "AbstractPhil/tiny-flux-deep" -> a tiny model in the released
  format (the original's config.json and key names at the tiny zoo's widths), preset / load_config "deep" -> "tiny",
  total_steps -> 2, and load_model's CUDA / bfloat16 defaults -> CPU / float32. Per block: `device="cuda"` -> "cpu",
  torch.bfloat16 -> float32, `ModelZoo(...)` gains the tiny zoo; CACHE_FORMAT's shard range -> the built cache's,
  `num_workers=4` -> 0 and its loop body `...` -> a list of the batches; APPLICATIONS' sampling `num_steps=28` -> 2
  and 64 x 64 latents -> 8 x 8.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

from tinyflux.model.config import PRESETS, TinyFluxConfig

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "TECHNICAL.md")]
SHELL_LANGS = {"bash", "sh", "shell"}
PYTHON_LANGS = {"python", "py"}
# Fences that are not commands or code: diagrams and layouts (no language), data files (read below where they matter).
IGNORED_LANGS = {"", "text", "json", "yaml"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@dataclass(frozen=True)
class Block:
    """One fenced code block: its file (relative to the repo), the line of its first code line, language, text."""

    path: str
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, dedented by their fence's indentation (blocks inside list items)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(```+)\s*([\w+-]*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: the ``` fence opened here is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : j]]
        blocks.append(Block(str(path.relative_to(ROOT)), i + 2, lang.lower(), "\n".join(body)))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in read_blocks(path)]


BLOCKS = all_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL_LANGS]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON_LANGS]


def find_block(path: str, lang: str, marker: str) -> Block:
    """The one block of `path` in `lang` that contains `marker` (how a test finds the example it runs)."""
    found = [b for b in BLOCKS if b.path == path and b.lang in lang.split("|") and marker in b.text]
    assert len(found) == 1, (
        f"{path}: expected one ```{lang} block containing {marker!r}, found {len(found)} "
        f"({', '.join(b.where for b in found) or 'none'}): the example moved or changed; update tests/test_examples.py"
    )
    return found[0]


def test_every_fence_has_a_known_language():
    unknown = [f"{b.where}: ```{b.lang}" for b in BLOCKS if b.lang not in SHELL_LANGS | PYTHON_LANGS | IGNORED_LANGS]
    assert not unknown, (
        "fenced blocks in a language this test does not classify (label commands `bash`, code `python`, "
        "or add the language to IGNORED_LANGS in tests/test_examples.py):\n  " + "\n  ".join(unknown)
    )


# ----------------------------------------------------------------------------------------------------------------
# Shell: commands out of a block


@dataclass
class Command:
    block: Block
    line: int  # line in the markdown file where the command starts
    env: dict[str, str]
    argv: list[str]
    writes: list[str] = field(default_factory=list)  # targets of > / >> redirections

    @property
    def where(self) -> str:
        return f"{self.block.path}:{self.line}"

    def __str__(self) -> str:
        return " ".join(shlex.quote(a) for a in [*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", ">&", "&>", "2>>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_commands(block: Block) -> list[Command]:
    """Commands of a shell block: continuations joined, comments stripped, split at && || ; | &."""
    commands: list[Command] = []
    raw = block.text.splitlines()
    i = 0
    while i < len(raw):
        start, text = i, raw[i]
        while text.rstrip().endswith("\\") and i + 1 < len(raw):
            i += 1
            text = text.rstrip()[:-1] + " " + raw[i]
        i += 1
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:
            raise AssertionError(
                f"{block.path}:{block.line + start}: cannot split the shell line ({e}): {text}"
            ) from None
        words: list[str] = []
        writes: list[str] = []
        redirection = None
        for token in [*tokens, ";"]:
            if redirection is not None:
                if redirection.endswith(">"):
                    writes.append(token)
                redirection = None
            elif token in REDIRECTIONS:
                redirection = token
            elif token in SEPARATORS:
                env = {}
                while words and ENV_ASSIGNMENT.match(words[0]):
                    key, _, value = words.pop(0).partition("=")
                    env[key] = value
                if words or env:
                    commands.append(Command(block, block.line + start, env, words, writes))
                words, writes = [], []
            else:
                words.append(token)
    return commands


def test_shell_splitting_joins_continuations_and_splits_operators():
    block = Block(
        "x.md",
        10,
        "bash",
        "A=1 B='x y' python sample.py --prompt \"a; b\" \\\n    --seed 0 && make demo  # comment\n"
        'echo "k: [v]" >> run.yaml; tar tvf f.tar | head\n',
    )
    got = [(c.line, c.env, c.argv, c.writes) for c in shell_commands(block)]
    assert got == [
        (10, {"A": "1", "B": "x y"}, ["python", "sample.py", "--prompt", "a; b", "--seed", "0"], []),
        (10, {}, ["make", "demo"], []),
        (12, {}, ["echo", "k: [v]"], ["run.yaml"]),
        (12, {}, ["tar", "tvf", "f.tar"], []),
        (12, {}, ["head"], []),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Shell: what each command is checked against

# Programs that are not ours: the example is allowed as written (only its repository paths are checked).
ALLOWED_PROGRAMS = {
    "pip": "installs packages",
    "apt-get": "system packages (SLURM, Chromium)",
    "apt": "system packages",
    "aws": "S3 copies",
    "gsutil": "GCS copies",
    "hf": "Hub uploads",
    "echo": "writes a run.yaml line",
    "tar": "lists a shard",
    "head": "pages output",
    "export": "sets a variable",
    ".": "activates a venv",
    "source": "activates a venv",
    "srun": "SLURM",
    "squeue": "SLURM",
    "sinfo": "SLURM",
    "scancel": "SLURM",
    "slurm/local_cluster.sh": "the local SLURM cluster of the tests (tests/test_slurm.py runs it)",
}
# `python -m` modules that are not ours.
ALLOWED_MODULES = {"venv": "creates a venv", "pip": "installs packages", "pytest": "the test suite"}
# Environment prefixes an example may set (regexes, full match).
ALLOWED_ENV = [
    r"TINYFLUX_\w+",
    r"DRY_RUN",
    r"SLURM_\w+",
    r"ACCELERATE_CONFIG",
    r"GPUS_PER_NODE",
    r"MAIN_(ADDR|PORT)",
    r"HF_\w+",
    r"WANDB_\w+",
    r"CUDA_VISIBLE_DEVICES",
    r"PYTEST_ARGS",
    r"DEMO_DIR",
]
# Top-level entries of the repository: a token starting with one of these names a file that must exist.
REPO_PREFIXES = ("accelerate_configs/", "slurm/", "tests/", "bench/", "docs/", "tinyflux/", "requirements")


class ExampleError(AssertionError):
    pass


def fail(cmd: Command, problem: str) -> NoReturn:
    raise ExampleError(f"{cmd.where}: {problem}\n  command: {cmd}")


def check_repo_paths(cmd: Command) -> None:
    for token in [*cmd.argv, *cmd.env.values()]:
        for word in token.split():
            if word.startswith(REPO_PREFIXES) and not any(c in word for c in "*{$<"):
                path = word.split("::")[0].rstrip(",")
                if not (ROOT / path).exists():
                    fail(cmd, f"{path} does not exist in the repository: fix the path in the example")


class Parsed(Exception):  # noqa: N818 - a signal, not an error
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


@contextlib.contextmanager
def parse_only() -> Iterator[None]:
    """Stop a CLI's main() right after its argparse parse: the namespace comes back as Parsed."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def run_parser(cmd: Command, what: str, parse: Callable[[], Any]) -> Any:
    """Call a parser; argparse's exit and the scripts' own usage errors become a failure that names the command."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse()
    except SystemExit as e:
        lines = stderr.getvalue().strip().splitlines()[-1:] or [f"exit {e.code}"]
        problem = f"{what} refuses the flags: {lines[0]}\n  fix the example or the flag it names"
    except (ValueError, TypeError) as e:  # the scripts' usage errors derive from ValueError
        problem = f"{what} refuses the command: {type(e).__name__}: {e}\n  fix the example or the value it names"
    fail(cmd, problem)


def runs_as_main(module: str) -> bool:
    """Whether `python -m module` runs something: its file (found on disk, not through sys.modules, where a moved
    module's old name may point at its new home) has an `if __name__ == "__main__":`, or its package a __main__.py."""
    from importlib.machinery import PathFinder

    parent, _, _ = module.rpartition(".")
    spec = PathFinder.find_spec(module, importlib.import_module(parent).__path__ if parent else None)
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations:
        return (Path(spec.origin).parent / "__main__.py").is_file()
    return re.search(r"""if __name__ == ["']__main__["']:""", Path(spec.origin).read_text()) is not None


def parse_module_cli(cmd: Command, module: str, argv: list[str]) -> argparse.Namespace:
    try:
        main = importlib.import_module(module).main
    except (ImportError, AttributeError) as e:
        fail(cmd, f"python -m {module}: {e}; fix the module path in the example")
    if not runs_as_main(module):
        fail(cmd, f'python -m {module} runs nothing: the module has no `if __name__ == "__main__":`; fix the path')

    def parse() -> argparse.Namespace:
        with parse_only():
            try:
                main(argv)
            except Parsed as parsed:
                return parsed.namespace
        raise AssertionError(f"python -m {module}: main() did not parse its arguments with argparse")

    return run_parser(cmd, f"python -m {module}", parse)


def materialise(value: str, kind: str) -> str:
    """Create an input a parser checks for existence (relative to the cwd; an absolute path moves under it)."""
    if "://" in value or value.startswith("pipe:"):
        return value
    path = Path(value.lstrip("/"))
    if kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "tars":
        import braceexpand

        if "{" in value:
            for name in braceexpand.braceexpand(str(path)):
                Path(name).parent.mkdir(parents=True, exist_ok=True)
                Path(name).touch()
        elif value.endswith(".tar"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:  # a folder of tars (img2dataset's output)
            path.mkdir(parents=True, exist_ok=True)
            (path / "00000.tar").touch()
    return str(path)


def materialise_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    """argv with the values of the given input flags created (and absolute paths moved under the cwd)."""
    out, current = [], None
    for arg in argv:
        if arg.startswith("--"):
            current = flags.get(arg)
            out.append(arg)
        elif current is not None:
            out.append(materialise(arg, current))
        else:
            out.append(arg)
    return out


def check_build_cache(cmd: Command, argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from build_cache import BuildCacheArgs  # the script's own dataclass, wherever the package keeps it

    argv = materialise_flags(argv, {"--images": "dir", "--wds": "tars"})
    run_parser(cmd, "build_cache.py", lambda: HfArgumentParser(BuildCacheArgs).parse_args_into_dataclasses(argv))


def substitute_model(argv: list[str]) -> list[str]:
    """A --model that is neither a preset nor a path here (a Hub id, the user's checkpoint) -> the deep preset."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--model" and out[i + 1] not in PRESETS and not Path(out[i + 1]).exists():
            out[i + 1] = "deep"
    return out


def train_parsing() -> Any:
    """The module that holds train_tinyflux.py's parse_args and load_yaml, found through the script's own main (so the
    test follows the package wherever it keeps them)."""
    import train_tinyflux

    run = sys.modules[train_tinyflux.main.__module__]
    return sys.modules[run.parse_args.__module__]


def check_train(cmd: Command, argv: list[str]) -> None:
    parse_args = train_parsing().parse_args
    argv = substitute_model(materialise_flags(argv, {"--images": "dir", "--validation_cache": "dir"}))
    run_parser(cmd, "train_tinyflux.py", lambda: parse_args(argv))


def check_sample(cmd: Command, argv: list[str]) -> None:
    from transformers import HfArgumentParser

    import sample

    def parse() -> None:
        (args,) = HfArgumentParser(sample.SampleArgs).parse_args_into_dataclasses(args=argv)
        sample.read_prompts(args)
        height, width = args.height, args.width
        if args.aspect is not None:
            height, width = sample.aspect_size(args.aspect, height, width, 8)
        sample.latent_size(height, "height", 1)
        sample.latent_size(width, "width", 1)
        if args.lora_scale and len(args.lora_scale) not in (1, len(args.lora)):
            raise ValueError(f"{len(args.lora)} --lora but {len(args.lora_scale)} --lora_scale values")

    run_parser(cmd, "sample.py", parse)


def check_app(cmd: Command, argv: list[str]) -> None:
    from transformers import HfArgumentParser

    import app

    run_parser(cmd, "app.py", lambda: HfArgumentParser(app.AppArgs).parse_args_into_dataclasses(args=argv))


SCRIPTS: dict[str, Callable[[Command, list[str]], None]] = {
    "build_cache.py": check_build_cache,
    "train_tinyflux.py": check_train,
    "sample.py": check_sample,
    "app.py": check_app,
}


def check_python_code(cmd: Command, code: str) -> None:
    """`python -c CODE`: it compiles and every name it imports exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        fail(cmd, f"python -c: the code does not compile: {e}")
    problem = unresolved_import(tree)
    if problem:
        fail(cmd, f"python -c: {problem}")


def unresolved_import(tree: ast.AST) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                return f"`from {node.module} import ...`: {e}"
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        return f"`from {node.module} import {alias.name}`: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    importlib.import_module(alias.name)
                except ImportError as e:
                    return f"`import {alias.name}`: {e}"
    return None


def check_python(cmd: Command, argv: list[str]) -> None:
    if not argv:
        fail(cmd, "python without arguments")
    if argv[0] == "-c":
        check_python_code(cmd, argv[1])
    elif argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        if module in ALLOWED_MODULES:
            return
        if module == "tests.test_docs":
            if rest:
                fail(cmd, "python -m tests.test_docs takes no arguments")
            return
        if not module.startswith("tinyflux."):
            fail(cmd, f"python -m {module}: not ours (tinyflux.*) and not in ALLOWED_MODULES of tests/test_examples.py")
        parse_module_cli(cmd, module, rest)
    elif argv[0] in SCRIPTS:
        SCRIPTS[argv[0]](cmd, argv[1:])
    elif re.fullmatch(r"bench/\w+\.py", argv[0]) and (ROOT / argv[0]).is_file():
        check_bench(cmd, argv[0], argv[1:])
    else:
        fail(cmd, f"python {argv[0]}: not a script this test knows; add its parser to SCRIPTS")


def check_bench(cmd: Command, script: str, argv: list[str]) -> None:
    """bench/NAME.py: its main() (which reads sys.argv) stopped right after its argparse parse."""
    import runpy

    def parse() -> argparse.Namespace:
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv, sys.path = [script, *argv], [str(ROOT / "bench"), *sys.path]
        try:
            with parse_only():
                runpy.run_path(str(ROOT / script), run_name="__main__")
        except Parsed as parsed:
            return parsed.namespace
        finally:
            sys.argv, sys.path = saved_argv, saved_path
        raise AssertionError(f"{script}: it did not parse its arguments with argparse")

    run_parser(cmd, script, parse)


def check_accelerate(cmd: Command, argv: list[str]) -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    if argv[:1] != ["launch"]:
        fail(cmd, f"accelerate {' '.join(argv[:1])}: only `accelerate launch` is classified")
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config_file" and not Path(argv[i + 1]).is_file():
            fail(cmd, f"--config_file {argv[i + 1]} does not exist")
    args = run_parser(cmd, "accelerate launch", lambda: launch_command_parser().parse_args(argv[1:]))
    with contextlib.redirect_stderr(io.StringIO()):
        args, _, _ = _validate_launch_command(args)
    script = args.training_script
    if script not in SCRIPTS:
        fail(cmd, f"accelerate launch {script}: not a script this test knows; add its parser to SCRIPTS")
    SCRIPTS[script](cmd, list(args.training_script_args))


def render_sbatch(cmd: Command, args: list[str], env: dict[str, str], fake_bin: Path) -> None:
    """slurm/train.sbatch ARGS with DRY_RUN=1: it must exit 0 and print an accelerate launch line that parses."""
    full_env = {
        **os.environ,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        **env,
        "DRY_RUN": "1",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "VIRTUAL_ENV": sys.prefix,
    }
    out = subprocess.run(
        ["bash", "slurm/train.sbatch", *args], env=full_env, capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        fail(cmd, f"slurm/train.sbatch with DRY_RUN=1 exits {out.returncode}: {out.stderr.strip()[-300:]}")
    launch = [line for line in out.stdout.splitlines() if line.startswith("accelerate launch")]
    if len(launch) != 1:
        fail(cmd, f"slurm/train.sbatch with DRY_RUN=1 printed no accelerate launch line:\n{out.stdout}")
    check_accelerate(cmd, shlex.split(launch[0])[1:])


def check_bash(cmd: Command, argv: list[str], fake_bin: Path) -> None:
    if argv[:1] != ["slurm/train.sbatch"]:
        fail(cmd, f"bash {' '.join(argv[:1])}: only `DRY_RUN=1 bash slurm/train.sbatch ...` is classified")
    if cmd.env.get("DRY_RUN") != "1":
        fail(cmd, "bash slurm/train.sbatch without DRY_RUN=1 would start a job; examples render it with DRY_RUN=1")
    render_sbatch(cmd, argv[1:], cmd.env, fake_bin)


def check_sbatch(cmd: Command, argv: list[str], fake_bin: Path) -> None:
    """sbatch is SLURM's; where it submits slurm/train.sbatch, the script's own arguments are rendered and parsed."""
    if "slurm/train.sbatch" in argv:
        rest = argv[argv.index("slurm/train.sbatch") + 1 :]
        render_sbatch(cmd, rest, cmd.env, fake_bin)


def check_yaml_lines(cmd: Command, text: str) -> None:
    """`echo "key: value" >> run.yaml`: the line is YAML whose keys are train_tinyflux.py's."""
    import tempfile

    load_yaml = train_parsing().load_yaml
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text + "\n")
        f.flush()
        run_parser(cmd, "the run file's YAML", lambda: load_yaml(f.name))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):", text, flags=re.M))


def check_command(cmd: Command, fake_bin: Path) -> None:
    for key in cmd.env:
        if not any(re.fullmatch(p, key) for p in ALLOWED_ENV):
            fail(cmd, f"environment variable {key}: not in ALLOWED_ENV of tests/test_examples.py; classify it")
    check_repo_paths(cmd)
    if not cmd.argv:
        return
    program, argv = cmd.argv[0], cmd.argv[1:]
    if program == "python" or program == "python3" or program.endswith("/bin/python"):
        check_python(cmd, argv)
    elif program == "accelerate":
        check_accelerate(cmd, argv)
    elif program == "bash":
        check_bash(cmd, argv, fake_bin)
    elif program == "sbatch":
        check_sbatch(cmd, argv, fake_bin)
    elif program == "echo" and any(w.endswith((".yaml", ".yml")) for w in cmd.writes):
        check_yaml_lines(cmd, " ".join(argv))
    elif program == "make":
        unknown = [t for t in argv if not t.startswith("-") and "=" not in t and t not in make_targets()]
        if unknown:
            fail(cmd, f"make {' '.join(unknown)}: no such target in the Makefile")
    elif program not in ALLOWED_PROGRAMS:
        fail(
            cmd,
            f"{program}: a program this test does not classify; parse it (ours) or add it to ALLOWED_PROGRAMS "
            "in tests/test_examples.py",
        )


# ----------------------------------------------------------------------------------------------------------------
# Shell: the parse checks


def yaml_run_file() -> str:
    return find_block("docs/APPLICATIONS.md", "yaml", "cache:").text


def lora_json_file() -> str:
    return find_block("docs/LORA.md", "json", '"targets"').text


@pytest.fixture(scope="module")
def parse_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory that looks like the repository root for the parse checks (see the module docstring)."""
    root = tmp_path_factory.mktemp("examples_parse")
    for name in ("accelerate_configs", "slurm", "build_cache.py", "train_tinyflux.py", "sample.py", "app.py"):
        (root / name).symlink_to(ROOT / name)
    (root / "run.yaml").write_text(yaml_run_file())
    (root / "runs").mkdir()
    (root / "runs" / "deep.yaml").write_text(yaml_run_file())
    (root / "lora.json").write_text(lora_json_file())
    fake_bin = root / "fake_bin"
    fake_bin.mkdir()
    # scontrol of a 2-node allocation: expands the node list; `show node` prints nothing (the name is the address).
    (fake_bin / "scontrol").write_text(
        '#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "node01\\nnode02\\n"; fi\n'
    )
    (fake_bin / "scontrol").chmod(0o755)
    return root


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_shell_example_parses(block: Block, parse_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(parse_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commands = shell_commands(block)
    assert commands, f"{block.where}: a ```{block.lang} block without a command"
    for cmd in commands:
        check_command(cmd, parse_root / "fake_bin")


def test_a_renamed_flag_or_a_bad_value_fails_with_the_line(parse_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(parse_root)
    bad = {
        "python train_tinyflux.py --cache c --model tiny --total_step 10": "--total_step",
        "python train_tinyflux.py --cache c --model tiny --total_steps ten": "invalid int value",
        "python sample.py --model m --prompt a --heigth 64": "--heigth",
        "python build_cache.py --images d --output o --resolution 500": "--resolution 500",
        "python -m tinyflux.frozen.zoo make-tinny z": "make-tinny",
        "python -m tinyflux.zoo make-tiny z": "fix the module path",
        "python -m tinyflux.model.config": "fix the",
        "python bench/bench_step.py --roundz 3": "--roundz",
        "accelerate launch --config_file accelerate_configs/nope.yaml train_tinyflux.py": "nope.yaml",
        "accelerate launch --num_proceses 2 train_tinyflux.py --model tiny": "--num_proceses",
        "python -c 'from tinyflux.tools.demo_images import write_demo_image'": "no write_demo_image",
        "make demos": "no such target",
        'echo "cahce: [x]" >> run.yaml': "cahce",
        "rsync a b": "ALLOWED_PROGRAMS",
        "FOO=1 make demo": "ALLOWED_ENV",
        "sbatch slurm/train.sbatch run.yaml --lerning_rate 1": "--lerning_rate",
        "python sample.py --model m --prompt a --aspect 3x2": "aspect",
    }
    for line, expected in bad.items():
        block = Block("EXAMPLE.md", 7, "bash", line)
        with pytest.raises(ExampleError) as info:  # noqa: PT012 - a block of one command or two
            for cmd in shell_commands(block):
                check_command(cmd, parse_root / "fake_bin")
            raise AssertionError(f"passed the checks: {line}")
        assert info.value.args[0].startswith("EXAMPLE.md:7: ") and expected in info.value.args[0], (line, info.value)


def test_the_run_file_and_the_lora_file_examples_load(tmp_path: Path):
    """docs/APPLICATIONS.md's run.yaml and docs/LORA.md's lora.json, which the parse checks use, load as they are."""
    parse_args = train_parsing().parse_args

    for block, argv in (
        (find_block("docs/APPLICATIONS.md", "yaml", "cache:"), ["--config"]),
        (find_block("docs/LORA.md", "json", '"targets"'), ["--model", "deep", "--lora_config"]),
    ):
        path = tmp_path / f"example.{block.lang}"
        path.write_text(block.text)
        cmd = Command(block, block.line, {}, ["python", "train_tinyflux.py", *argv, block.lang])
        run_parser(cmd, f"train_tinyflux.py on this {block.lang} file", lambda a=[*argv, str(path)]: parse_args(a))


def test_python_blocks_compile_and_their_imports_exist():
    problems = []
    for block in PYTHON_BLOCKS:
        try:
            tree = ast.parse(block.text)
        except SyntaxError as e:
            problems.append(f"{block.path}:{block.line + (e.lineno or 1) - 1}: does not compile: {e.msg}")
            continue
        problem = unresolved_import(tree)
        if problem:
            problems.append(f"{block.where}: {problem}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------------------------
# Running: shell blocks in-process, each in a fresh directory, on the tiny zoo


def substituted(block: Block, subs: list[tuple[str, str]], from_marker: str | None = None) -> Block:
    """The block from the line holding from_marker (all of it without one), each (old, new) replaced; an old text
    the example no longer holds fails, since the test would then no longer run what the docs show."""
    text, line = block.text, block.line
    if from_marker is not None:
        lines = text.splitlines()
        start = next(i for i, t in enumerate(lines) if from_marker in t)
        text, line = "\n".join(lines[start:]), block.line + start
    for old, new in subs:
        assert old in text, (
            f"{block.where}: the example no longer contains {old!r}, which tests/test_examples.py replaces by "
            f"{new!r} to run it; update the substitution"
        )
        text = text.replace(old, new)
    return Block(block.path, line, block.lang, text)


def run_in_process(cmd: Command) -> int:
    """One of our commands, run in this process (a fresh interpreter costs seconds of imports per command)."""
    argv = cmd.argv
    assert argv[0] == "python", f"{cmd.where}: no in-process runner for {argv[0]}"
    if argv[1] == "-c":
        exec(compile(argv[2], f"{cmd.where} (python -c)", "exec"), {"__name__": "__main__"})
        return 0
    if argv[1] == "-m" and argv[2].startswith("tinyflux."):
        return importlib.import_module(argv[2]).main(argv[3:])
    if argv[1] == "build_cache.py":
        import build_cache

        return build_cache.main(argv[2:])
    if argv[1] == "train_tinyflux.py":
        import train_tinyflux

        return train_tinyflux.main(argv[2:])
    if argv[1] == "sample.py":
        import sample

        return sample.cli(argv[2:])
    raise AssertionError(f"{cmd.where}: no in-process runner for {cmd}")


def run_block(block: Block) -> None:
    for cmd in shell_commands(block):
        code = run_in_process(cmd)
        assert code == 0, f"{cmd.where}: exits {code} (see the log above)\n  command: {cmd}"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, no Hub access."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def stated_validation_losses() -> dict[int, float]:
    """The validation losses README.md's fine-tune paragraph states: `step 0 validation loss 1.05 ...` etc."""
    text = (ROOT / "README.md").read_text()
    block = find_block("README.md", "bash", "write_demo_images('runs/shapes'")
    after = text.split(block.text, 1)[1][:600]
    stated = {int(m[1]): float(m[2]) for m in re.finditer(r"`step (\d+) [^`]*?(\d+\.\d+)", after)}
    assert stated, (
        "README.md: the paragraph after the offline fine-tune block no longer states its validation losses as "
        "`step N validation loss X ...`; tests/test_examples.py compares them with the run"
    )
    return stated


@pytest.mark.slow
def test_readme_offline_fine_tune_runs_as_written_and_logs_the_stated_losses(offline, caplog):
    """README "Fine-tune on your own images": make-tiny, write_demo_images, 40 steps on the folder, sample.py."""
    block = find_block("README.md", "bash", "write_demo_images('runs/shapes'")
    caplog.set_level(logging.INFO, logger="tinyflux.trainer.validation")
    run_block(block)
    checkpoint = offline / "runs/ft/step_0000040"
    assert {"model.safetensors", "ema.safetensors", "config.json", "COMPLETE"} <= {p.name for p in checkpoint.iterdir()}
    assert (offline / "runs/ft_grids/grid_step0000040.png").is_file()
    assert (offline / "runs/ft_samples/grid.png").is_file()
    logged = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) validation loss ([\d.]+)", caplog.text)}
    for step, loss in stated_validation_losses().items():
        assert abs(logged.get(step, float("nan")) - loss) < 0.006, (
            f"README.md states validation loss {loss} at step {step} of its offline fine-tune; the run logs "
            f"{logged}: update the README's figures (or find what changed the run)"
        )


@pytest.mark.slow
def test_cache_format_offline_block_builds_the_cache(offline):
    """docs/CACHE_FORMAT.md "Commands", its offline lines (make-tiny onwards), with 8 demo images instead of 256."""
    block = find_block("docs/CACHE_FORMAT.md", "bash", "make-tiny runs/zoo")
    run_block(substituted(block, [("n=256", "n=8")], from_marker="make-tiny runs/zoo"))
    import json

    manifest = json.loads((offline / "runs/cache/manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["t5_layers"] == list(TinyFluxConfig.preset("tiny").t5_layers)
    assert (offline / "runs/cache/report.txt").is_file()


@pytest.mark.slow
def test_applications_from_scratch_recipe_runs(offline):
    """docs/APPLICATIONS.md "Train from scratch", the offline block: 8 images, 2 steps, a grid at each step."""
    block = find_block("docs/APPLICATIONS.md", "bash", "make-tiny runs/zoo")
    subs = [("n=256", "n=8"), ("--total_steps 200", "--total_steps 2"), ("step_0000200", "step_0000002")]
    run_block(substituted(block, [*subs, ("--sample_every 100", "--sample_every 1")]))
    checkpoint = offline / "runs/ckpt/step_0000002"
    written = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "config.json", "trainer_config.json", "COMPLETE"} <= written
    assert (offline / "runs/grids/grid_step0000002.png").is_file()
    assert any((offline / "runs/logs/tinyflux").glob("events.out.tfevents.*"))
    assert {p.name for p in (offline / "runs/samples").iterdir()} == {"grid.png", "000_a_red_circle.png"}


# ----------------------------------------------------------------------------------------------------------------
# Running: every python block, with the setup its entry names


@dataclass
class Fixtures:
    """What the python blocks run against: the session's tiny zoo and caches, a working directory."""

    cwd: Path
    zoo: Path
    built: Any  # tests.fixtures_cache.BuiltCache
    synthetic_a: Path
    synthetic_b: Path
    released: Path

    def link(self, name: str, target: Path) -> None:
        """cwd/name -> target, so that the example's own relative path reaches a fixture."""
        (self.cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (self.cwd / name).symlink_to(target)


@dataclass
class PythonRun:
    """How one python block runs: a line that identifies it, text substitutions (each must apply), a setup that
    creates files and returns the names the block uses without defining them, and a check of what it left."""

    marker: str
    subs: list[tuple[str, str]] = field(default_factory=list)
    setup: Callable[[Fixtures], dict[str, Any]] = lambda fx: {}
    check: Callable[[dict[str, Any], Fixtures], None] = lambda ns, fx: None


# Substitutions for every block, where the text occurs: the Hub's released model -> the tiny released-format model,
# the deep preset -> tiny, any step count -> 2.
COMMON_SUBS: list[tuple[str, Callable[[Fixtures], str]]] = [
    (r'"AbstractPhil/tiny-flux-deep"', lambda fx: repr(str(fx.released))),
    (r'(preset|load_config)\("deep"\)', lambda fx: r'\1("tiny")'),
    (r"total_steps=\d+", lambda fx: "total_steps=2"),
    (r'"--total_steps", "\d+"', lambda fx: '"--total_steps", "2"'),
]


def tiny_checkpoint(directory: Path) -> Path:
    """A `tiny` model directory as training writes it: config.json, model.safetensors, ema.safetensors."""
    from tinyflux.model.loader import save_model
    from tinyflux.model.model import TinyFluxDeep
    from tinyflux.trainer.ema import EMA

    torch.manual_seed(0)
    model = TinyFluxDeep(TinyFluxConfig.preset("tiny"))
    save_model(model, directory)
    ema = EMA(model)
    with torch.no_grad():
        for shadow in ema.shadow.values():
            shadow.add_(0.01)
    ema.save(str(directory / "ema.safetensors"))
    return directory


def readme_api_setup(fx: Fixtures) -> dict[str, Any]:
    from tinyflux.cache.memory import DatasetCache

    DatasetCache.from_shards(fx.built.output).save(str(fx.cwd / "my_cache.safetensors"))
    return {}


def readme_api_check(ns: dict[str, Any], fx: Fixtures) -> None:
    # 11 samples at batch 8: one epoch is 2 micro-batches; 4 accumulate to an optimizer step, so the epoch's tail
    # is stepped at the end of the epoch: 1 step
    assert ns["trainer"].current_step == 1 and len(ns["cache"]) == len(fx.built.good_keys)


def loader_names(fx: Fixtures) -> dict[str, Any]:
    """What README's Python block defines, for the blocks that continue it."""
    from torch.utils.data import DataLoader

    from tinyflux.cache.loaders import CachedDataset, collate_fn
    from tinyflux.cache.memory import DatasetCache, MultiSourceCache
    from tinyflux.frozen.zoo import ModelZoo
    from tinyflux.model.model import TinyFluxDeep
    from tinyflux.sampling.sampler import Sampler
    from tinyflux.trainer.trainer import Trainer, TrainerConfig

    cache = DatasetCache.from_shards(fx.built.output)
    loader = DataLoader(CachedDataset(cache), batch_size=4, shuffle=True, collate_fn=collate_fn)
    tiny = TinyFluxConfig.preset("tiny")
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=str(fx.zoo), t5_layers=tiny.t5_layers)
    return {
        "torch": torch,
        "Trainer": Trainer,
        "TrainerConfig": TrainerConfig,
        "TinyFluxDeep": TinyFluxDeep,
        "TinyFluxConfig": TinyFluxConfig,
        "Sampler": Sampler,
        "zoo": zoo,
        "loader": loader,
        "multi_cache": MultiSourceCache().add(cache, dataset_id=0),
    }


def webdataset_setup(fx: Fixtures) -> dict[str, Any]:
    fx.link("caches/mine", fx.built.output)
    return {}


def webdataset_subs(fx: Fixtures) -> list[tuple[str, str]]:
    last = len(list((fx.built.output / "shards").glob("shard-*.tar"))) - 1
    return [("{000000..000009}", f"{{000000..{last:06d}}}")]


def webdataset_check(ns: dict[str, Any], fx: Fixtures) -> None:
    assert {"latents", "t5_embeds", "clip_pooled"} <= set(ns["tensors"]), sorted(ns["tensors"])
    assert isinstance(ns["caption"], str) and ns["caption"]


def stream_setup(fx: Fixtures) -> dict[str, Any]:
    from tinyflux.model.model import TinyFluxDeep

    fx.link("caches/a", fx.synthetic_a)
    fx.link("caches/b", fx.synthetic_b)
    return {"model": TinyFluxDeep(TinyFluxConfig.preset("tiny")), "seen": []}


def stream_check(ns: dict[str, Any], fx: Fixtures) -> None:
    import json

    sizes = [batch["latents"].shape[0] for batch in ns["seen"]]
    assert sizes and max(sizes) <= 16, sizes
    assert json.loads(json.dumps(ns["state"])) == ns["state"]


def zoo_check(ns: dict[str, Any], fx: Fixtures) -> None:
    n = len(ns["prompts"])
    assert ns["lune"].shape[0] == n and ns["stats"].shape == (n, 4) and ns["spatial"].shape == (n, 8, 8)


def migrating_setup(fx: Fixtures) -> dict[str, Any]:
    from safetensors.torch import load_file

    fx.link("checkpoint_runs/v4/step_5000", fx.released)
    run_dir = tiny_checkpoint(fx.cwd / "run_dir")
    torch.save(load_file(str(run_dir / "model.safetensors")), fx.cwd / "step_5000.pt")
    return {}


def migrating_check(ns: dict[str, Any], fx: Fixtures) -> None:
    from safetensors.torch import load_file

    ema = load_file(str(fx.cwd / "run_dir/ema.safetensors"))
    got = ns["model"].state_dict()
    assert all(torch.equal(got[k].float(), v.float()) for k, v in ema.items())  # the last line: the EMA weights


def run_training_setup(fx: Fixtures) -> dict[str, Any]:
    fx.link("runs/cache", fx.built.output)
    return {}


def run_training_check(ns: dict[str, Any], fx: Fixtures) -> None:
    checkpoint = Path(ns["trainer"].last_checkpoint)
    assert checkpoint.name == "step_0000002" and (checkpoint / "model.safetensors").is_file()


def trainer_check(ns: dict[str, Any], fx: Fixtures) -> None:
    assert ns["trainer"].current_step == 2 and ns["trainer"].last_checkpoint is not None


def sampling_setup(fx: Fixtures) -> dict[str, Any]:
    tiny_checkpoint(fx.cwd / "ckpt/run1/step_0100000")
    return {}


def sampling_check(ns: dict[str, Any], fx: Fixtures) -> None:
    images = ns["images"]
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1  # 8 x 8 latents
    assert (fx.cwd / "out/grid.png").is_file()


CPU = [('device="cuda"', 'device="cpu"'), ("torch.bfloat16", "torch.float32")]
PYTHON_RUNS = {
    "README.md": [
        PythonRun('DatasetCache.load("my_cache.safetensors")', setup=readme_api_setup, check=readme_api_check),
    ],
    "docs/CACHE_FORMAT.md": [
        PythonRun("wds.WebDataset(", setup=webdataset_setup, check=webdataset_check),
        PythonRun(
            "make_stream_loader(",
            subs=[("num_workers=4", "num_workers=0"), ("    ...\n", "    seen.append(batch)\n")],
            setup=stream_setup,
            check=stream_check,
        ),
    ],
    "docs/EXPERT_CACHE.md": [
        PythonRun(
            "zoo.extract_lune(",
            subs=[('ModelZoo(device="cuda")', 'ModelZoo(device="cpu", dtype=torch.float32, zoo=PATH)')],
            setup=lambda fx: {
                "ModelZoo": importlib.import_module("tinyflux.frozen.zoo").ModelZoo,
                "torch": torch,
                "PATH": str(fx.zoo),
                "prompts": ["a red circle", "a blue square"],
                "timesteps": torch.tensor([0.3, 0.7]),
            },
            check=zoo_check,
        ),
    ],
    "docs/MIGRATING.md": [PythonRun("load_model(", setup=migrating_setup, check=migrating_check)],
    "docs/TRAINING.md": [
        PythonRun("run_training(parse_args(", setup=run_training_setup, check=run_training_check),
        PythonRun("trainer.setup(loader, multi_cache", setup=loader_names, check=trainer_check),
    ],
    "docs/APPLICATIONS.md": [
        PythonRun(
            "sampler.generate(",
            subs=[
                *CPU,
                ("ModelZoo(device=", "ModelZoo(zoo=ZOO, device="),
                ("num_steps=28", "num_steps=2"),
                ("height=64, width=64", "height=8, width=8"),
            ],
            setup=lambda fx: {"ZOO": str(fx.zoo), **sampling_setup(fx)},
            check=sampling_check,
        ),
    ],
}
PYTHON_CASES = [(b, run) for b in PYTHON_BLOCKS for run in PYTHON_RUNS.get(b.path, []) if run.marker in b.text]


def test_every_python_block_has_exactly_one_run_entry():
    problems = []
    for block in PYTHON_BLOCKS:
        runs = [r for r in PYTHON_RUNS.get(block.path, []) if r.marker in block.text]
        if len(runs) != 1:
            problems.append(f"{block.where}: {len(runs)} PYTHON_RUNS entries match this ```python block")
    for path, runs in PYTHON_RUNS.items():
        for run in runs:
            if not any(b.path == path and run.marker in b.text for b in PYTHON_BLOCKS):
                problems.append(f"{path}: no ```python block contains {run.marker!r} (moved or changed?)")
    assert not problems, (
        "every ```python block runs in tests/test_examples.py with an entry of PYTHON_RUNS (a line of the block, its "
        "substitutions and setup):\n  " + "\n  ".join(problems)
    )


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model in the released format: the original's config.json fields and key names, the tiny zoo's widths."""
    import json

    from safetensors.torch import save_file

    from tests.test_released_e2e import ORIGINAL_TINY
    from tinyflux.model.model import TinyFluxDeep

    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    model = TinyFluxDeep(TinyFluxConfig.from_dict(ORIGINAL_TINY))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(ORIGINAL_TINY))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("block", "run"), PYTHON_CASES, ids=[b.where for b, _ in PYTHON_CASES])
def test_python_example_runs(
    block,
    run,
    offline,
    tiny_zoo_path,
    built_cache,
    synthetic_shards,
    synthetic_shards_no_sol,
    released_dir,
    monkeypatch,
):
    import functools

    from tinyflux.model import loader

    fx = Fixtures(offline, tiny_zoo_path, built_cache, synthetic_shards, synthetic_shards_no_sol, released_dir)
    # load_model's defaults are CUDA and bfloat16: here, the CPU in float32
    monkeypatch.setattr(loader, "load_model", functools.partial(loader.load_model, device="cpu", dtype=torch.float32))
    names = run.setup(fx)
    subs = list(run.subs) + (webdataset_subs(fx) if "wds.WebDataset(" in run.marker else [])
    text = substituted(block, subs).text
    for pattern, replacement in COMMON_SUBS:
        text = re.sub(pattern, replacement(fx), text)
    namespace = {"__name__": "__example__", **names}
    exec(compile(text, block.where, "exec"), namespace)
    run.check(namespace, fx)
