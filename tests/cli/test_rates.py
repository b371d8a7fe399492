"""``xietong rates set|load|list`` against the real local Kafka."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from shared.settings import XietongSettings
from tests.cli.test_cli import xietong

pytestmark = pytest.mark.integration


def test_the_operator_sets_and_loads_dated_rates_and_lists_them(
    settings: XietongSettings, tmp_path: Path
) -> None:
    code = "Q" + "".join(random.choices(string.ascii_uppercase, k=2))  # the topic is shared
    done = xietong(
        settings, "rates", "set", code, "7.7012", "--date", "2026-11-30", "--source", "PBOC"
    )
    assert done.exit_code == 0, done.output
    assert f"{code}/2026-11-30 = 7.7012 CNY (PBOC)" in done.output

    csv = tmp_path / "rates.csv"
    csv.write_text(f"currency,date,cny_per_unit,source\n{code},2026-11-29,7.6512,PBOC\n")
    assert xietong(settings, "rates", "load", str(csv)).output.strip() == "1 rates published"

    listed = xietong(settings, "rates", "list", "--currency", code)
    assert [line.split()[:3] for line in listed.output.splitlines()] == [
        [code, "2026-11-29", "7.6512"],
        [code, "2026-11-30", "7.7012"],
    ]
    on_date = xietong(settings, "rates", "list", "--currency", code, "--date", "2026-12-01")
    assert on_date.output.split()[:3] == [code, "2026-11-30", "7.7012"]

    bad = tmp_path / "bad.csv"
    bad.write_text("currency,date,cny_per_unit,source\nEUR,2026-11-29,1e3,PBOC\n")
    refused = xietong(settings, "rates", "load", str(bad))
    assert refused.exit_code != 0 and "row 2: cny_per_unit" in refused.output
