"""Keeps the latest table in ``bench/README.md`` between two markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def results_section(document: dict[str, Any]) -> str:
    env = document["environment"]
    libs = ", ".join(f"{name} {version}" for name, version in env["libraries"].items() if version)
    return "\n".join(
        [
            BEGIN,
            f"Measured {env['measured_at']} on {env['machine']} ({env['cpu_count']} CPUs, shared), "
            f"Python {env['python']}, {env['broker']}; {env['events']} events per drain, "
            f"{env['repeats']} repeats after {env['warmup']} warm-up.",
            "",
            f"Command: `{env['command']}`",
            "",
            document["table"],
            "",
            f"Libraries: {libs}.",
            END,
        ]
    )


def write_readme(path: Path, document: dict[str, Any], *, append: bool = True) -> None:
    """Replace the section between the markers (or append one, unless ``append`` is False)."""
    section = results_section(document)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    elif append:
        text = text.rstrip() + ("\n\n" if text else "") + section + "\n"
    else:
        return
    path.write_text(text)
