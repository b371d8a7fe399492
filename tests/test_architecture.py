"""The layering rule, checked on the source: services never import each other, and the shared
library and the contracts never import a service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_services_import_only_themselves_shared_and_schemas() -> None:
    problems = []
    for service_dir in sorted(p for p in (ROOT / "services").iterdir() if p.is_dir()):
        for path in service_dir.rglob("*.py"):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != service_dir.name:
                    problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert problems == []


def test_shared_and_schemas_never_import_a_service() -> None:
    problems = [
        f"{path.relative_to(ROOT)} imports {module}"
        for package in ("shared", "schemas")
        for path in (ROOT / package).rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in ("services", "xietong", "deploy", "bench")
    ]
    assert problems == []
