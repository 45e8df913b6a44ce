"""The deployment recipes in ``examples/kubernetes`` and ``examples/systemd``
hang together: names, ports, the hub's address, the key and the model class
agree across files. Pure parsing: no cluster, no systemd, no network."""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
K8S = EXAMPLES / "kubernetes"
SYSTEMD = EXAMPLES / "systemd"

K8S_FILES = {"secret.yaml", "hub.yaml", "worker.yaml", "web.yaml", "worker-hpa.yaml"}
UNITS = {"hub": "gibbs-hub.service", "worker": "gibbs-worker@.service", "web": "gibbs-web.service"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ANY_ADDRESS = {"0.0.0.0", "::", ""}
# `python -m gibbs worker` waits up to 60 s for its processes to finish the
# request in hand on SIGTERM; the supervisor must wait at least that long.
WORKER_STOP_SECONDS = 60


# ------------------------------------------------------------------ helpers


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    assert sep and port.isdigit(), f"{address!r} is not HOST:PORT"
    return host.strip("[]"), int(port)


def option(argv: list[str], name: str) -> Optional[str]:
    """The value of ``name VALUE`` or ``name=VALUE`` in argv, else None."""
    for i, item in enumerate(argv):
        if item == name and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(name + "="):
            return item[len(name) + 1 :]
    return None


def gibbs_command(argv: list[str]) -> Optional[list[str]]:
    """``[subcommand, ...]`` of a ``python -m gibbs ...`` argv, else None."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "gibbs":
            return argv[i + 2 :]
    return None


def worker_target(argv: list[str]) -> str:
    sub = gibbs_command(argv)
    assert sub and sub[0] == "worker", argv
    positionals = [a for a in sub[1:] if ":" in a and not a.startswith("-")]
    assert positionals, f"no MODULE:Class in {argv}"
    return positionals[0]


def load_example(module_name: str) -> ModuleType:
    path = EXAMPLES / f"{module_name}.py"
    assert path.is_file(), f"{path} does not exist"
    spec = importlib.util.spec_from_file_location(f"_deploy_recipe_{module_name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_target_exists(target: str) -> None:
    module_name, sep, attr = target.partition(":")
    assert sep and module_name and attr, target
    module = load_example(module_name)
    obj: Any = module
    for part in attr.split("."):
        assert hasattr(obj, part), f"examples/{module_name}.py has no {attr!r}"
        obj = getattr(obj, part)
    assert callable(obj), target


def seconds(value: str) -> float:
    """A systemd time span: ``90``, ``90s``, ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, value
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def k8s() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every document of every YAML file."""
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path.name, doc))
    return docs


def of_kind(docs: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in docs if doc.get("kind") == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def argv_of(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def all_containers(docs: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, dep in of_kind(docs, "Deployment").items():
        for c in containers(dep):
            yield name, c


def the_container(docs: list[tuple[str, dict[str, Any]]], subcommand: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, container) of the one container running ``python -m gibbs SUBCOMMAND``."""
    found = [
        (dep, c)
        for dep in of_kind(docs, "Deployment").values()
        for c in containers(dep)
        if (gibbs_command(argv_of(c)) or [None])[0] == subcommand
    ]
    assert len(found) == 1, f"{len(found)} containers run 'python -m gibbs {subcommand}'"
    return found[0]


def web_container(docs: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    found = [
        (dep, c) for dep in of_kind(docs, "Deployment").values() for c in containers(dep) if "gunicorn" in argv_of(c)
    ]
    assert len(found) == 1, f"{len(found)} containers run gunicorn"
    return found[0]


def env_of(container: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    for e in container.get("env", []):
        if e["name"] == name:
            return e
    return None


def resolve_port(container: dict[str, Any], port: Any) -> int:
    """A named or numbered port of a container, as the number it listens on."""
    ports = container.get("ports", [])
    if isinstance(port, str) and not port.isdigit():
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"container {container['name']!r} has no port named {port!r}"
        return int(named[0])
    assert int(port) in [p["containerPort"] for p in ports], f"container {container['name']!r} declares no port {port}"
    return int(port)


def services_selecting(docs: list[tuple[str, dict[str, Any]]], deployment: dict[str, Any]) -> list[dict[str, Any]]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return [
        svc
        for svc in of_kind(docs, "Service").values()
        if svc["spec"].get("selector") and svc["spec"]["selector"].items() <= labels.items()
    ]


def test_every_recipe_file_is_there() -> None:
    assert K8S_FILES <= {p.name for p in K8S.glob("*.yaml")}
    assert (K8S / "README.md").is_file()
    assert set(UNITS.values()) | {"env.example"} <= {p.name for p in SYSTEMD.iterdir()}


def test_every_resource_has_kind_and_name(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    assert k8s
    seen = set()
    for file, doc in k8s:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], file
        assert isinstance(doc.get("kind"), str) and doc["kind"], file
        name = (doc.get("metadata") or {}).get("name")
        assert isinstance(name, str) and name, f"a {doc['kind']} in {file} has no metadata.name"
        assert (doc["kind"], name) not in seen, f"{doc['kind']} {name} defined twice"
        seen.add((doc["kind"], name))


def test_multi_document_only_for_a_deployment_and_its_service(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    by_file: dict[str, list[dict[str, Any]]] = {}
    for file, doc in k8s:
        by_file.setdefault(file, []).append(doc)
    for file, docs in by_file.items():
        if len(docs) > 1:
            assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"], file
            assert len({d["metadata"]["name"] for d in docs}) == 1, f"{file}: the Service is not the Deployment's"


def test_deployments_select_their_own_pods(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    deployments = of_kind(k8s, "Deployment")
    assert {"gibbs-hub", "gibbs-worker", "gibbs-web"} <= set(deployments)
    for name, dep in deployments.items():
        match = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert match and match.items() <= labels.items(), f"{name}: selector does not match its pod labels"


def test_each_service_selects_exactly_its_deployment(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    services = of_kind(k8s, "Service")
    deployments = of_kind(k8s, "Deployment")
    assert {"gibbs-hub", "gibbs-web"} <= set(services)
    for name, svc in services.items():
        selector = svc["spec"].get("selector")
        assert selector, f"Service {name} has no selector"
        selected = [
            d for d, dep in deployments.items() if selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected == [name], f"Service {name} selects the pods of {selected}"


def test_hub_service_port_is_the_bind_port_and_container_port(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    hub_dep, hub = the_container(k8s, "hub")
    assert hub_dep["metadata"]["name"] == "gibbs-hub"
    assert hub_dep["spec"]["replicas"] == 1
    bind = option(argv_of(hub), "--bind")
    assert bind is not None, "the hub has no --bind"
    host, bind_port = split_address(bind)
    assert host in ANY_ADDRESS, f"the hub binds {host}: pods elsewhere cannot reach it"
    [svc] = services_selecting(k8s, hub_dep)
    assert svc["metadata"]["name"] == "gibbs-hub"
    [port] = svc["spec"]["ports"]
    assert port["port"] == bind_port
    assert resolve_port(hub, port.get("targetPort", port["port"])) == bind_port
    probe = hub["readinessProbe"]["tcpSocket"]["port"]
    assert resolve_port(hub, probe) == bind_port


def hub_service_address(k8s: list[tuple[str, dict[str, Any]]]) -> tuple[str, set[int]]:
    svc = of_kind(k8s, "Service")["gibbs-hub"]
    return svc["metadata"]["name"], {p["port"] for p in svc["spec"]["ports"]}


def names_service(host: str, service: str) -> bool:
    return host == service or host.startswith(service + ".")


def test_worker_hub_names_the_hub_service(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    _, worker = the_container(k8s, "worker")
    address = option(argv_of(worker), "--hub")
    assert address is not None, "the worker has no --hub"
    host, port = split_address(address)
    service, ports = hub_service_address(k8s)
    assert names_service(host, service), f"--hub {address} is not the Service {service}"
    assert port in ports


def test_web_gibbs_hub_names_the_hub_service(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    _, web = web_container(k8s)
    env = env_of(web, "GIBBS_HUB")
    assert env is not None and "value" in env, "the web container has no GIBBS_HUB"
    host, port = split_address(env["value"])
    service, ports = hub_service_address(k8s)
    assert names_service(host, service), f"GIBBS_HUB={env['value']} is not the Service {service}"
    assert port in ports


def test_web_service_reaches_gunicorn(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    web_dep, web = web_container(k8s)
    [svc] = services_selecting(k8s, web_dep)
    assert svc["metadata"]["name"] == "gibbs-web"
    [port] = svc["spec"]["ports"]
    assert port["port"] == 80
    bind = option(argv_of(web), "-b") or option(argv_of(web), "--bind")
    assert bind is not None, "gunicorn has no -b"
    _, bind_port = split_address(bind)
    assert resolve_port(web, port["targetPort"]) == bind_port == 8000


def test_every_authkey_comes_from_the_secret(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    secrets = of_kind(k8s, "Secret")
    assert "gibbs-authkey" in secrets
    checked = set()
    for deployment, c in all_containers(k8s):
        env = env_of(c, "GIBBS_AUTHKEY")
        assert env is not None, f"{deployment}/{c['name']} has no GIBBS_AUTHKEY"
        assert "value" not in env, f"{deployment}/{c['name']}: a key written in the manifest"
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, f"{deployment}: no Secret {ref['name']!r}"
        secret = secrets[ref["name"]]
        keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        assert ref["key"] in keys, f"{deployment}: Secret {ref['name']} has no key {ref['key']!r}"
        checked.add(deployment)
    assert {"gibbs-hub", "gibbs-worker", "gibbs-web"} <= checked


def test_worker_requests_a_gpu(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    dep, worker = the_container(k8s, "worker")
    assert dep["metadata"]["name"] == "gibbs-worker"
    resources = worker.get("resources", {})
    gpus = (resources.get("limits") or {}).get("nvidia.com/gpu") or (resources.get("requests") or {}).get(
        "nvidia.com/gpu"
    )
    assert gpus is not None and int(gpus) >= 1
    assert dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= WORKER_STOP_SECONDS


def test_worker_model_class_exists(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    _, worker = the_container(k8s, "worker")
    assert_target_exists(worker_target(argv_of(worker)))


def test_web_app_exists(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    _, web = web_container(k8s)
    assert_target_exists(argv_of(web)[-1])


# ------------------------------------------------------------------ systemd


def read_unit(role: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    path = SYSTEMD / UNITS[role]
    with open(path) as f:
        unit.read_file(f, source=str(path))
    return unit


def exec_start(role: str) -> list[str]:
    return shlex.split(read_unit(role)["Service"]["ExecStart"])


def read_env_example() -> dict[str, str]:
    env = {}
    for line in (SYSTEMD / "env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            env[key.strip()] = value.strip().strip("'\"")
    return env


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_is_complete(role: str) -> None:
    unit = read_unit(role)
    for section in ("Unit", "Service", "Install"):
        assert unit.has_section(section), f"{UNITS[role]} has no [{section}]"
    service = unit["Service"]
    assert service.get("Type") == "simple"
    assert service.get("User") not in (None, "", "root"), "run as a dedicated user"
    assert service.get("EnvironmentFile", "").lstrip("-") == "/etc/gibbs/env"
    assert service.get("Restart") == "on-failure"
    assert service.get("KillSignal") == "SIGTERM"
    assert service.get("WorkingDirectory"), "no WorkingDirectory"
    assert seconds(service.get("TimeoutStopSec", "0")) > 0
    assert unit["Install"].get("WantedBy")
    argv = shlex.split(service["ExecStart"])
    if role == "web":
        assert "gunicorn" in argv and "fastapi_app:app" in argv
    else:
        assert (gibbs_command(argv) or [None])[0] == role, f"ExecStart does not run 'python -m gibbs {role}'"


def test_worker_unit_waits_for_the_request_in_hand() -> None:
    service = read_unit("worker")["Service"]
    assert seconds(service["TimeoutStopSec"]) > WORKER_STOP_SECONDS


def test_worker_unit_hub_is_the_hub_unit_bind() -> None:
    bind = option(exec_start("hub"), "--bind")
    hub = option(exec_start("worker"), "--hub")
    assert bind is not None and hub is not None
    bind_host, bind_port = split_address(bind)
    hub_host, hub_port = split_address(hub)
    assert hub_port == bind_port, f"worker --hub {hub} but hub --bind {bind}"
    if bind_host not in ANY_ADDRESS:
        assert hub_host == bind_host or {hub_host, bind_host} <= LOOPBACK, f"worker --hub {hub} but hub --bind {bind}"


def test_env_example_names_the_hub_unit_bind() -> None:
    env = read_env_example()
    assert env.get("GIBBS_AUTHKEY"), "env.example sets no GIBBS_AUTHKEY"
    bind = option(exec_start("hub"), "--bind")
    assert bind is not None and "GIBBS_HUB" in env
    bind_host, bind_port = split_address(bind)
    host, port = split_address(env["GIBBS_HUB"])
    assert port == bind_port
    if bind_host not in ANY_ADDRESS:
        assert host == bind_host or {host, bind_host} <= LOOPBACK


def test_worker_unit_model_class_exists() -> None:
    assert_target_exists(worker_target(exec_start("worker")))


def test_worker_unit_reloads_with_sighup() -> None:
    service = read_unit("worker")["Service"]
    assert service["ExecReload"].split()[-2:] == ["-HUP", "$MAINPID"]


def test_worker_hpa_scales_the_worker_deployment_on_an_exposed_metric(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    from gibbs import Hub

    (hpa,) = [doc for _, doc in k8s if doc["kind"] == "HorizontalPodAutoscaler"]
    deployments = of_kind(k8s, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gibbs-worker"
    names = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    hub = Hub(port=0)
    try:
        hub.start()
        exposed = hub.prometheus()
    finally:
        hub.close()
    for name in names:
        assert f"# TYPE {name} " in exposed, f"{name} is not a metric the hub exposes"


def test_worker_pods_drain_in_pre_stop(k8s: list[tuple[str, dict[str, Any]]]) -> None:
    (worker,) = [doc for _, doc in k8s if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "gibbs-worker"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
