"""Training and registering the nlp classifiers (what ``xietong nlp train`` and start-up run).

Examples come from a labelled file (CSV or TSV with ``text`` and ``label`` columns, optional
``language``, ``occurred_at``, ``tenant``), from the shipped and generated sets
(:func:`services.nlp.corpus.bootstrap_set`), or from ``text_document`` events that carry a
``label`` (:func:`examples_from_events`, only of firms that granted ``network`` the type
``model_training``, as for the ml service's models). Every text is redacted and tokenised
exactly as the service does before anything is learnt from it, under a key of the model (not of
any owner), so the model and its card hold no personal data. The card
(:func:`services.nlp.classify.card_fields`) goes to the shared model registry
(:mod:`shared.models`) with the artifact.
"""

from __future__ import annotations

import csv
from collections.abc import Container, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.models import ModelCard
from services.nlp.classify import (
    KIND_TASK,
    Example,
    TextClassifier,
    card_fields,
    model_name,
    normalise,
    train,
)
from services.nlp.corpus import Labelled, bootstrap_set
from services.nlp.redact import redact
from services.nlp.tokens import load_jieba, tokenize
from shared.models import ModelRegistry
from shared.pseudonyms import derive_key


def training_key(network_key: bytes, task: str, language: str) -> bytes:
    return derive_key(network_key, "pseudonym-training", model_name(task, language))


def to_examples(labelled: Iterable[Labelled], key: bytes) -> list[Example]:
    """Redact, tokenise and normalise (for de-duplication) each labelled text."""
    load_jieba()
    out = []
    for item in labelled:
        redacted = redact(item.text, key)
        tokens = tokenize(redacted.bare, item.language, key)
        out.append(
            Example(
                tokens.terms,
                item.label,
                item.occurred_at,
                normalise(redacted.bare),
                item.tenant,
            )
        )
    return out


def read_labelled_file(path: Path, language: str | None = None) -> list[Labelled]:
    """Rows of a CSV/TSV with ``text`` and ``label`` (``language`` per row or given)."""
    with path.open(encoding="utf-8", newline="") as handle:
        sample = handle.read(4096)
        handle.seek(0)
        dialect = csv.excel_tab if sample.count("\t") > sample.count(",") else csv.excel
        out: list[Labelled] = []
        for i, row in enumerate(csv.DictReader(handle, dialect=dialect)):
            lang = row.get("language") or language
            if lang not in ("en", "zh"):
                raise ValueError(f"row {i + 2}: language {lang!r} is not en or zh")
            when = row.get("occurred_at")
            at = datetime.fromisoformat(when) if when else datetime.fromtimestamp(i * 3600, UTC)
            tenant = (row.get("tenant") or "").strip()
            out.append(Labelled(row["text"], row["label"].strip(), lang, at, tenant))
    return out


def examples_from_events(
    events: Iterable[dict[str, Any]], task: str, firms: Container[str]
) -> list[Labelled]:
    """Labelled texts of decoded ``text_document`` events of the kinds ``task`` classifies,
    from ``firms`` only (those that let the network train on their events)."""
    kinds = {kind for kind, of in KIND_TASK.items() if of == task}
    out = []
    for event in events:
        payload = event.get("payload") or {}
        if (
            event.get("type") == "text_document"
            and payload.get("label")
            and payload.get("kind") in kinds
            and event.get("tenant") in firms
        ):
            out.append(
                Labelled(
                    str(payload["text"]),
                    str(payload["label"]),
                    str(payload["language"]),
                    datetime.fromisoformat(str(event["occurred_at"])),
                    str(event["tenant"]),
                )
            )
    return out


async def train_and_register(
    registry: ModelRegistry,
    labelled: Sequence[Labelled],
    task: str,
    language: str,
    network_key: bytes,
    *,
    source: str,
    by: str,
    promote: bool = True,
) -> tuple[ModelCard, TextClassifier]:
    """Fit, evaluate and register a version; point ``champion`` at it when ``promote``."""
    examples = to_examples(labelled, training_key(network_key, task, language))
    classifier, report = train(examples, task, language)
    card = await registry.register(
        classifier.dumps(), card_fields(classifier, report, source), by=by
    )
    classifier.version = card.version
    if promote:
        await registry.set_alias(card.name, "champion", card.version, by=by, reason="promote")
    return card, classifier


async def bootstrap(
    registry: ModelRegistry, task: str, language: str, network_key: bytes, *, by: str
) -> tuple[ModelCard, TextClassifier]:
    """The first champion of a task and language, from the shipped or generated examples."""
    labelled, source = bootstrap_set(task, language)
    return await train_and_register(
        registry, labelled, task, language, network_key, source=source, by=by
    )
