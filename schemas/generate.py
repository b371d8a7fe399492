"""Generate the JSON Schema files and the AsyncAPI 3 document from the pydantic models.

``python -m schemas.generate`` writes them; ``python -m schemas.generate --check`` exits 1 when
the committed files differ from what the models say (the drift test calls :func:`render`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from schemas.control import ApiKey, Grant, Tenant
from schemas.events import EVENT_MODELS, CleanEvent
from schemas.insights import INSIGHT_MODELS, DeadLetter
from schemas.internal import FirmWindowSummary, PartitionWatermark
from schemas.models import ModelAlias, ModelCard
from schemas.reference import FxRate
from schemas.topics import TOPICS

HERE = Path(__file__).resolve().parent
PLATFORM_VERSION = "1.0.0"


def schema_files() -> dict[str, type[BaseModel]]:
    """Relative path under ``schemas/`` -> model, for every contract."""
    files: dict[str, type[BaseModel]] = {}
    for (type_name, version), model in EVENT_MODELS.items():
        files[f"json/events/{type_name}.v{version}.json"] = model
    files["json/events/clean_event.v1.json"] = CleanEvent
    for type_name, insight_model in INSIGHT_MODELS.items():
        files[f"json/insights/{type_name}.v1.json"] = insight_model
    files["json/insights/dead_letter.v1.json"] = DeadLetter
    files["json/control/tenant.v1.json"] = Tenant
    files["json/control/api_key.v1.json"] = ApiKey
    files["json/control/grant.v1.json"] = Grant
    files["json/internal/firm_window_summary.v1.json"] = FirmWindowSummary
    files["json/internal/partition_watermark.v1.json"] = PartitionWatermark
    files["json/models/model_card.v1.json"] = ModelCard
    files["json/models/model_alias.v1.json"] = ModelAlias
    files["json/reference/fx_rate.v1.json"] = FxRate
    return files


def json_schema(path: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://xietong.dev/schemas/{path}",
        **schema,
    }


def _channel_id(topic: str) -> str:
    head, *rest = topic.split(".")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def asyncapi_document(files: dict[str, type[BaseModel]]) -> dict[str, Any]:
    path_of = {model: path for path, model in files.items()}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for spec in TOPICS:
        channel_id = _channel_id(spec.name)
        channel_messages: dict[str, Any] = {}
        for model in spec.messages:
            name = model.__name__
            messages[name] = {
                "name": name,
                "title": name,
                "summary": (model.__doc__ or "").strip().splitlines()[0],
                "contentType": "application/json",
                "payload": {
                    "schemaFormat": "application/schema+json;version=draft-2020-12",
                    "schema": {"$ref": f"./{path_of[model]}"},
                },
                "bindings": {"kafka": {"key": {"type": "string", "description": spec.key}}},
            }
            channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        channels[channel_id] = {
            "address": spec.name,
            "description": spec.description,
            "messages": channel_messages,
            "bindings": {
                "kafka": {
                    "topic": spec.name,
                    "topicConfiguration": {
                        "cleanup.policy": ["compact"] if spec.compacted else ["delete"]
                    },
                }
            },
        }
        refs = [{"$ref": f"#/channels/{channel_id}/messages/{m.__name__}"} for m in spec.messages]
        for producer in spec.producers:
            operations[f"{producer}Sends{channel_id[:1].upper()}{channel_id[1:]}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": f"{producer} publishes to {spec.name}",
                "messages": refs,
            }
        for consumer in spec.consumers:
            operations[f"{consumer}Receives{channel_id[:1].upper()}{channel_id[1:]}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": f"{consumer} consumes {spec.name}",
                "messages": refs,
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Xietong event bus",
            "version": PLATFORM_VERSION,
            "description": (
                "Topics of the Xietong industrial collaboration platform. Keys are UTF-8 "
                "strings; values are UTF-8 JSON. Compatibility rule: a new version of a "
                "payload may only add optional fields (see schemas/compat.py)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:9092",
                "protocol": "kafka",
                "description": "The broker `make kafka-up` starts.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> dict[str, str]:
    """Relative path -> file content, for every generated file."""
    files = schema_files()
    out = {
        path: json.dumps(json_schema(path, model), indent=2, ensure_ascii=False, sort_keys=True)
        + "\n"
        for path, model in files.items()
    }
    out["asyncapi.yaml"] = yaml.safe_dump(
        asyncapi_document(files), sort_keys=False, allow_unicode=True, width=100
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, content in render().items():
        target = HERE / rel
        if target.exists() and target.read_text() == content:
            continue
        stale.append(rel)
        if not args.check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    if args.check and stale:
        print("stale contract files (run `make schemas`):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{len(stale)} file(s) {'stale' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
