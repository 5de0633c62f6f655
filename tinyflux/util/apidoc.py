"""docs/TECHNICAL.md, generated: the public API of each tinyflux module (its docstring's first paragraph, then each
public class, method and function with its signature and the first paragraph of its docstring).

    python -m tinyflux.util.apidoc > docs/TECHNICAL.md      # regenerate
    python -m tinyflux.util.apidoc --check docs/TECHNICAL.md  # exit 1 where the file is out of date (tests do this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

import tinyflux

HEADER = """# TinyFlux: the API of each module

Generated from the code's docstrings and signatures by `python -m tinyflux.util.apidoc > docs/TECHNICAL.md`;
`tests/test_docs.py` fails where this file is out of date. What each package owns and how one sample travels from
an image to a checkpoint and a PNG: `docs/ARCHITECTURE.md`.
"""
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def first_paragraph(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def signature(obj: object) -> str:
    """`(a: int, b: str = 'x') -> bool`, annotations as written in the source (unquoted), addresses dropped."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"

    def annotation(a: object) -> str:
        return a if isinstance(a, str) else inspect.formatannotation(a)

    def parameter(p: inspect.Parameter) -> str:
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {annotation(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + repr(p.default)
        return text

    parts, star_done = [], False
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done |= p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        parts.append(parameter(p))
    text = "(" + ", ".join(parts) + ")"
    if sig.return_annotation is not sig.empty:
        text += f" -> {annotation(sig.return_annotation)}"
    return ADDRESS.sub("", text)


def public_members(module: ModuleType) -> list[tuple[str, object]]:
    """What the module defines (not what it imports), public names only, in source order."""
    members = [
        (name, obj)
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]

    def line(item: tuple[str, object]) -> int:
        try:
            return inspect.getsourcelines(item[1])[1]
        except (OSError, TypeError):
            return 0

    return sorted(members, key=line)


def entry(name: str, obj: object) -> str:
    doc = first_paragraph(obj)
    return f"`{name}{signature(obj)}`" + (f": {doc}" if doc else "")


def describe_class(cls: type) -> list[str]:
    lines = [f"- **class** {entry(cls.__name__, cls)}"]
    for name, member in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, classmethod | staticmethod)):
            continue
        func = member.__func__ if isinstance(member, classmethod | staticmethod) else member
        lines.append(f"  - {entry(name, func)}")
    return lines


def module_section(module: ModuleType) -> list[str]:
    lines = [f"## `{module.__name__}`", "", first_paragraph(module) or "(no module docstring)", ""]
    for _, obj in public_members(module):
        if inspect.isclass(obj):
            lines += describe_class(obj)
        else:
            lines.append(f"- {entry(obj.__name__, obj)}")
    return lines + [""]


def generate() -> str:
    names = sorted(m.name for m in pkgutil.walk_packages(tinyflux.__path__, "tinyflux."))
    lines = [HEADER]
    for name in ["tinyflux", *names]:
        module = importlib.import_module(name)
        if module.__name__ == name:  # an alias (a spec path of a moved module) is documented at its home
            lines += module_section(module)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", type=Path, help="compare with this file instead of printing; exit 1 where it differs")
    args = ap.parse_args(argv)
    text = generate()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    if args.check.read_text() != text:
        print(f"{args.check} is out of date: python -m tinyflux.util.apidoc > {args.check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
