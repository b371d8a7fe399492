"""``xietong nlp``: the nlp service's text classifiers from the operator's terminal.

- ``xietong nlp train --task sentiment --file labelled.csv [--language en]`` — fit, evaluate and
  register a classifier from a labelled file (CSV or TSV with ``text`` and ``label`` columns,
  optional ``language``, ``occurred_at``, ``tenant``), one per language in the file; it becomes
  the ``champion`` (``--no-promote``: registered only), which the service loads between
  batches, no restart.
- ``xietong nlp train --task topic --events`` — the same from the ``text_document`` events that
  carry a ``label`` on the clean topic (read from its start to its end), only of firms that
  granted ``network`` the type ``model_training`` and only with ``--min-firms`` such firms.

Texts are redacted and tokenised as the service does before anything is learnt
(:mod:`services.nlp.training`); the card shows macro-F1 on a time split next to the random split
and the majority baseline (``xietong models show nlp-<task>-<language>``).
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from schemas.topics import EVENTS_CLEAN
from shared.codec import DecodeError, decode
from shared.control import MODEL_TRAINING, ControlRegistry, training_firms
from shared.kafka import create_consumer, started
from shared.models import ModelRegistry
from shared.settings import XietongSettings

if TYPE_CHECKING:
    from services.nlp.corpus import Labelled

"""The grant type by which a firm lets the network train models on its events."""
TASK_CHOICES = ("sentiment", "topic")


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def read_topic(settings: XietongSettings, topic: str) -> list[dict[str, Any]]:
    """Every decodable record of ``topic``, from its start to its end as of now."""
    from aiokafka import TopicPartition

    out: list[dict[str, Any]] = []
    async with started(create_consumer(settings, None)) as consumer:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            raise click.ClickException(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    try:
                        event = decode(record.value)
                    except (DecodeError, UnicodeDecodeError, ValueError):
                        continue
                    if isinstance(event, dict):
                        out.append(event)
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
    return out


async def labelled_events(
    settings: XietongSettings, topic: str, task: str, min_firms: int
) -> list[Labelled]:
    from services.nlp.training import examples_from_events

    events = await read_topic(settings, topic)
    async with ControlRegistry(settings) as registry:
        firms = training_firms(
            {str(e.get("tenant")) for e in events}, registry.grants.values(), datetime.now(UTC)
        )
    labelled = examples_from_events(events, task, firms)
    contributing = {item.tenant for item in labelled}
    if len(contributing) < min_firms:
        raise click.ClickException(
            f"{len(labelled)} labelled {task} texts from {len(contributing)} firm(s) that granted "
            f"network '{MODEL_TRAINING}': at least {min_firms} firms are needed"
        )
    return labelled


async def train_languages(
    settings: XietongSettings,
    labelled: Sequence[Labelled],
    task: str,
    *,
    source: str,
    promote: bool,
) -> list[str]:
    """One classifier per language of ``labelled``; a line per registered version."""
    from services.nlp.training import train_and_register

    by_language: dict[str, list[Labelled]] = {}
    for item in labelled:
        by_language.setdefault(item.language, []).append(item)
    lines = []
    async with ModelRegistry(settings) as registry:
        for language, items in sorted(by_language.items()):
            try:
                card, _ = await train_and_register(
                    registry,
                    items,
                    task,
                    language,
                    settings.network_key(),
                    source=source,
                    by=_who(),
                    promote=promote,
                )
            except ValueError as error:
                raise click.ClickException(f"{task} {language}: {error}") from None
            metric = card.metrics[0]
            lines.append(
                f"{card.name} version {card.version}"
                f"{' (champion)' if promote else ''}: {card.training_rows} texts, "
                f"macro-F1 {metric.value:.3f} on the time split "
                f"(random split {metric.random_split}, majority baseline {metric.baseline})"
            )
    return lines


@click.group()
def nlp() -> None:
    """Text classifiers of the nlp service (sentiment, topic; en, zh)."""


@nlp.command("train")
@click.option("--task", type=click.Choice(TASK_CHOICES), required=True, help="What to classify.")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labelled CSV/TSV: text, label[, language, occurred_at, tenant].",
)
@click.option(
    "--events",
    is_flag=True,
    help="Train on the labelled text_document events of the clean topic instead.",
)
@click.option("--topic", default=EVENTS_CLEAN, show_default=True, help="Topic for --events.")
@click.option(
    "--language",
    type=click.Choice(("en", "zh")),
    help="Language of the file's rows that have no language column.",
)
@click.option(
    "--min-firms",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="With --events: consenting firms needed.",
)
@click.option("--no-promote", is_flag=True, help="Register only; the champion stays.")
@click.pass_obj
def nlp_train(
    obj: Any,
    task: str,
    file: Path | None,
    events: bool,
    topic: str,
    language: str | None,
    min_firms: int,
    no_promote: bool,
) -> None:
    """Fit, evaluate and register a classifier; the service picks up a new champion itself."""
    if (file is None) == (not events):
        raise click.UsageError("give one of --file or --events")
    settings = obj.settings()
    settings.network_key()  # the training key derives from it: refuse early without it
    if file is not None:
        from services.nlp.training import read_labelled_file

        try:
            labelled = read_labelled_file(file, language)
        except (KeyError, ValueError) as error:
            raise click.UsageError(f"{file.name}: {error}") from None
        source = f"file:{file.name}"
    else:
        labelled = asyncio.run(labelled_events(settings, topic, task, min_firms))
        source = f"events:{topic}"
    if not labelled:
        raise click.ClickException("no labelled texts")
    for line in asyncio.run(
        train_languages(settings, labelled, task, source=source, promote=not no_promote)
    ):
        click.echo(line)
