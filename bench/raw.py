"""Raw stand-ins for our services, run as processes like the services themselves.

``python -m bench.raw gateway --port P [--target T [--passthrough]]`` — a bare aiohttp handler:
reads the body and answers 202; with ``--target`` it first decodes the NDJSON lines and sends each
event to ``T`` with a plain ``AIOKafkaProducer`` (default settings), awaiting the request's
deliveries together. With ``--passthrough`` it checks nothing and decodes nothing: it splits the
body into lines and publishes them as they are with our :class:`~shared.kafka.BatchPublisher`
(``acks=all``, one batch per request, keyed by a digest of the API key) — the least any gateway
that answers only after Kafka acknowledged must do, so the ceiling of one on this machine.

``python -m bench.raw hop --source S --target T --group G`` — :func:`bench.hops.baseline_hop`
until SIGTERM.

Both read the broker from ``XIETONG_KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer

from bench.hops import baseline_hop
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    connection_config,
    create_producer,
    stop_on_signals,
)
from shared.settings import XietongSettings, load_settings

PRODUCER_KEY = web.AppKey("producer", AIOKafkaProducer)


def bare_gateway(
    settings: XietongSettings, target: str | None, *, passthrough: bool = False
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def accept(request: web.Request) -> web.Response:
        body = await request.read()
        if target is not None and passthrough:
            # One key per API key, as the gateway keys by tenant; never the credential itself.
            key = hashlib.sha256(request.headers.get("Authorization", "").encode()).digest()[:8]
            await BatchPublisher(request.app[PRODUCER_KEY]).publish(
                target, [OutRecord(key, line) for line in body.split(b"\n") if line]
            )
        elif target is not None:
            producer = request.app[PRODUCER_KEY]
            futures = []
            for line in body.splitlines():  # NDJSON, as partners post to the gateway
                if not line.strip():
                    continue
                event = json.loads(line)
                futures.append(
                    await producer.send(
                        target, json.dumps(event).encode(), key=event["tenant"].encode()
                    )
                )
            await asyncio.gather(*futures)
        return web.Response(status=202)

    async def producer_ctx(app: web.Application) -> Any:
        producer = (
            create_producer(settings, linger_ms=0)
            if passthrough
            else AIOKafkaProducer(**connection_config(settings))
        )
        await producer.start()
        app[PRODUCER_KEY] = producer
        yield
        await producer.stop()

    if target is not None:
        app.cleanup_ctx.append(producer_ctx)
    app.router.add_route("POST", "/{tail:.*}", accept)
    return app


async def _hop(settings: XietongSettings, source: str, target: str, group: str) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    await baseline_hop(settings, source, target, group, stop=stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw")
    sub = parser.add_subparsers(dest="kind", required=True)
    gateway = sub.add_parser("gateway")
    gateway.add_argument("--port", type=int, required=True)
    gateway.add_argument("--target")
    gateway.add_argument("--passthrough", action="store_true")
    hop = sub.add_parser("hop")
    hop.add_argument("--source", required=True)
    hop.add_argument("--target", required=True)
    hop.add_argument("--group", required=True)
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.kind == "gateway":
        web.run_app(
            bare_gateway(settings, args.target, passthrough=args.passthrough),
            host="127.0.0.1",
            port=args.port,
            print=None,
            access_log=None,
        )
    else:
        asyncio.run(_hop(settings, args.source, args.target, args.group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
