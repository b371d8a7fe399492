"""The CLI's options and settings, without a broker: one name for one meaning, one variable for
the gateway, ``xietong --version``."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import click
from click.testing import CliRunner

from xietong.cli import main

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers there


def run(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    clean = {"XIETONG_GATEWAY_URL": None, "XIETONG_URL": None, "XIETONG_API_KEY": None}
    return CliRunner().invoke(main, list(args), env={**clean, **(env or {})})  # type: ignore[dict-item]


def test_version_prints_the_installed_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"xietong {version('xietong')}"


def options_by_name(command: click.Command, path: str = "xietong") -> dict[str, set[str]]:
    """Option name -> the commands that offer it (hidden ones left out)."""
    found: dict[str, set[str]] = {}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            for name in param.opts:
                found.setdefault(name, set()).add(path)
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            for option, where in options_by_name(sub, f"{path} {name}").items():
                found.setdefault(option, set()).update(where)
    return found


def test_kafka_and_version_mean_one_thing_each() -> None:
    names = options_by_name(main)
    assert names["--kafka"] == {"xietong"}  # the bootstrap address, nowhere a tenant
    assert names["--version"] == {"xietong"}  # the program's, not a payload's
    assert "xietong subscribe" in names["--as-tenant"]
    assert "xietong publish" in names["--schema-version"]


def test_subscribe_kafka_says_where_the_option_goes() -> None:
    result = run("subscribe", "--kafka", "acme")
    assert result.exit_code == 2
    assert "--as-tenant" in result.output and "bootstrap" in result.output


def test_every_gateway_command_reads_xietong_gateway_url(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text('{"type": "sales_order_line"}\n')
    commands = [
        ["share", "list"],
        ["share", "audit"],
        ["share", "revoke", "g1234567"],
        ["subscribe", "--count", "1"],
        ["publish", str(events), "--retries", "0", "--no-progress"],
    ]
    env = {"XIETONG_GATEWAY_URL": UNREACHABLE, "XIETONG_API_KEY": "xt_k_s"}
    for command in commands:
        result = run(*command, env=env)
        assert result.exit_code == 1, (command, result.output)
        assert f"cannot reach the gateway at {UNREACHABLE}" in result.output, command


def test_the_old_url_variable_still_works_and_says_it_is_deprecated() -> None:
    result = run("share", "list", env={"XIETONG_URL": UNREACHABLE, "XIETONG_API_KEY": "xt_k_s"})
    assert result.exit_code == 1
    assert "XIETONG_URL is deprecated" in result.output
    assert f"cannot reach the gateway at {UNREACHABLE}" in result.output


def test_without_a_url_the_gateway_is_the_local_one_of_the_ingest_settings() -> None:
    env = {"XIETONG_INGEST_HTTP_PORT": "9", "XIETONG_API_KEY": "xt_k_s"}
    result = run("share", "list", env=env)
    assert f"cannot reach the gateway at {UNREACHABLE}" in result.output
    given = run("share", "list", "--url", "http://127.0.0.1:7", env=env)
    assert "cannot reach the gateway at http://127.0.0.1:7" in given.output
