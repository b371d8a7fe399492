"""``xietong models list|show|promote|rollback`` against the real Kafka and SeaweedFS."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner, Result

from services.ml.settings import MlSettings
from shared.control import new_id
from shared.models import ModelRegistry
from xietong.cli import main

pytestmark = pytest.mark.integration


def xietong(settings: MlSettings, *args: str) -> Result:
    assert settings.s3_access_key_id and settings.s3_secret_access_key
    env = {
        "XIETONG_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "XIETONG_S3_ACCESS_KEY_ID": settings.s3_access_key_id.get_secret_value(),
        "XIETONG_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get_secret_value(),
        "XIETONG_MODELS_BUCKET": settings.models_bucket,
    }
    return CliRunner().invoke(
        main, ["--kafka", settings.kafka_bootstrap_servers, *args], env=env, catch_exceptions=False
    )


def test_list_show_promote_and_rollback(ml_settings: MlSettings) -> None:
    name = f"m{new_id()}"  # the real registry topics: a name no other test uses
    card = {
        "name": name,
        "use_case": "test",
        "task": "regression",
        "target": "y",
        "family": "keras-mlp",
        "serialization": "joblib+keras",
        "features": [{"name": "x", "dtype": "number"}],
        "training_rows": 10,
        "contributing_firms": 5,
    }

    async def two_versions() -> None:
        async with ModelRegistry(ml_settings) as registry:
            for body in (b"one", b"two"):
                await registry.register(body, card, by="test")
            await registry.set_alias(name, "champion", 1, by="test")

    asyncio.run(two_versions())

    listed = xietong(ml_settings, "models", "list", name)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:6] == ["name", "version", "family", "firms", "rows", "aliases"]
    assert lines[1].split()[:6] == [name, "1", "keras-mlp", "5", "10", "champion"]

    promoted = xietong(ml_settings, "models", "promote", name, "2")
    assert promoted.exit_code == 0 and f"{name} champion: 1 -> 2" in promoted.output
    shown = json.loads(xietong(ml_settings, "models", "show", name).output)
    assert shown["version"] == 2 and shown["aliases"] == {"champion": 2}

    back = xietong(ml_settings, "models", "rollback", name)
    assert back.exit_code == 0 and f"{name} champion: 2 -> 1" in back.output
    assert json.loads(xietong(ml_settings, "models", "show", name).output)["version"] == 1
    assert xietong(ml_settings, "models", "rollback", name).exit_code == 1
    assert xietong(ml_settings, "models", "promote", name, "9").exit_code == 1
    assert xietong(ml_settings, "models", "show", name, "challenger").exit_code == 1
