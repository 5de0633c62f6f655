"""The map of the package: imports point one way (no cycle, even through type-only or function-level imports),
training reaches neither the sampler nor the cache builder, configs no model or loss code, and optional libraries
(bitsandbytes) load only when chosen."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinyflux"
# Lines bitsandbytes prints when diffusers or peft import it on a machine without its kernels.
BNB_NOISE = ("bitsandbytes", "kernels-community", "gemm_4bit")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The tinyflux modules `name` imports anywhere in its source: at the top, under TYPE_CHECKING, in functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from tinyflux.util import dtypes` imports the module tinyflux.util.dtypes
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def cycle() -> list[str] | None:
    """One import cycle of GRAPH as [a, b, ..., a], or None (depth-first search, colouring the modules on the path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(GRAPH[name]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    assert len(GRAPH) > 50 and "tinyflux.trainer.trainer" in GRAPH
    assert cycle() is None, " -> ".join(cycle())


def test_training_reaches_neither_the_sampler_nor_the_cache_builder():
    reached = reachable("tinyflux.trainer.trainer")
    assert "tinyflux.trainer.checkpointer" in reached  # the walk follows the Trainer's imports
    assert not reached & {"tinyflux.sampling.sampler", "tinyflux.cache.build", "tinyflux.cache.inputs"}


def test_the_training_script_loads_neither_the_sampler_nor_the_cache_builder():
    """In a fresh interpreter, importing the training run (tinyflux.trainer.main) loads no cache builder, encoder,
    sampler or zoo: --images and --zoo runs import those where they use them."""
    script = "import sys, tinyflux.trainer.main; print(sorted(m for m in sys.modules if m.startswith('tinyflux')))"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = set(ast.literal_eval(run.stdout.strip().splitlines()[-1]))
    assert "tinyflux.trainer.main" in loaded and "tinyflux.cache.memory" in loaded  # the import went through
    unwanted = {"tinyflux.cache.build", "tinyflux.cache.encode", "tinyflux.sampling.sampler", "tinyflux.frozen.zoo"}
    assert loaded & unwanted == set()


# Which packages each package may import (docs/ARCHITECTURE.md, "Package layout"), besides itself, tinyflux.util,
# tinyflux.errors and the root. Sampling shares training's EMA (EMA weights), schedules (the timestep grid) and LoRA
# (adapters); the zoo's command line writes the tools' zoos (a function-level import).
MAY_IMPORT = {
    "model": set(),
    "util": set(),
    "frozen": {"model"},
    "tools": {"frozen", "model"},
    "cache": {"frozen", "model"},
    "sampling": {"frozen", "model", "trainer.ema", "trainer.schedules", "trainer.lora"},
    "trainer": {"cache", "frozen", "model", "sampling"},
}
EXCEPTIONS = {("tinyflux.frozen.zoo", "tinyflux.tools.random_zoo"), ("tinyflux.frozen.zoo", "tinyflux.tools.tiny_zoo")}


def test_packages_import_in_one_direction():
    wrong = []
    for name, deps in GRAPH.items():
        package = name.split(".")[1] if name.count(".") else None
        if package not in MAY_IMPORT or "sys.modules[__name__] = _home" in MODULES[name].read_text():
            continue  # tinyflux, tinyflux.errors, tinyflux.demo (the whole pipeline), the spec paths' aliases
        for dep in deps:
            inner = dep.split(".", 1)[1] if "." in dep else ""
            allowed = {package, "util", "errors", ""} | MAY_IMPORT[package]
            if not any(inner == a or inner.startswith(f"{a}.") for a in allowed) and (name, dep) not in EXCEPTIONS:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the package map (docs/ARCHITECTURE.md):\n" + "\n".join(sorted(wrong))


def test_nothing_but_tests_benchmarks_and_the_demo_imports_the_tools():
    users = {name for name, deps in GRAPH.items() if any(d.startswith("tinyflux.tools") for d in deps)}
    assert users - {m for m in MODULES if m.startswith("tinyflux.tools")} == {"tinyflux.demo", "tinyflux.frozen.zoo"}


@pytest.mark.parametrize("config", ["tinyflux.trainer.config", "tinyflux.model.config"])
def test_configs_import_no_model_or_loss_code(config):
    assert reachable(config) <= {config, "tinyflux", "tinyflux.errors", "tinyflux.model.config"} | {
        "tinyflux.trainer.schedules",  # the schedules' names and defaults; pure functions of step / t
        "tinyflux.util.dtypes",
        "tinyflux.util.optional",
    }


def test_every_module_imports_and_bitsandbytes_loads_only_when_chosen():
    """In a fresh interpreter: the zoo (diffusers, transformers) and then every module import without bitsandbytes
    (diffusers and peft import it whenever installed, and it prints a kernels-community line on CPU machines); the
    Trainer alone loads no diffusers. One process for all of it: interpreter start-up and torch cost seconds."""
    script = f"""
import importlib, json, sys
import tinyflux.trainer.trainer
trainer_alone = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "peft"))
import tinyflux.frozen.zoo
after_zoo = "bitsandbytes" in sys.modules
for name in {sorted(MODULES)!r}:
    importlib.import_module(name)
print(json.dumps({{"trainer_alone": trainer_alone, "after_zoo": after_zoo, "after_all": "bitsandbytes" in sys.modules}}))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"trainer_alone": [], "after_zoo": False, "after_all": False}
    noise = [line for line in (run.stdout + run.stderr).splitlines() if any(w in line for w in BNB_NOISE)]
    assert noise == []


def test_the_scripts_and_benchmarks_import_names_that_exist():
    """What no other test imports (bench/) names tinyflux modules and names that exist: a package move or a rename
    fails here, not on the day a GPU is lent."""
    import importlib

    missing = []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tinyflux":
                module = importlib.import_module(node.module)
                missing += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if not hasattr(module, a.name) and f"{node.module}.{a.name}" not in MODULES
                ]
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
