"""TF-IDF + logistic regression text classifiers: training, evaluation, scoring (pure).

One model per task and language: ``sentiment`` of customer feedback (positive / negative) and
``topic`` of supplier notes (quality / delay / price / other), each ``en`` and ``zh``; its name
in the registry is ``nlp-<task>-<language>``. A model reads the tokens of
:func:`services.nlp.tokens.tokenize` — redacted text only, so nothing it learns or shows can
hold personal data — as unigrams and bigrams.

Evaluation (:func:`train`): the examples are de-duplicated by :func:`normalise`'d text first
(a text under two labels is dropped), then macro-F1 is measured on two splits of the same rows:
a random stratified 80/20 split, and a time split (the earliest 80 % by ``occurred_at`` fitted,
the latest 20 % scored). A random split far above the time split says the classes drift or
near-duplicates leak. The majority class's macro-F1 on the time split is the baseline. The
model served is then fitted on every row.
"""

from __future__ import annotations

import io
import itertools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

TASKS: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "positive"),
    "topic": ("delay", "other", "price", "quality"),
}
KIND_TASK = {"customer_feedback": "sentiment", "supplier_note": "topic"}
"""The task that classifies each kind of text (news and policy get terms only)."""
LANGUAGES = ("en", "zh")
FAMILY = "tfidf-logreg"
SERIALIZATION = "joblib"
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def model_name(task: str, language: str) -> str:
    return f"nlp-{task}-{language}"


def normalise(text: str) -> str:
    """What two texts that say the same thing share: NFKC, lower case, no punctuation/space."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


def ngrams(tokens: Sequence[str]) -> list[str]:
    """Unigrams and bigrams of a token list (the vectoriser's analyzer; module-level so the
    model pickles)."""
    return [*tokens, *(f"{a} {b}" for a, b in itertools.pairwise(tokens))]


@dataclass
class TextClassifier:
    """A fitted vectoriser and logistic regression for one task and language."""

    task: str
    language: str
    vectorizer: TfidfVectorizer
    model: LogisticRegression
    version: int | None = None
    terms: list[str] = field(init=False, repr=False)
    unigram: np.ndarray[Any, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.terms = [str(term) for term in self.vectorizer.get_feature_names_out()]
        self.unigram = np.array([" " not in term for term in self.terms], dtype=bool)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.model.classes_]

    def transform(self, docs: Sequence[Sequence[str]]) -> Any:
        return self.vectorizer.transform(docs)

    def predict(self, matrix: Any) -> tuple[list[str], list[float], np.ndarray[Any, Any]]:
        """Best class, its probability, and every class' probability of each row."""
        proba = self.model.predict_proba(matrix)
        best = proba.argmax(axis=1)
        classes = self.model.classes_
        return [str(classes[i]) for i in best], proba.max(axis=1).tolist(), proba

    def key_terms(self, matrix: Any, k: int = 5) -> list[list[str]]:
        """Per row, the ``k`` unigrams with the highest TF-IDF weight (ties: stored order).

        One sort over the whole matrix: by row, then weight descending, then position."""
        rows = len(matrix.indptr) - 1
        row_of = np.repeat(np.arange(rows), np.diff(matrix.indptr))
        keep = self.unigram[matrix.indices]
        position = np.flatnonzero(keep)
        row_of, columns = row_of[keep], matrix.indices[keep]
        order = np.lexsort((position, -matrix.data[keep], row_of))
        row_of, columns = row_of[order], columns[order]
        rank = np.arange(len(row_of)) - np.searchsorted(row_of, np.arange(rows))[row_of]
        chosen = rank < k
        out: list[list[str]] = [[] for _ in range(rows)]
        terms = self.terms
        for row, column in zip(row_of[chosen].tolist(), columns[chosen].tolist(), strict=True):
            out[row].append(terms[column])
        return out

    def dumps(self) -> bytes:
        buffer = io.BytesIO()
        joblib.dump(
            {
                "task": self.task,
                "language": self.language,
                "vectorizer": self.vectorizer,
                "model": self.model,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def loads(cls, data: bytes, version: int | None = None) -> TextClassifier:
        parts = joblib.load(io.BytesIO(data))
        return cls(parts["task"], parts["language"], parts["vectorizer"], parts["model"], version)


def _fit(
    docs: Sequence[Sequence[str]], labels: Sequence[str]
) -> tuple[TfidfVectorizer, LogisticRegression]:
    vectorizer = TfidfVectorizer(analyzer=ngrams, min_df=2, sublinear_tf=True, max_features=50_000)
    matrix = vectorizer.fit_transform(docs)
    model = LogisticRegression(C=4.0, max_iter=1000, class_weight="balanced")
    model.fit(matrix, labels)
    return vectorizer, model


def _macro_f1(train_docs: Any, train_y: Any, test_docs: Any, test_y: Any) -> float:
    vectorizer, model = _fit(train_docs, train_y)
    predicted = model.predict(vectorizer.transform(test_docs))
    return float(f1_score(test_y, predicted, average="macro"))


@dataclass(frozen=True)
class Example:
    """A training row: the tokens of its redacted text, label, time and owner."""

    tokens: list[str]
    label: str
    occurred_at: datetime
    normalised: str
    tenant: str = ""


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], int, int]:
    """First example of each normalised text; texts seen under two labels are dropped.

    Returns the kept rows, how many repeats were removed, and how many texts conflicted."""
    labels: dict[str, set[str]] = {}
    first: dict[str, Example] = {}
    for example in examples:
        labels.setdefault(example.normalised, set()).add(example.label)
        first.setdefault(example.normalised, example)
    kept = [e for k, e in first.items() if len(labels[k]) == 1]
    conflicts = sum(1 for v in labels.values() if len(v) > 1)
    return kept, len(examples) - len(first), conflicts


@dataclass
class TrainingReport:
    """What the card says about a fit."""

    rows: int
    duplicates_removed: int
    conflicts_dropped: int
    macro_f1_random: float
    macro_f1_time: float
    baseline_time: float
    test_rows_time: int
    window_start: datetime
    window_end: datetime
    firms: int
    label_counts: dict[str, int]


def train(
    examples: Sequence[Example], task: str, language: str, seed: int = 0
) -> tuple[TextClassifier, TrainingReport]:
    """De-duplicate, evaluate on a random and a time split, fit on all; see the module doc."""
    rows, removed, conflicts = deduplicate(examples)
    labels = [e.label for e in rows]
    unknown = set(labels) - set(TASKS[task])
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not classes of {task}: {TASKS[task]}")
    if len(rows) < 20 or len(set(labels)) < 2:
        raise ValueError(f"{len(rows)} distinct examples of {len(set(labels))} classes: too few")
    docs = [e.tokens for e in rows]
    train_i, test_i = train_test_split(
        np.arange(len(rows)), test_size=0.2, random_state=seed, stratify=labels
    )
    f1_random = _macro_f1(
        [docs[i] for i in train_i],
        [labels[i] for i in train_i],
        [docs[i] for i in test_i],
        [labels[i] for i in test_i],
    )
    by_time = sorted(range(len(rows)), key=lambda i: rows[i].occurred_at)
    cut = int(len(by_time) * 0.8)
    early, late = by_time[:cut], by_time[cut:]
    late_y = [labels[i] for i in late]
    f1_time = _macro_f1(
        [docs[i] for i in early], [labels[i] for i in early], [docs[i] for i in late], late_y
    )
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    majority = max(counts, key=lambda label: counts[label])
    baseline = float(f1_score(late_y, [majority] * len(late_y), average="macro"))
    vectorizer, model = _fit(docs, labels)
    times = [e.occurred_at for e in rows]
    report = TrainingReport(
        rows=len(rows),
        duplicates_removed=removed,
        conflicts_dropped=conflicts,
        macro_f1_random=f1_random,
        macro_f1_time=f1_time,
        baseline_time=baseline,
        test_rows_time=len(late),
        window_start=min(times),
        window_end=max(times),
        firms=len({e.tenant for e in rows if e.tenant}),
        label_counts=counts,
    )
    return TextClassifier(task, language, vectorizer, model), report


def card_fields(classifier: TextClassifier, report: TrainingReport, source: str) -> dict[str, Any]:
    """The :class:`schemas.models.ModelCard` fields the registry does not fill itself."""
    task, language = classifier.task, classifier.language
    what = "sentiment of customer feedback" if task == "sentiment" else "topic of supplier notes"
    return {
        "name": model_name(task, language),
        "use_case": f"The {what} in {language} ({', '.join(TASKS[task])}).",
        "task": "classification",
        "target": task,
        "family": FAMILY,
        "serialization": SERIALIZATION,
        "params": {
            "language": language,
            "ngrams": "1-2",
            "min_df": 2,
            "C": 4.0,
            "class_weight": "balanced",
            "source": source,
            "duplicates_removed": report.duplicates_removed,
            "conflicting_texts_dropped": report.conflicts_dropped,
            "classes": ",".join(classifier.classes),
            **{f"rows_{label}": n for label, n in report.label_counts.items()},
        },
        "features": [
            {
                "name": "text",
                "dtype": "text",
                "description": "Redacted text, tokenised by services.nlp.tokens (jieba for zh, "
                "nltk RegexpTokenizer for en), unigrams and bigrams, TF-IDF.",
            }
        ],
        "source_event_types": ["text_document"],
        "training_window_start": report.window_start,
        "training_window_end": report.window_end,
        "training_rows": report.rows,
        "contributing_firms": report.firms,
        "metrics": [
            {
                "metric": "macro_f1",
                "split": "time",
                "value": round(report.macro_f1_time, 4),
                "baseline": round(report.baseline_time, 4),
                "random_split": round(report.macro_f1_random, 4),
                "rows": report.test_rows_time,
            }
        ],
    }
