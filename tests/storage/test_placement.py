"""Hybrid placement: the policy language, its errors, and the guard that keeps personal and
China-resident data out of the public store under any policy (a property test)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.storage.placement import (
    LABELS,
    SENSITIVITIES,
    PlacementError,
    Policy,
    PolicyError,
    evaluate,
    parse_expression,
)

ROOT = Path(__file__).resolve().parents[2]


def labels(**overrides: str) -> dict[str, str]:
    return {
        "sensitivity": "internal",
        "residency": "eu",
        "tenant": "acme",
        "kind": "drawing",
        **overrides,
    }


def test_the_shipped_policy_loads_and_places() -> None:
    policy = Policy.load(ROOT / "deploy" / "placement-policy.yaml")
    assert policy.decide(labels()).store == "public"
    assert policy.decide(labels(sensitivity="personal")).store == "private"
    assert policy.decide(labels(residency="CN")).rule == "personal-or-china-resident-stays-private"
    assert policy.decide(labels(kind="contract")).store == "private"
    assert policy.decide(labels(kind="benchmark", sensitivity="public")).store == "public"


def test_expressions_have_precedence_parentheses_and_lower_case() -> None:
    expr = parse_expression('NOT kind == "A" and (residency in ("eu", "us") or tenant != "x")')
    assert evaluate(expr, labels(kind="b", residency="cn", tenant="y"))
    assert not evaluate(expr, labels(kind="a"))
    assert not evaluate(expr, labels(kind="b", residency="cn", tenant="x"))
    # and binds tighter than or
    assert evaluate(parse_expression("true or false and false"), labels())
    assert not evaluate(parse_expression("(true or false) and false"), labels())


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"rules": [{"name": "a", "precedence": 1, "when": "true"}]}, "no target"),
        ({"rules": [{"name": "a", "precedence": 1, "when": "true", "target": ""}]}, "no target"),
        ({"rules": [{"name": "a", "precedence": 1, "when": "true", "target": "moon"}]}, "none of"),
        (
            {
                "rules": [
                    {"name": "a", "precedence": 1, "when": 'colour == "x"', "target": "public"}
                ]
            },
            "unknown label",
        ),
        (
            {"rules": [{"name": "a", "precedence": 1, "when": "(true", "target": "public"}]},
            "expected",
        ),
        (
            {
                "rules": [
                    {"name": "a", "precedence": 1, "when": "true", "target": "public"},
                    {"name": "b", "precedence": 1, "when": "true", "target": "private"},
                ]
            },
            "same precedence",
        ),
        ({"rules": []}, "at least one"),
        ({"rules": [{"name": "a", "when": "true", "target": "public"}]}, "precedence"),
    ],
)
def test_a_bad_policy_does_not_load(document: object, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        Policy.from_document(document)


def test_no_matching_rule_and_unknown_labels_are_errors_never_a_fallback() -> None:
    policy = Policy.from_document(
        {
            "rules": [
                {"name": "eu", "precedence": 1, "when": 'residency == "eu"', "target": "public"}
            ]
        }
    )
    with pytest.raises(PlacementError, match="no placement rule"):
        policy.decide(labels(residency="us"))
    with pytest.raises(PlacementError, match="unknown label"):
        policy.decide({**labels(), "colour": "red"})
    with pytest.raises(PlacementError, match="unknown sensitivity"):
        policy.decide(labels(sensitivity="secret"))
    with pytest.raises(PlacementError, match="missing"):
        policy.decide({"sensitivity": "internal", "tenant": "acme", "kind": "x"})


def random_condition(rng: random.Random, depth: int = 0) -> str:
    choice = rng.random()
    if depth > 2 or choice < 0.4:
        label = rng.choice(LABELS)
        values = {
            "sensitivity": SENSITIVITIES,
            "residency": ("cn", "eu", "any", "CN"),
            "tenant": ("acme", "bolt"),
            "kind": ("drawing", "contract", "benchmark"),
        }[label]
        if rng.random() < 0.3:
            return f"{label} in ({', '.join(repr(v) for v in rng.sample(values, 2))})"
        return f'{label} {rng.choice(["==", "!="])} "{rng.choice(values)}"'
    if choice < 0.55:
        return rng.choice(["true", "false"])
    if choice < 0.7:
        return f"not ({random_condition(rng, depth + 1)})"
    op = rng.choice(["and", "or"])
    return f"({random_condition(rng, depth + 1)}) {op} ({random_condition(rng, depth + 1)})"


@pytest.mark.parametrize("seed", range(30))
def test_personal_or_china_resident_data_never_reaches_the_public_store(seed: int) -> None:
    """Random policies (many sending everything public) over random records: a decision is
    private or an error, never public, for anything personal or resident in China."""
    rng = random.Random(seed)
    rules = [
        {
            "name": f"r{i}",
            "precedence": i,
            "when": random_condition(rng),
            "target": rng.choice(["public", "public", "private"]),
        }
        for i in range(rng.randint(1, 6))
    ]
    rules.append({"name": "all-public", "precedence": -1, "when": "true", "target": "public"})
    policy = Policy.from_document({"rules": rules})
    seen = 0
    for _ in range(200):
        record = labels(
            sensitivity=rng.choice(SENSITIVITIES),
            residency=rng.choice(["cn", "CN", "eu", "any", " Cn "]),
            tenant=rng.choice(["acme", "bolt"]),
            kind=rng.choice(["drawing", "contract", "benchmark"]),
        )
        forbidden = (
            record["sensitivity"] == "personal" or record["residency"].strip().lower() == "cn"
        )
        seen += forbidden
        try:
            decision = policy.decide(record)
        except PlacementError:
            assert forbidden
            continue
        if forbidden:
            assert decision.store == "private"
        assert decision.labels["residency"] == record["residency"].strip().lower()
    assert seen > 0
