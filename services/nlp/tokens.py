"""Tokenising by language, with person names taken out (pure functions, no downloaded data).

- ``zh``: jieba precise mode (HMM on). Its dictionary is loaded once per process by
  :func:`load_jieba` (the service calls it at start-up; about a second). Person names: a word
  jieba's dictionary tags ``nr`` / ``nrfg`` / ``nrt``, or a word outside the dictionary that
  jieba's part-of-speech tagger (``jieba.posseg``, run on that word alone, remembered) tags as
  a name — tagging only the unknown words keeps the cost of precise-mode cutting.
- ``en``: nltk's :class:`~nltk.tokenize.RegexpTokenizer` (needs no nltk data). Person names: a
  capitalised given name from the deny-list (``data/given_names_en.txt``), or a capitalised word
  after a title (Mr, Mrs, Ms, Dr, ...), and the capitalised word that follows either.
- Mixed text keeps its English words: Latin-script words in Chinese text are English tokens.

Stop words come from files in ``data/`` (their sources and licences in ``data/LICENSES.md``);
negations and intensifiers are kept since sentiment turns on them. Names become pseudonyms in
:attr:`Tokens.entities` and never appear among the tokens.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from nltk.tokenize import RegexpTokenizer

from shared.pseudonyms import pseudonym

DATA = Path(__file__).parent / "data"
KEEP = frozenset(
    ("not", "no", "nor", "never", "cannot", "very", "too", "不", "不是", "没", "没有", "很", "太")
) | frozenset(("非常", "无法", "不能", "不会", "别"))
"""Stop-list entries kept as tokens: sentiment turns on them."""
_TITLES = frozenset(["mr", "mrs", "ms", "miss", "dr", "prof", "sir", "madam"])
_ZH_NAME_TAGS = frozenset(("nr", "nrfg", "nrt"))
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")
_EN = RegexpTokenizer(r"[A-Za-z][A-Za-z'\-]*[A-Za-z]|[A-Za-z]|\d+(?:[.,]\d+)?")


def _read_list(name: str) -> frozenset[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip() for w in lines if w.strip() and not w.startswith("#"))


@cache
def stop_words(language: str) -> frozenset[str]:
    """The stop words of ``en`` or ``zh`` (vendored lists, minus :data:`KEEP`)."""
    return _read_list(f"stopwords_{language}.txt") - KEEP


@cache
def given_names_en() -> frozenset[str]:
    """Lower-cased English given names that are redacted when capitalised."""
    return frozenset(w.lower() for w in _read_list("given_names_en.txt"))


_jieba_lock = threading.Lock()
_jieba: dict[str, Any] = {}


def load_jieba() -> None:
    """Load jieba's dictionary and tag table once per process (idempotent)."""
    with _jieba_lock:
        if _jieba:
            return
        import jieba
        import jieba.posseg

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba["cut"] = jieba.cut
        _jieba["tags"] = jieba.posseg.dt.word_tag_tab
        _jieba["posseg"] = jieba.posseg.cut


@dataclass(frozen=True, slots=True)
class Tokens:
    """A document's terms (lower-cased, no stop words, no names) and the names' pseudonyms."""

    terms: list[str]
    entities: list[str]


class NameGuesser:
    """Whether a Chinese word outside jieba's dictionary is a person name (bounded memory)."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self.known: dict[str, bool] = {}

    def __call__(self, word: str) -> bool:
        found = self.known.get(word)
        if found is None:
            flags = [pair.flag for pair in _jieba["posseg"](word)]
            found = len(flags) == 1 and flags[0] in _ZH_NAME_TAGS
            if len(self.known) >= self.size:
                self.known.clear()
            self.known[word] = found
        return found


_guess_name = NameGuesser()


def _english(
    words: list[str], key: bytes, terms: list[str], entities: list[str], stops: frozenset[str]
) -> None:
    names = given_names_en()
    after_name = False
    for i, word in enumerate(words):
        lower = word.lower()
        capital = word[0].isupper()
        if capital and (after_name or lower in names):
            entities.append(pseudonym(key, "NAME", lower))
            after_name = lower in names  # a surname may follow a given name
            continue
        after_name = False
        if lower in _TITLES and i + 1 < len(words) and words[i + 1][:1].isupper():
            after_name = True  # the next capitalised word is a name
            continue
        if lower not in stops and (len(lower) > 1 or lower.isdigit()):
            terms.append(lower)


def tokenize_en(text: str, key: bytes) -> Tokens:
    terms: list[str] = []
    entities: list[str] = []
    _english(_EN.tokenize(text), key, terms, entities, stop_words("en"))
    return Tokens(terms, entities)


def tokenize_zh(text: str, key: bytes) -> Tokens:
    cut: Callable[..., Any] = _jieba["cut"]
    tags: dict[str, str] = _jieba["tags"]
    stops = stop_words("zh")
    en_stops = stop_words("en")
    terms: list[str] = []
    entities: list[str] = []
    latin: list[str] = []
    for word in cut(text):
        if _CJK.match(word):
            if latin:
                _english(latin, key, terms, entities, en_stops)
                latin = []
            tag = tags.get(word)
            if tag in _ZH_NAME_TAGS or (tag is None and len(word) > 1 and _guess_name(word)):
                entities.append(pseudonym(key, "NAME", word))
            elif word not in stops:
                terms.append(word)
        elif _LATIN.match(word):
            latin.append(word)
        elif word.isdigit():
            terms.append(word)
    if latin:
        _english(latin, key, terms, entities, en_stops)
    return Tokens(terms, entities)


def tokenize(text: str, language: str, key: bytes) -> Tokens:
    """Terms and name pseudonyms of ``text`` in ``language`` (``en`` or ``zh``)."""
    if language == "zh":
        return tokenize_zh(text, key)
    if language == "en":
        return tokenize_en(text, key)
    raise ValueError(f"no tokeniser for language {language!r}")
