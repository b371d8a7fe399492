"""``xietong models``: the model registry from the operator's terminal (:mod:`shared.models`).

- ``xietong models list [NAME]`` — every version: family, firms, rows, aliases
- ``xietong models show NAME [VERSION|ALIAS]`` — a model card as JSON (default: champion)
- ``xietong models promote NAME VERSION [--alias champion]`` — move an alias; the ml service
  scores with it from its next batch, no restart
- ``xietong models rollback NAME [--alias champion]`` — the alias goes back to its previous
  version (visible in the predictions' ``model_version``)
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson

from shared.models import ModelRegistry

T = TypeVar("T")


def _with_models(obj: Any, work: Callable[[ModelRegistry], Awaitable[T]]) -> T:
    async def go() -> T:
        async with ModelRegistry(obj.settings()) as registry:
            return await work(registry)

    return asyncio.run(go())


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@click.group()
def models() -> None:
    """Trained models: versions, cards, champion and challenger."""


@models.command("list")
@click.argument("name", required=False)
@click.pass_obj
def models_list(obj: Any, name: str | None) -> None:
    async def work(registry: ModelRegistry) -> list[list[str]]:
        rows = []
        for card in registry.versions(name):
            aliases = [a for a, v in registry.aliases_of(card.name).items() if v == card.version]
            rows.append(
                [
                    card.name,
                    str(card.version),
                    card.family,
                    str(card.contributing_firms),
                    str(card.training_rows),
                    ",".join(sorted(aliases)) or "-",
                    card.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ]
            )
        return rows

    from xietong.cli import table

    header = ["name", "version", "family", "firms", "rows", "aliases", "created"]
    click.echo(table(_with_models(obj, work), header))


@models.command("show")
@click.argument("name")
@click.argument("which", default="champion")
@click.pass_obj
def models_show(obj: Any, name: str, which: str) -> None:
    """WHICH is a version number or an alias (default champion)."""

    async def work(registry: ModelRegistry) -> dict[str, Any] | None:
        card = registry.card(name, int(which)) if which.isdigit() else registry.resolve(name, which)
        if card is None:
            return None
        return {**card.model_dump(mode="json"), "aliases": registry.aliases_of(name)}

    found = _with_models(obj, work)
    if found is None:
        click.echo(f"{name} has no {which}", err=True)
        sys.exit(1)
    click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())


@models.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--alias", default="champion", show_default=True)
@click.pass_obj
def models_promote(obj: Any, name: str, version: int, alias: str) -> None:
    async def work(registry: ModelRegistry) -> str:
        before = registry.aliases_of(name).get(alias)
        await registry.set_alias(name, alias, version, by=_who(), reason="promote")
        return f"{name} {alias}: {before or '-'} -> {version}"

    try:
        click.echo(_with_models(obj, work))
    except KeyError as error:
        click.echo(str(error).strip("'\""), err=True)
        sys.exit(1)


@models.command("rollback")
@click.argument("name")
@click.option("--alias", default="champion", show_default=True)
@click.pass_obj
def models_rollback(obj: Any, name: str, alias: str) -> None:
    async def work(registry: ModelRegistry) -> str:
        before = registry.aliases_of(name).get(alias)
        record = await registry.rollback(name, alias, by=_who())
        return f"{name} {alias}: {before} -> {record.version}"

    try:
        click.echo(_with_models(obj, work))
    except KeyError as error:
        click.echo(str(error).strip("'\""), err=True)
        sys.exit(1)
