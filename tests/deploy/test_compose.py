"""docker-compose.yml, deploy/Dockerfile and deploy/k8s checked against the code in services/.

There is no Docker engine on our machines, so the files are parsed and checked: every service
package (``services/<name>/__main__.py``) has a container and a Deployment, built from the one
image, running ``python -m services.<name>``, listening and probed on its port; every setting
named is one ``shared/settings.py`` knows; no secret is written down. The compose healthcheck
command itself runs against a real health server.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local.infra import free_port
from shared.observability import serve_health
from shared.settings import XietongSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"

HTTP_PORTS = {
    "ingest": 8080,
    "clean": 8081,
    "analytics": 8082,
    "ml": 8083,
    "nlp": 8084,
    "storage": 8085,
}
"""The health/metrics (and API) port of each planned service, ``XIETONG_<SERVICE>_HTTP_PORT``."""
METRICS_PORTS = {"ingest": 8090}
"""Services whose Prometheus metrics are on a port of their own (``XIETONG_<S>_METRICS_PORT``):
the gateway's HTTP port faces the partners."""

INFRA = {"kafka", "seaweedfs", "seaweedfs-private"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|API_KEY|CREDENTIAL", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+(?:[:]?[?][^}]*)?\}")
"""A whole value that only names an environment variable (``${X}`` or ``${X:?message}``)."""
SECRET_NAME_REF = "xietong-credentials"
CONFIG_NAME_REF = "xietong-config"


def service_packages() -> list[str]:
    """The services that exist now: a package with a ``__main__.py``."""
    return sorted(path.parent.name for path in (ROOT / "services").glob("*/__main__.py"))


# --------------------------------------------------------------------------- compose parsing

_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset, as `docker compose` would refuse."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        if name is None:
            return "$"
        value = env.get(name)
        unset = value is None or (value == "" and operator is not None and operator.startswith(":"))
        if operator in (":-", "-"):
            return argument if unset else str(value)
        if operator in (":?", "?"):
            if unset:
                raise MissingVariable(name)
            return str(value)
        return value or ""

    return _VARIABLE.sub(substitute, text)


def required_variables(text: str) -> set[str]:
    """The variables compose insists on (``${X:?...}``)."""
    return {m.group(1) for m in _VARIABLE.finditer(text) if m.group(2) in (":?", "?")}


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = COMPOSE_FILE.read_text()
    if env is None:
        env = {name: f"dummy-{name.lower()}" for name in required_variables(text)}
    loaded: dict[str, Any] = yaml.safe_load(interpolate(text, env))
    return loaded


def raw_compose() -> dict[str, Any]:
    """The file as written, before substitution (to see what is a reference and what a literal)."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose["services"].items() if name not in INFRA}


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    environment = spec.get("environment", {})
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def known_setting(env_name: str) -> bool:
    """An ``XIETONG_`` variable is a field of XietongSettings or a service's own port."""
    field = env_name.removeprefix("XIETONG_").lower()
    if field in XietongSettings.model_fields:
        return True
    if field.startswith("storage_"):  # the storage service's own settings (its second store)
        from services.storage.settings import StorageSettings

        return field in StorageSettings.model_fields
    return any(field == f"{service}_http_port" for service in HTTP_PORTS) or any(
        field == f"{service}_metrics_port" for service in METRICS_PORTS
    )


# --------------------------------------------------------------------------- compose


def test_compose_refuses_to_start_without_the_s3_credentials_and_the_network_secret() -> None:
    with pytest.raises(MissingVariable):
        load_compose(env={})
    required = required_variables(COMPOSE_FILE.read_text())
    assert required == {
        "XIETONG_S3_ACCESS_KEY_ID",
        "XIETONG_S3_SECRET_ACCESS_KEY",
        "XIETONG_NETWORK_SECRET",
        # the storage service's private store, a second S3 server
        "XIETONG_STORAGE_PRIVATE_S3_ACCESS_KEY_ID",
        "XIETONG_STORAGE_PRIVATE_S3_SECRET_ACCESS_KEY",
    }


def test_every_service_package_has_a_compose_service() -> None:
    compose = load_compose()
    missing = set(service_packages()) - set(app_services(compose))
    assert not missing, f"add these services to docker-compose.yml: {sorted(missing)}"


def test_every_compose_service_is_an_existing_service_package() -> None:
    extra = set(app_services(load_compose())) - set(service_packages())
    assert not extra, f"docker-compose.yml runs services that do not exist: {sorted(extra)}"


def test_compose_services_share_one_image_and_run_their_module() -> None:
    compose = load_compose()
    services = app_services(compose)
    assert services, "docker-compose.yml has no Xietong service"
    images = {spec["image"] for spec in services.values()}
    assert len(images) == 1, f"one image for every service, got {images}"
    for name, spec in services.items():
        build = spec["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        assert spec["command"] == ["python", "-m", f"services.{name}"]


def test_compose_services_reach_kafka_in_the_network_and_wait_for_it() -> None:
    compose = load_compose()
    for name, spec in app_services(compose).items():
        env = env_of(spec)
        assert env["XIETONG_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["XIETONG_HTTP_HOST"] == "0.0.0.0", f"{name} must listen beyond loopback"
        assert spec["depends_on"]["kafka"]["condition"] == "service_healthy", name
        unknown = [key for key in env if key.startswith("XIETONG_") and not known_setting(key)]
        assert not unknown, f"{name}: settings that shared/settings.py does not know: {unknown}"


def test_compose_services_listen_and_are_probed_on_their_port() -> None:
    compose = load_compose()
    for name, spec in app_services(compose).items():
        port = HTTP_PORTS[name]
        assert int(env_of(spec)[f"XIETONG_{name.upper()}_HTTP_PORT"]) == port
        test = spec["healthcheck"]["test"]
        assert test[0] == "CMD"
        assert test[-1] == str(port), f"{name}'s healthcheck probes another port"
        assert "/healthz" in " ".join(test)


def test_the_ingest_gateway_is_published_on_8080_and_its_metrics_port_is_not() -> None:
    ingest = load_compose()["services"]["ingest"]
    published = [str(port).rsplit(":", 2)[-2:] for port in ingest["ports"]]
    assert ["8080", "8080"] in published
    metrics = str(METRICS_PORTS["ingest"])
    assert int(env_of(ingest)["XIETONG_INGEST_METRICS_PORT"]) == int(metrics)
    assert not [pair for pair in published if pair[-1] == metrics]


def test_compose_holds_no_literal_secret() -> None:
    raw = raw_compose()
    blocks = [spec for key, spec in raw.items() if key.startswith("x-") and isinstance(spec, dict)]
    blocks += [spec.get("environment", {}) for spec in raw["services"].values()]
    checked = 0
    for block in blocks:
        for key, value in block.items():
            if isinstance(key, str) and SECRET_NAME.search(key):
                checked += 1
                assert ENV_REFERENCE.fullmatch(str(value)), f"{key} must come from the environment"
    assert checked >= 4  # the S3 pair for the services and for SeaweedFS itself


def test_kafka_is_a_single_kraft_node_with_consistent_listeners() -> None:
    kafka = load_compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners: dict[str, str] = {}
    for item in env["KAFKA_LISTENERS"].split(","):
        match = re.fullmatch(r"([A-Z_]+)://[^:]*:(\d+)", item)
        assert match, f"unreadable listener {item}"
        listeners[match.group(1)] = match.group(2)
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) <= set(protocols)
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in advertised
    assert {item.split("://")[0] for item in advertised} <= set(listeners) - {"CONTROLLER"}
    voter_id, voter_address = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == str(env["KAFKA_NODE_ID"])
    assert voter_address.rsplit(":", 1)[1] == listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert "kafka:9092" in " ".join(kafka["healthcheck"]["test"])


def test_seaweedfs_serves_s3_with_credentials_from_the_environment() -> None:
    seaweed = raw_compose()["services"]["seaweedfs"]
    assert seaweed["image"].startswith("chrislusf/seaweedfs:")
    command = seaweed["command"]
    assert command[0] == "mini" or (command[0] == "server" and "-s3" in command)
    env = env_of(seaweed)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert ENV_REFERENCE.fullmatch(env[key]), key
    assert "/healthz" in " ".join(seaweed["healthcheck"]["test"])


async def _run_healthcheck(script: str, port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


async def test_the_compose_healthcheck_passes_on_a_live_service_and_fails_without_one() -> None:
    test = app_services(load_compose())["ingest"]["healthcheck"]["test"]
    assert test[1:3] == ["python", "-c"]
    script = test[3]

    async def ready() -> str | None:
        return None

    port = free_port()
    runner = await serve_health("probe", "127.0.0.1", port, ready)
    try:
        assert await _run_healthcheck(script, port) == 0
    finally:
        await runner.cleanup()
    assert await _run_healthcheck(script, port) != 0


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def test_the_image_is_python_311_slim_installed_with_the_pins_and_not_root() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "pip install -c constraints.txt" in runs
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert json.loads(cmd)[:2] == ["python", "-m"]


def test_every_file_the_image_copies_exists_and_the_packages_are_in_it() -> None:
    copied: set[str] = set()
    for keyword, args in dockerfile_instructions():
        parts = args.split()
        if keyword != "COPY" or any(part.startswith("--from") for part in parts):
            continue
        sources = [part for part in parts[:-1] if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is missing"
            copied.add(source.rstrip("/"))
    assert {"pyproject.toml", "constraints.txt", "services", "shared", "schemas"} <= copied


# --------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path.name, document))
    return documents


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in k8s_documents()
        if doc.get("kind") == kind and doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1"
    }


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return loaded


def test_every_manifest_parses_and_is_listed_in_the_kustomization() -> None:
    documents = k8s_documents()
    assert documents
    for filename, document in documents:
        assert {"apiVersion", "kind"} <= set(document), filename
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"], filename
            if document["kind"] != "Namespace":
                assert document["metadata"]["namespace"] == "xietong", filename
    listed = set(kustomization()["resources"])
    on_disk = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_no_secret_is_stored_in_the_manifests() -> None:
    for filename, document in k8s_documents():
        assert document["kind"] != "Secret", f"{filename}: reference the Secret, do not ship it"
    config = k8s_objects("ConfigMap")[CONFIG_NAME_REF]["data"]
    assert not [key for key in config if SECRET_NAME.search(key)]
    unknown = [key for key in config if not (key.startswith("XIETONG_") and known_setting(key))]
    assert not unknown, f"ConfigMap keys shared/settings.py does not know: {unknown}"


def test_every_service_package_has_a_deployment_and_nothing_else_does() -> None:
    deployments = k8s_objects("Deployment")
    assert set(deployments) == set(service_packages())


@pytest.mark.parametrize("name", sorted(HTTP_PORTS))
def test_a_deployment_runs_its_module_probes_and_is_scraped_on_its_port(name: str) -> None:
    deployment = k8s_objects("Deployment").get(name)
    if deployment is None:
        pytest.skip(f"services/{name} has no Deployment (checked above against services/)")
    port = HTTP_PORTS[name]
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORTS.get(name, port))
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    assert env[f"XIETONG_{name.upper()}_HTTP_PORT"] == str(port)
    if name in METRICS_PORTS:
        assert ports["metrics"] == METRICS_PORTS[name]
        assert env[f"XIETONG_{name.upper()}_METRICS_PORT"] == str(METRICS_PORTS[name])
    assert not [key for key in env if SECRET_NAME.search(key)], "secrets come from the Secret"
    sources = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert sources == {"configMapRef": CONFIG_NAME_REF, "secretRef": SECRET_NAME_REF}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]

    service = k8s_objects("Service")[name]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {"port": port, "targetPort": "http"}.items() <= service["spec"]["ports"][0].items()
    if name in METRICS_PORTS:  # the Service in front of the partners has no metrics port
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


# --------------------------------------------------------------------------- published schemas
# Checked against the Compose specification and the Kubernetes API schemas when the dev tools
# that carry them offline are installed (check-jsonschema, kubernetes-validate).


def test_compose_follows_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema")
    from importlib.resources import files

    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    # the vendored spec names its draft without the trailing '#' jsonschema looks up: say it
    validator = jsonschema.Draft7Validator(schema)
    for document in (raw_compose(), load_compose()):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors


def test_manifests_follow_the_kubernetes_api() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = "1.29.0"  # the oldest Kubernetes still commonly run; newer ones accept the same
    for filename, document in k8s_documents():
        if document["kind"] == "Kustomization":
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{filename}: {document['kind']} {error.message}")
