"""One settings scheme: the README's settings table and CSV columns are generated from the code
(and fail here when they drift); every variable the CLI, the Makefile and the local platform read
is one of the documented ones."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest

from deploy import settings_doc
from deploy.csv_doc import BEGIN as CSV_BEGIN
from deploy.csv_doc import END as CSV_END
from deploy.csv_doc import csv_columns, render_csv_columns
from deploy.local import infra
from deploy.local.demo import configured_port, existing_services, service_ports
from deploy.settings_doc import (
    BEGIN,
    END,
    own_fields,
    render_settings,
    settings_classes,
    variable,
)
from shared.settings import LocalSettings
from xietong.cli import main

ROOT = Path(settings_doc.__file__).resolve().parents[1]


def block(text: str, begin: str, end: str) -> str:
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end


def documented_variables() -> set[str]:
    return {variable(cls, name) for cls in settings_classes() for name in own_fields(cls)}


def test_the_readme_settings_table_is_what_the_settings_classes_say() -> None:
    readme = (ROOT / "README.md").read_text()
    assert block(readme, BEGIN, END) == render_settings(), "run: python -m deploy.settings_doc"


def test_the_readme_csv_columns_are_what_the_contracts_say() -> None:
    readme = (ROOT / "README.md").read_text()
    assert block(readme, CSV_BEGIN, CSV_END) == render_csv_columns(), (
        "run: python -m deploy.settings_doc"
    )


def test_every_service_settings_module_is_found_without_a_list() -> None:
    modules = {cls.__module__ for cls in settings_classes()}
    for path in (ROOT / "services").glob("*/settings.py"):
        assert f"services.{path.parent.name}.settings" in modules
    assert {"shared.settings", "xietong.settings"} <= modules


def test_every_setting_is_described_and_has_one_variable() -> None:
    seen: dict[str, str] = {}
    for cls in settings_classes():
        for name, info in own_fields(cls).items():
            name_of = f"{cls.__name__}.{name}"
            assert info.description, f"{name_of} has no description (the README shows it)"
            env = variable(cls, name)
            assert env.startswith("XIETONG_"), name_of
            assert env not in seen, f"{env} is declared by {seen.get(env)} and {name_of}"
            seen[env] = name_of


def _options(command: click.Command, path: str = "xietong") -> list[tuple[str, click.Option]]:
    found = [(path, param) for param in command.params if isinstance(param, click.Option)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _options(sub, f"{path} {name}")
    return found


def test_every_variable_the_cli_reads_is_a_documented_setting() -> None:
    documented = documented_variables()
    for where, option in _options(main):
        names = option.envvar if isinstance(option.envvar, list | tuple) else [option.envvar]
        for name in filter(None, names):
            assert name in documented, f"{where} {option.opts} reads undocumented {name}"


def test_the_local_platform_reads_the_documented_port_variables_and_their_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable_name, alias in infra.PORT_VARIABLES.values():
        monkeypatch.delenv(variable_name, raising=False)
        monkeypatch.delenv(alias, raising=False)
    assert infra.LocalPorts.from_env() == infra.LocalPorts()
    defaults = LocalSettings()
    assert (infra.LocalPorts().kafka, infra.LocalPorts().s3, infra.LocalPorts().s3_private) == (
        defaults.local_kafka_port,
        defaults.local_s3_port,
        defaults.local_s3_private_port,
    )
    documented = documented_variables()
    for number, (field, (variable_name, alias)) in enumerate(infra.PORT_VARIABLES.items()):
        assert variable_name in documented
        monkeypatch.setenv(variable_name, str(20000 + number))
        assert getattr(infra.LocalPorts.from_env(), field) == 20000 + number
        monkeypatch.delenv(variable_name)
        monkeypatch.setenv(alias, str(21000 + number))  # the Makefile's short name still works
        assert getattr(infra.LocalPorts.from_env(), field) == 21000 + number
        monkeypatch.delenv(alias)
    assert "XIETONG_RUN_DIR" in documented


def test_by_default_every_service_takes_its_own_setting_and_no_two_share_a_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = existing_services()
    ports = service_ports(names, gateway_port=configured_port("ingest"), health_port_base=None)
    assert len(ports) == len(names) + 1  # the gateway has two: partner and operator port
    monkeypatch.setenv("XIETONG_CLEAN_HTTP_PORT", "18081")
    monkeypatch.setenv("XIETONG_INGEST_HTTP_PORT", "18080")
    ports = service_ports(names, gateway_port=configured_port("ingest"), health_port_base=None)
    assert ports[18081] == "clean HTTP"
    assert ports[18080] == "ingest HTTP"


def test_the_makefile_short_names_are_aliases_of_the_settings() -> None:
    shown = subprocess.run(
        ["make", "-pn", "help", "GATEWAY_PORT=18180", "KAFKA_PORT=19092", "S3_PORT=18333"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "XIETONG_INGEST_HTTP_PORT := 18180" in shown
    assert "XIETONG_LOCAL_KAFKA_PORT := 19092" in shown
    assert "XIETONG_LOCAL_S3_PORT := 18333" in shown


def test_csv_columns_say_what_the_header_check_requires() -> None:
    from services.ingest.csvmap import CsvHeaderError, check_header

    required, optional = csv_columns("sales_order_line", 1)
    names = [column.split("`")[1] for column in required]
    check_header(names, "sales_order_line", 1)  # the required columns alone are a valid header
    for missing in names:
        with pytest.raises(CsvHeaderError):
            check_header([n for n in names if n != missing], "sales_order_line", 1)
    assert "`quantity` (number)" in required and "`line_no` (integer)" in optional
