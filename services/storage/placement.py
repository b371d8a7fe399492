"""Hybrid placement: which store receives a dataset or a file, decided by rules over its labels.

Every archive object and every file carries four labels: ``sensitivity`` (public, internal,
confidential, personal), ``residency`` (a region code such as ``cn``, ``eu``, or ``any``),
``tenant`` and ``kind`` (event type, insight type or file kind). Values are lower-cased.

A policy file (YAML, ``deploy/placement-policy.yaml``) lists rules::

    rules:
      - name: personal-data-stays-private
        precedence: 100
        when: sensitivity == "personal" or residency == "cn"
        target: private

``when`` is an expression over the labels: ``label == "v"``, ``label != "v"``,
``label in ("a", "b")``, ``and``, ``or``, ``not``, parentheses, ``true``/``false``. The rule of
highest ``precedence`` that matches wins (equal precedence is refused at load: the order of a
file is no precedence). A rule without a target, a target that is no store, an unknown label
name: the policy does not load. No matching rule is an error, never a silent fallback.

Whatever a policy says, nothing labelled ``personal`` or resident in ``cn`` is placed in the
public store: :func:`decide` refuses it (the record goes to the dead-letter topic, the upload is
refused) — a hard guard under every policy, checked by a property test. Every decision is
logged on ``xietong.placement``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("xietong.placement")

STORES = ("public", "private")
LABELS = ("sensitivity", "residency", "tenant", "kind")
SENSITIVITIES = ("public", "internal", "confidential", "personal")
_VALUE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,62}$")
NEVER_PUBLIC = {"sensitivity": "personal", "residency": "cn"}
"""Labels that keep data out of the public store under every policy."""


class PolicyError(ValueError):
    """A policy file that cannot be used."""


class PlacementError(ValueError):
    """No store may receive this: unknown labels, no rule, or a forbidden target."""


def normalise_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The four labels, lower-cased and checked; :class:`PlacementError` otherwise."""
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise PlacementError(f"unknown label(s) {unknown}; labels are {list(LABELS)}")
    missing = [name for name in LABELS if not labels.get(name)]
    if missing:
        raise PlacementError(f"missing label(s) {missing}")
    out = {name: str(labels[name]).strip().lower() for name in LABELS}
    bad = sorted(name for name, value in out.items() if not _VALUE.match(value))
    if bad:
        raise PlacementError(f"label value(s) of {bad} must be short lower-case words")
    if out["sensitivity"] not in SENSITIVITIES:
        raise PlacementError(
            f"unknown sensitivity {out['sensitivity']!r}; one of {list(SENSITIVITIES)}"
        )
    return out


# --------------------------------------------------------------------------- expressions

_TOKEN = re.compile(r'\s*(?:(\()|(\))|(==|!=)|(,)|"([^"]*)"|\'([^\']*)\'|([A-Za-z_][\w.:-]*))')

Expr = tuple[Any, ...]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise PolicyError(f"cannot read {text[position:]!r} in {text!r}")
        position = match.end()
        lpar, rpar, op, comma, dq, sq, word = match.groups()
        if lpar:
            out.append(("(", "("))
        elif rpar:
            out.append((")", ")"))
        elif op:
            out.append(("op", op))
        elif comma:
            out.append((",", ","))
        elif dq is not None or sq is not None:
            out.append(("str", (dq if dq is not None else sq).lower()))
        else:
            lowered = word.lower()
            kind = lowered if lowered in ("and", "or", "not", "in", "true", "false") else "name"
            out.append((kind, lowered))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at][0] if self.at < len(self.tokens) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            found = self.tokens[self.at][1] if self.at < len(self.tokens) else "the end"
            raise PolicyError(f"expected {kind} but found {found!r} in {self.text!r}")
        value = self.tokens[self.at][1]
        self.at += 1
        return value

    def parse(self) -> Expr:
        expr = self.either()
        if self.peek() is not None:
            raise PolicyError(f"unexpected {self.tokens[self.at][1]!r} in {self.text!r}")
        return expr

    def either(self) -> Expr:
        parts = [self.both()]
        while self.peek() == "or":
            self.take("or")
            parts.append(self.both())
        return parts[0] if len(parts) == 1 else ("or", *parts)

    def both(self) -> Expr:
        parts = [self.negation()]
        while self.peek() == "and":
            self.take("and")
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else ("and", *parts)

    def negation(self) -> Expr:
        if self.peek() == "not":
            self.take("not")
            return ("not", self.negation())
        return self.atom()

    def atom(self) -> Expr:
        kind = self.peek()
        if kind == "(":
            self.take("(")
            inner = self.either()
            self.take(")")
            return inner
        if kind in ("true", "false"):
            self.take(kind)
            return ("const", kind == "true")
        name = self.take("name")
        if name not in LABELS:
            raise PolicyError(f"unknown label {name!r} in {self.text!r}; labels are {list(LABELS)}")
        if self.peek() == "in":
            self.take("in")
            self.take("(")
            values = [self.take("str")]
            while self.peek() == ",":
                self.take(",")
                values.append(self.take("str"))
            self.take(")")
            return ("in", name, frozenset(values))
        op = self.take("op")
        return ("eq" if op == "==" else "ne", name, self.take("str"))


def parse_expression(text: str) -> Expr:
    """Parse a ``when`` expression; :class:`PolicyError` with the reason otherwise."""
    if not text.strip():
        raise PolicyError("an empty condition")
    return _Parser(text).parse()


def evaluate(expr: Expr, labels: Mapping[str, str]) -> bool:
    op = expr[0]
    if op == "const":
        return bool(expr[1])
    if op == "eq":
        return bool(labels[expr[1]] == expr[2])
    if op == "ne":
        return bool(labels[expr[1]] != expr[2])
    if op == "in":
        return labels[expr[1]] in expr[2]
    if op == "not":
        return not evaluate(expr[1], labels)
    if op == "and":
        return all(evaluate(part, labels) for part in expr[1:])
    return any(evaluate(part, labels) for part in expr[1:])


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Rule:
    name: str
    precedence: int
    when: str
    target: str
    condition: Expr


@dataclass(frozen=True)
class Decision:
    store: str
    rule: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Policy:
    """Rules, highest precedence first."""

    rules: tuple[Rule, ...]

    @classmethod
    def from_document(cls, doc: Any) -> Policy:
        if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
            raise PolicyError("a policy is a mapping with a list of rules")
        rules = []
        for index, raw in enumerate(doc["rules"]):
            if not isinstance(raw, dict):
                raise PolicyError(f"rule {index} is not a mapping")
            name = str(raw.get("name") or f"rule-{index}")
            target = str(raw.get("target") or "").strip().lower()
            if not target:
                raise PolicyError(f"rule {name!r} has no target")
            if target not in STORES:
                raise PolicyError(f"rule {name!r}: target {target!r} is none of {list(STORES)}")
            precedence = raw.get("precedence")
            if isinstance(precedence, bool) or not isinstance(precedence, int):
                raise PolicyError(f"rule {name!r} needs an integer precedence")
            when = raw.get("when", "")
            when = "true" if when is True else "false" if when is False else str(when)
            rules.append(Rule(name, precedence, when, target, parse_expression(when)))
        if not rules:
            raise PolicyError("a policy needs at least one rule")
        seen: dict[int, str] = {}
        for rule in rules:
            if rule.precedence in seen:
                raise PolicyError(
                    f"rules {seen[rule.precedence]!r} and {rule.name!r} have the same precedence"
                )
            seen[rule.precedence] = rule.name
        return cls(tuple(sorted(rules, key=lambda r: -r.precedence)))

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise PolicyError(f"cannot read the policy {path}: {error}") from None
        return cls.from_document(doc)

    def decide(self, labels: Mapping[str, str], *, subject: str = "") -> Decision:
        """The store for data with ``labels`` (logged); :class:`PlacementError` otherwise."""
        clean = normalise_labels(labels)
        for rule in self.rules:
            if evaluate(rule.condition, clean):
                if rule.target == "public":
                    forbidden = [k for k, v in NEVER_PUBLIC.items() if clean[k] == v]
                    if forbidden:
                        log.warning(
                            "placement refused",
                            extra={"subject": subject, "labels": clean, "rule": rule.name},
                        )
                        raise PlacementError(
                            f"rule {rule.name!r} sends data labelled "
                            f"{', '.join(f'{k}={clean[k]}' for k in forbidden)} to the public "
                            "store, which never receives it"
                        )
                decision = Decision(rule.target, rule.name, clean)
                log.info(
                    "placement",
                    extra={
                        "subject": subject,
                        "labels": clean,
                        "store": rule.target,
                        "rule": rule.name,
                    },
                )
                return decision
        raise PlacementError(f"no placement rule matches {clean}: the policy has no target for it")
