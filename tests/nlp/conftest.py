from __future__ import annotations

import pytest

from services.nlp.classify import TextClassifier
from services.nlp.corpus import generate
from services.nlp.handlers import Models
from services.nlp.tokens import load_jieba
from services.nlp.training import to_examples


@pytest.fixture(scope="session")
def small_models() -> Models:
    """Four classifiers trained on small generated sets (both tasks, both languages)."""
    from services.nlp.classify import train

    load_jieba()
    out: dict[tuple[str, str], TextClassifier] = {}
    for task in ("sentiment", "topic"):
        for language in ("en", "zh"):
            examples = to_examples(generate(task, language, 240, seed=3), b"t" * 32)
            out[(task, language)], _ = train(examples, task, language)
            out[(task, language)].version = 1
    return Models(out)
