"""README.md tells the truth about the config fields: its tables are the dataclasses' fields, defaults and comments."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from tinyflux.model.config import TinyFluxConfig
from tinyflux.trainer.config import TrainerConfig

README = Path(__file__).resolve().parents[1] / "README.md"
FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+= (.+?)\s+# (.+)$")


def config_table(cls: type) -> str:
    """The markdown table of a config dataclass: field, default, the one-line comment from its source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = FIELD_LINE.match(line)
        if m:
            comments[m.group(1)] = m.group(3)
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        default = str(default).replace("torch.", "")
        rows.append(f"| `{f.name}` | `{default}` | {comments.get(f.name, '').replace('|', '/')} |")
    return "\n".join(rows)


@pytest.mark.parametrize("cls", [TinyFluxConfig, TrainerConfig], ids=lambda c: c.__name__)
def test_readme_config_tables_match_the_dataclasses(cls):
    table = config_table(cls)
    assert table in README.read_text(), (
        f"README.md's {cls.__name__} table is out of date; regenerate it with\n"
        f"  python -c 'from tests.test_docs import config_table; from {cls.__module__} import {cls.__name__}; "
        f"print(config_table({cls.__name__}))'"
    )


def test_every_field_has_a_comment():
    for cls in (TinyFluxConfig, TrainerConfig):
        missing = [line for line in config_table(cls).splitlines()[2:] if line.endswith("|  |")]
        assert not missing, f"{cls.__name__} fields without a one-line comment: {missing}"


def refresh_readme() -> None:
    """Rewrite the tables between the README's config-table markers from the dataclasses."""
    text = README.read_text()
    for cls in (TinyFluxConfig, TrainerConfig):
        begin, end = f"<!-- config-table:{cls.__name__} -->", f"<!-- /config-table:{cls.__name__} -->"
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{config_table(cls)}\n{end}{tail}"
    README.write_text(text)


if __name__ == "__main__":  # python -m tests.test_docs
    refresh_readme()


def test_technical_md_is_the_generated_api_document():
    from tinyflux.util import apidoc

    path = README.parent / "docs" / "TECHNICAL.md"
    assert path.read_text() == apidoc.generate(), f"{path} is out of date: python -m tinyflux.util.apidoc > {path}"


def test_api_signatures_read_as_written():
    from tinyflux.util.apidoc import signature

    def f(a: int, *rest: str, b: str = "x", **kw: float) -> bool: ...

    assert signature(f) == "(a: int, *rest: str, b: str = 'x', **kw: float) -> bool"
