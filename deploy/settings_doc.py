"""The README's settings table, generated from the settings classes.

Every ``*Settings`` class (pydantic-settings) of ``shared/settings.py``, ``xietong/settings.py``
and ``services/<name>/settings.py`` — each folder under ``services/`` is looked at, so a new
service's settings appear without touching this file — gives one section: each field the class
declares itself (not those it inherits) as its environment variable, default and description.

``python -m deploy.settings_doc`` rewrites the block between the markers in ``README.md``;
``--check`` exits 1 when the README differs from what the classes say (the drift test calls
:func:`render_settings`). ``make schemas`` runs both.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
LONG_DEFAULT = 60
"""A default longer than this (JSON of a list or mapping) is named by its size and module."""


def settings_modules() -> list[ModuleType]:
    """``shared.settings``, ``xietong.settings``, then ``services.<name>.settings`` by name."""
    names = ["shared.settings", "xietong.settings"]
    names += [
        f"services.{path.parent.name}.settings"
        for path in sorted((ROOT / "services").glob("*/settings.py"))
    ]
    return [importlib.import_module(name) for name in names]


def settings_classes() -> list[type[BaseSettings]]:
    """Every ``*Settings`` class defined (not imported) in the settings modules, in source order."""
    found: list[type[BaseSettings]] = []
    for module in settings_modules():
        classes = [
            value
            for name, value in vars(module).items()
            if name.endswith("Settings")
            and inspect.isclass(value)
            and issubclass(value, BaseSettings)
            and value.__module__ == module.__name__
        ]
        found += sorted(classes, key=lambda cls: inspect.getsourcelines(cls)[1])
    return found


def own_fields(cls: type[BaseSettings]) -> dict[str, FieldInfo]:
    """The fields ``cls`` declares itself: those of its settings bases are documented there."""
    inherited: set[str] = set()
    for base in cls.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, BaseSettings) and base is not BaseSettings:
            inherited |= set(base.model_fields)
    return {name: info for name, info in cls.model_fields.items() if name not in inherited}


def variable(cls: type[BaseSettings], name: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return (prefix + name).upper()


def _default(cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if value is None:
        return "(unset)"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, datetime):
        value = value.isoformat()
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if isinstance(value, str) and str(ROOT) in value:
        text = value.replace(str(ROOT) + "/", "")  # a path in the checkout, not this machine's
    if len(text) > LONG_DEFAULT and isinstance(value, list | dict):
        source = Path(inspect.getfile(cls)).relative_to(ROOT)
        text = f"{len(value)} entries, see {source}"
        return text
    return f"`{text}`" if text else '`""`'


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_section(cls: type[BaseSettings]) -> str:
    """One class: a heading line and a table of its own fields."""
    source = Path(inspect.getfile(cls)).relative_to(ROOT)
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0]
    lines = [
        f"**`{cls.__name__}`** (`{source}`): {_cell(summary.replace('``', '`'))}",
        "",
        "| variable | default | what |",
        "| --- | --- | --- |",
    ]
    for name, info in own_fields(cls).items():
        lines.append(
            f"| `{variable(cls, name)}` | {_cell(_default(cls, name, info))} | "
            f"{_cell(info.description or '')} |"
        )
    return "\n".join(lines)


def render_settings() -> str:
    """The whole block, markers included."""
    sections = [settings_section(cls) for cls in settings_classes()]
    note = (
        "Generated from the settings classes by `python -m deploy.settings_doc` (`make schemas`); "
        "a test fails when this table and the classes differ. A service reads the platform's "
        "settings and its own."
    )
    return "\n".join([BEGIN, note, "", "\n\n".join(sections), END])


def replace_block(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with the part from ``begin`` to ``end`` (both kept) replaced by ``block``."""
    if begin not in text or end not in text:
        raise SystemExit(f"the README has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.settings_doc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    from deploy.csv_doc import BEGIN as CSV_BEGIN
    from deploy.csv_doc import END as CSV_END
    from deploy.csv_doc import render_csv_columns

    text = README.read_text()
    wanted = replace_block(text, BEGIN, END, render_settings())
    wanted = replace_block(wanted, CSV_BEGIN, CSV_END, render_csv_columns())
    if args.check:
        if wanted != text:
            print("README.md is stale: run python -m deploy.settings_doc", file=sys.stderr)
            return 1
        return 0
    if wanted != text:
        README.write_text(wanted)
        print("README.md: settings and CSV columns rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
