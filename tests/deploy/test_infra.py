"""The local platform's lifecycle (``deploy/local/infra.py``): data that outlives a stop and a
start, ports checked before anything starts, an instance never silently reported on another
port than asked for, a recorded pid that is not ours never stopped, ``clean`` the one wipe.

The unit tests start nothing; the integration ones start their own broker or SeaweedFS on free
ports with temporary folders (they stop and start them, which the session's shared ones must not
go through)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aioboto3
import pytest

from deploy.local import infra
from schemas.control import Tenant
from shared.control import ControlRegistry, ControlWriter
from shared.settings import load_settings


@pytest.fixture
def occupy() -> Iterator[list[socket.socket]]:
    """Listening sockets a test opens on ports it wants busy; closed afterwards."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def listen(held: list[socket.socket], port: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    held.append(sock)
    return port


def test_run_dir_is_the_checkout_s_run_unless_xietong_run_dir_names_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XIETONG_RUN_DIR", raising=False)
    assert infra.run_dir() == infra.ROOT / ".run"
    monkeypatch.setenv("XIETONG_RUN_DIR", str(tmp_path))
    assert infra.run_dir() == tmp_path


def test_the_suite_runs_in_a_run_folder_of_its_own() -> None:
    assert infra.run_dir() != infra.ROOT / ".run"


def test_kafka_refuses_a_busy_controller_port_naming_it_and_starts_nothing(
    occupy: list[socket.socket], tmp_path: Path
) -> None:
    controller = listen(occupy, infra.free_port())
    with pytest.raises(infra.PortsBusy) as refused:
        infra.start_kafka(port=infra.free_port(), controller_port=controller, data_dir=tmp_path)
    assert refused.value.busy == {controller: "kafka controller"}
    assert str(controller) in str(refused.value)
    assert not (tmp_path / "state.json").exists()


def test_seaweedfs_refuses_when_a_grpc_twin_is_busy_naming_it_and_starts_nothing(
    occupy: list[socket.socket], tmp_path: Path
) -> None:
    base = infra.free_port_block(8, also_offset=10000)
    s3_port = base + 3
    twin = listen(occupy, s3_port + 10000)
    try:
        with pytest.raises(infra.PortsBusy) as refused:
            server = infra.start_seaweedfs(s3_port=s3_port, data_dir=tmp_path)
            infra.stop(server)  # it should not have started; do not leave it behind
    finally:
        assert not (tmp_path / "state.json").exists()
    assert refused.value.busy == {twin: "seaweedfs s3 gRPC"}


def test_seaweedfs_ports_are_its_eight_http_ports_and_five_grpc_twins() -> None:
    ports = infra.seaweed_ports(8333)
    assert sorted(p for p in ports if p < 10000) == list(range(8330, 8338))
    assert sorted(p for p in ports if p > 10000) == list(range(18330, 18335))
    assert ports[8333] == "seaweedfs s3" and ports[18333] == "seaweedfs s3 gRPC"


def test_up_names_every_busy_port_in_one_line_before_starting_anything(
    occupy: list[socket.socket], tmp_path: Path
) -> None:
    kafka = infra.free_port_block(2)
    s3 = infra.free_port_block(8, also_offset=10000) + 3
    private = infra.free_port_block(8, also_offset=10000) + 3
    gateway = infra.free_port()
    ports = infra.LocalPorts(kafka=kafka, s3=s3, s3_private=private)
    busy = {
        listen(occupy, kafka + 1),
        listen(occupy, s3 - 3 + 10000),
        listen(occupy, private + 1),
        listen(occupy, gateway),
    }
    with pytest.raises(infra.PortsBusy) as refused:
        infra.up(ports, also_free={gateway: "ingest HTTP"}, run=tmp_path)
    assert set(refused.value.busy) == busy
    assert refused.value.busy[gateway] == "ingest HTTP"
    assert refused.value.busy[private + 1] == "seaweedfs private admin"
    assert "\n" not in str(refused.value)
    assert all(str(port) in str(refused.value) for port in busy)
    assert not any(tmp_path.glob("*/state.json"))


def test_a_recorded_pid_that_is_not_ours_is_neither_reused_nor_stopped(tmp_path: Path) -> None:
    """After a reboot the pid in a state file may be anyone's: down must leave it alone."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "kafka"
        folder.mkdir()
        (folder / "state.json").write_text(
            json.dumps(
                {
                    "port": 9,
                    "controller_port": 10,
                    "pid": stranger.pid,
                    "data_dir": str(folder),
                    "log_file": str(folder / "server.log"),
                }
            )
        )
        assert infra.running(tmp_path) == {}
        assert infra.down(run=tmp_path) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_clean_wipes_the_run_folder_and_says_what_each_entry_held(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "kafka" / "logs").mkdir(parents=True)
    (run / "state").mkdir()
    (run / "demo-keys.json").write_text("{}")
    wiped = infra.clean(run)
    assert not run.exists()
    assert [line.split()[0] for line in wiped] == [
        f"{run / 'demo-keys.json'}",
        f"{run / 'kafka'}/",
        f"{run / 'state'}/",
    ]
    assert "tenants, keys, grants, events, insights" in wiped[1]


# --------------------------------------------------------------------------- real instances


@pytest.mark.integration
@pytest.mark.slow
async def test_a_tenant_written_before_a_broker_stop_is_there_after_a_start(
    tmp_path: Path,
) -> None:
    data = tmp_path / "kafka"
    broker = infra.start_kafka(data_dir=data, heap="256m")
    try:
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap_servers, state_dir=str(tmp_path / "state")
        )
        tenant = Tenant(
            tenant="persist-01",
            name="Persistent Works",
            industry="steel",
            region="east",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        async with ControlWriter(settings) as writer:
            await writer.put_tenant(tenant)
        with pytest.raises(infra.AlreadyRunning):  # not silently the old port
            infra.start_kafka(port=infra.free_port(), data_dir=data)
        cluster_id = (data / "cluster-id").read_text()
    finally:
        infra.stop(broker)

    again = infra.start_kafka(data_dir=data, heap="256m")
    try:
        assert again.pid != broker.pid and (data / "cluster-id").read_text() == cluster_id
        settings = load_settings(
            kafka_bootstrap_servers=again.bootstrap_servers, state_dir=str(tmp_path / "state")
        )
        async with ControlRegistry(settings) as registry:
            assert registry.tenant("persist-01") == tenant
    finally:
        infra.stop(again)


# The main thread leaves with exit(2) (not exit_group) while another thread keeps a port: the
# leader is then a zombie although the process still runs, as SeaweedFS's was on SIGTERM.
_MAIN_THREAD_LEAVES_FIRST = """
import ctypes, socket, sys, threading, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
threading.Thread(target=lambda: (time.sleep(float(sys.argv[1])), listener.close())).start()
ctypes.CDLL(None).syscall(60, 0)
"""


def test_a_process_whose_main_thread_has_left_is_alive_until_its_last_thread_has() -> None:
    # Before: pid_alive took a zombie leader for a finished process, so stop() returned while
    # SeaweedFS's other threads still held its ports and the next start found them busy.
    process = subprocess.Popen(
        [sys.executable, "-c", _MAIN_THREAD_LEAVES_FIRST, "3"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not infra.port_is_free(port)
    assert infra.pid_alive(process.pid)
    process.wait(timeout=30)
    assert not infra.pid_alive(process.pid)


@pytest.mark.integration
async def test_seaweedfs_keeps_its_objects_and_credentials_across_a_stop_and_a_start(
    tmp_path: Path,
) -> None:
    server = infra.start_seaweedfs(data_dir=tmp_path)
    try:
        async with aioboto3.Session().client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=server.access_key_id,
            aws_secret_access_key=server.secret_access_key,
            region_name="us-east-1",
        ) as s3:
            await s3.create_bucket(Bucket="kept")
            await s3.put_object(Bucket="kept", Key="a.txt", Body=b"still here")
        other = infra.free_port_block(8, also_offset=10000) + 3
        with pytest.raises(infra.AlreadyRunning):
            infra.start_seaweedfs(s3_port=other, data_dir=tmp_path)
    finally:
        infra.stop(server)

    again = infra.start_seaweedfs(s3_port=server.s3_port, data_dir=tmp_path)
    try:
        assert (again.access_key_id, again.secret_access_key) == (
            server.access_key_id,
            server.secret_access_key,
        )
        async with aioboto3.Session().client(
            "s3",
            endpoint_url=again.endpoint_url,
            aws_access_key_id=again.access_key_id,
            aws_secret_access_key=again.secret_access_key,
            region_name="us-east-1",
        ) as s3:
            body = await (await s3.get_object(Bucket="kept", Key="a.txt"))["Body"].read()
        assert body == b"still here"
    finally:
        infra.stop(again)
