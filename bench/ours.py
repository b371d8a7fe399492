"""Our services as the harness drives them — found at run time, never imported by name at import.

Each finder returns a callable or raises :class:`NotAvailable` with the reason, so a service that
has not landed yet shows up as "not available" in the table instead of breaking the harness.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from shared.settings import XietongSettings

HopRunner = Callable[[XietongSettings, asyncio.Event, str, str, str], Coroutine[Any, Any, Any]]
"""``run(settings, stop, source, target, group)`` — runs a hop until ``stop`` is set."""


class NotAvailable(Exception):
    """The service (or the entry point the harness needs) does not exist yet."""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise NotAvailable(f"{name} does not exist yet") from error
        raise


def service_exists(name: str) -> bool:
    """``python -m services.<name>`` would run."""
    try:
        return importlib.util.find_spec(f"services.{name}.__main__") is not None
    except ModuleNotFoundError:
        return False


def clean_hop() -> HopRunner:
    """The clean service's hop, ``services.clean.app.run_clean``, in this process."""
    app = _module("services.clean.app")
    run_clean = getattr(app, "run_clean", None)
    if run_clean is None:
        raise NotAvailable("services.clean.app has no run_clean")
    accepted = set(inspect.signature(run_clean).parameters)
    settings_type = _settings_type("clean")

    async def run(
        settings: XietongSettings, stop: asyncio.Event, source: str, target: str, group: str
    ) -> None:
        service_settings = settings_type(
            **_plain(settings), **_known(settings_type, clean_group_id=group, group_id=group)
        )
        kwargs: dict[str, Any] = {}
        if "source" in accepted:
            kwargs["source"] = source
        if "target" in accepted:
            kwargs["target"] = target
        for name in ("group_id", "group"):
            if name in accepted:
                kwargs[name] = group
        await run_clean(service_settings, stop, **kwargs)

    return run


def _settings_type(service: str) -> Any:
    try:
        module = importlib.import_module(f"services.{service}.settings")
    except ModuleNotFoundError:
        return XietongSettings
    name = f"{service.capitalize()}Settings"
    return getattr(module, name, XietongSettings)


def _plain(settings: XietongSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in type(settings).model_fields}


def _known(settings_type: Any, **candidates: Any) -> dict[str, Any]:
    """Only the overrides this settings class has a field for."""
    fields = settings_type.model_fields
    return {name: value for name, value in candidates.items() if name in fields}
