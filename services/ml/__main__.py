"""``python -m services.ml``: run the ml service (see :mod:`.app`); its HTTP server listens on
``XIETONG_HTTP_HOST``:``XIETONG_ML_HTTP_PORT`` (``GET /v1/models``, ``/healthz``, ``/readyz``,
``/metrics``). SIGTERM or SIGINT finish the current batch, commit it and exit.

``python -m services.ml train MODEL [--family keras-mlp] [--alias champion]`` trains one use
case now on the consenting firms' clean events, registers it and moves the alias (default:
champion if there is none, else challenger), then exits.
"""

from __future__ import annotations

import argparse
import asyncio

from aiokafka.errors import KafkaError

from services.ml.app import run_ml, train_and_register
from services.ml.families import FAMILIES
from services.ml.handlers import SERVICE
from services.ml.settings import load_ml_settings
from services.ml.specs import SPECS
from shared.control import ControlRegistry
from shared.kafka import kafka_problem, stop_on_signals
from shared.logs import configure_logging
from shared.models import ModelRegistry


async def serve() -> None:
    settings = load_ml_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_ml(settings, stop)


async def train_once(name: str, family: str, alias: str | None) -> None:
    settings = load_ml_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    async with ControlRegistry(settings) as control, ModelRegistry(settings) as registry:
        card = await train_and_register(settings, registry, control, name, family, alias=alias)
    print(f"{card.name} v{card.version} ({card.family}, {card.contributing_firms} firms)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.ml")
    commands = parser.add_subparsers(dest="command")
    trainer = commands.add_parser("train", help="train one use case now and register it")
    trainer.add_argument("model", choices=sorted(SPECS))
    trainer.add_argument("--family", choices=FAMILIES, default="sklearn-rf")
    trainer.add_argument("--alias", default=None, help="champion or challenger")
    args = parser.parse_args()
    try:
        if args.command == "train":
            asyncio.run(train_once(args.model, args.family, args.alias))
        else:
            asyncio.run(serve())
    except (KafkaError, TimeoutError, ConnectionError) as error:
        # the broker away when training, or still away when told to stop: one line, no trace
        bootstrap = load_ml_settings().kafka_bootstrap_servers
        raise SystemExit(f"ml: {kafka_problem(error, bootstrap)}") from None


if __name__ == "__main__":
    main()
