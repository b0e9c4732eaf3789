"""Static checks of the deployments beyond one machine (deploy/Dockerfile, docker-compose.yml,
k8s/, grafana/): Kubernetes schemas, least privilege of the sensor, images and files that exist,
options the CLI knows, and dashboard queries over the metrics documented in deploy/METRICS.md.
"""

from __future__ import annotations

import json
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from packetless.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
STRIMZI = K8S / "strimzi-kafka.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
CONFIG_PATH = "/etc/packetless/packetless.toml"
DATA_DIR = "/var/lib/packetless"
# host paths the sensor reads, and the only one it writes (its spool)
SENSOR_HOST_PATHS_RO = {"/sys/fs/cgroup", "/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules",
                        "/usr/src", "/var/run/docker.sock"}
SENSOR_HOST_PATHS_RW = {DATA_DIR}
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PROMETHEUS_LABELS = {"instance", "job", "le"}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p not in (STRIMZI, KUSTOMIZATION))


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in k8s_manifests() for doc in load_yaml_docs(path)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def pom_kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(DEPLOY / "kafka" / "pom.xml").getroot()
    return root.find("m:properties/m:kafka.version", ns).text


def built_image() -> str:
    """The tag deploy/Dockerfile documents building (``# image: NAME:TAG``)."""
    match = re.search(r"^# image: (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match, "deploy/Dockerfile must document its image tag as '# image: NAME:TAG'"
    return match.group(1)


def documented_capabilities() -> set[str]:
    """The capabilities the header comment of sensor.yaml explains, one per line."""
    caps = set()
    for line in (K8S / "sensor.yaml").read_text().splitlines():
        match = re.match(r"#\s{3}([A-Z_]+)\s{2,}\S", line)
        if match:
            caps.add(match.group(1))
    return caps


def command_envvars(command: str) -> set[str]:
    return {p.envvar for p in cli_main.commands[command].params
            if isinstance(p, click.Option) and p.envvar}


def command_options(command: str) -> set[str]:
    return {name[2:] for p in cli_main.commands[command].params if isinstance(p, click.Option)
            for name in p.opts if name.startswith("--")}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def container_images() -> list[str]:
    images = [c["image"] for d in k8s_docs() if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")
              for c in pod_spec(d)["containers"]]
    images += [s["image"] for s in compose()["services"].values()]
    return images


def compose() -> dict[str, Any]:
    with open(DEPLOY / "docker-compose.yml") as fh:
        return yaml.safe_load(fh)


def metrics_table() -> dict[str, tuple[str, set[str]]]:
    """deploy/METRICS.md as {name: (type, labels)}."""
    table = {}
    for line in (DEPLOY / "METRICS.md").read_text().splitlines():
        if line.startswith("| `packetless_"):
            name, mtype, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
            table[name.strip("`")] = (mtype, set(re.findall(r"`(\w+)`", labels)))
    return table


def dashboard() -> dict[str, Any]:
    with open(DEPLOY / "grafana" / "packetless-dashboard.json") as fh:
        return json.load(fh)


def dashboard_queries() -> list[str]:
    dash = dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def base_metric(series: str, table: dict[str, tuple[str, set[str]]]) -> str:
    """The documented name of a series (histograms are queried as _bucket, _sum, _count)."""
    for suffix in ("_bucket", "_sum", "_count"):
        name = series.removesuffix(suffix)
        if name != series and table.get(name, ("",))[0] == "histogram":
            return name
    return series


# Kubernetes


@pytest.mark.parametrize("path", k8s_manifests(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifest_matches_openapi_schema(path: Path, version: str) -> None:
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "packetless"


def test_kustomization_lists_every_manifest_but_the_optional_kafka() -> None:
    (kustomization,) = load_yaml_docs(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_manifests())


def test_strimzi_kafka_is_kraft_with_a_node_pool() -> None:
    docs = {d["kind"]: d for d in load_yaml_docs(STRIMZI)}
    assert set(docs) == {"Kafka", "KafkaNodePool"}
    assert {d["apiVersion"] for d in docs.values()} == {"kafka.strimzi.io/v1"}
    kafka, pool = docs["Kafka"], docs["KafkaNodePool"]
    assert "zookeeper" not in kafka["spec"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert kafka["spec"]["kafka"]["version"] == pom_kafka_version()
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap.{kafka['metadata']['namespace']}.svc:9092"
    assert config_toml()["bootstrap-servers"] == bootstrap
    registry_env = {e["name"]: e.get("value") for e in pod_spec(one("Deployment"))["containers"][0]["env"]}
    assert registry_env["APICURIO_KAFKASQL_BOOTSTRAP_SERVERS"] == bootstrap


def test_sensor_daemonset_has_least_privilege() -> None:
    ds = one("DaemonSet")
    spec = pod_spec(ds)
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not spec.get("securityContext", {}).get("privileged")
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc.get("privileged") is not True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    caps = documented_capabilities()
    assert caps == {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN", "DAC_READ_SEARCH"}
    assert sorted(sc["capabilities"]["add"]) == sorted(caps)
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert container["args"] == ["sensor"]


def test_sensor_host_paths_are_read_only_except_its_spool() -> None:
    spec = pod_spec(one("DaemonSet"))
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_paths.values()) == SENSOR_HOST_PATHS_RO | SENSOR_HOST_PATHS_RW
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    for name, path in host_paths.items():
        writable = not mounts[name].get("readOnly", False)
        assert writable == (path in SENSOR_HOST_PATHS_RW), f"{path} readOnly={not writable}"


def test_stream_workers_are_unprivileged_with_their_own_state_volume() -> None:
    sts = one("StatefulSet")
    spec = pod_spec(sts)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    assert not any("hostPath" in v for v in spec["volumes"])
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config_toml()["data-dir"] == DATA_DIR
    assert sts["spec"]["serviceName"] == one("Service", sts["spec"]["serviceName"])["metadata"]["name"]


@pytest.mark.parametrize("service", ["packetless-streams", "packetless-registry"])
def test_cluster_ip_service_reaches_a_named_container_port(service: str) -> None:
    svc = one("Service", service)
    assert svc["spec"]["type"] == "ClusterIP"
    workloads = [d for d in k8s_docs() if d["kind"] in ("StatefulSet", "Deployment")
                 and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(workloads) == 1
    ports = {p["name"] for c in pod_spec(workloads[0])["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def config_toml() -> dict[str, Any]:
    return tomllib.loads(one("ConfigMap")["data"][Path(CONFIG_PATH).name])


def test_config_map_keys_are_cli_options_and_mounted_where_the_cli_reads() -> None:
    config = config_toml()
    for key, value in config.items():
        if isinstance(value, dict):
            assert set(value) <= command_options(key), f"[{key}] has unknown options"
        else:
            assert key in command_options("sensor") & command_options("streams"), key
    assert CONFIG_PATH in (REPO / "packetless" / "config.py").read_text()
    for kind in ("DaemonSet", "StatefulSet"):
        spec = pod_spec(one(kind))
        config_volumes = {v["name"] for v in spec["volumes"] if "configMap" in v}
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in config_volumes]
        assert [m["mountPath"] for m in mounts] == [str(Path(CONFIG_PATH).parent)]


@pytest.mark.parametrize("kind,command", [("DaemonSet", "sensor"), ("StatefulSet", "streams")])
def test_k8s_environment_names_cli_options(kind: str, command: str) -> None:
    env = {e["name"] for e in pod_spec(one(kind))["containers"][0].get("env", [])}
    assert env and env <= command_envvars(command)


# Images and the Dockerfile


def test_dockerfile_builds_the_package_for_both_roles() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert built_image() == f"packetless:{pyproject()['project']['version']}"
    assert re.search(r'^ENTRYPOINT \["packetless"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("0", "root")
    sources: set[str] = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources.update(line.split()[:-1])
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repo"
    folders = {package.split(".")[0] for package in pyproject()["tool"]["setuptools"]["packages"]}
    needed = folders | {"pyproject.toml", pyproject()["project"]["readme"]}
    assert needed <= sources
    assert "python3-bpfcc" in text


def test_every_image_is_built_here_or_pinned_upstream() -> None:
    ours = built_image()
    for image in container_images():
        if image == ours:
            continue
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d+(\.\d+)+", tag), f"{image}: not pinned to a release"
        if name == "apache/kafka":
            assert tag == pom_kafka_version()
        else:
            assert name == "apicurio/apicurio-registry" and tag.startswith("3."), image


# Docker Compose


def test_compose_services_build_from_the_dockerfile_and_reference_existing_files() -> None:
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        if "build" in svc:
            assert svc["image"] == built_image()
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if ":" not in volume or source.startswith("/"):
                continue  # anonymous volume or host path
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
            else:
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"


def test_compose_sensor_has_the_capabilities_not_privileged() -> None:
    sensor = compose()["services"]["sensor"]
    assert sensor["command"] == ["sensor"]
    assert not sensor.get("privileged")
    assert sensor["pid"] == "host" and sensor["network_mode"] == "host"
    assert sensor["cap_drop"] == ["ALL"]
    assert sorted(sensor["cap_add"]) == sorted(documented_capabilities())
    mounts = {}
    for volume in sensor["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[source] = (target, mode)
    for path in SENSOR_HOST_PATHS_RO:
        assert mounts[path] == (path, ["ro"]), path
    assert [t for t, mode in mounts.values() if mode != ["ro"]] == [DATA_DIR]


def test_compose_workers_scale_and_keep_state() -> None:
    streams = compose()["services"]["streams"]
    assert streams["command"] == ["streams"]
    assert streams["deploy"]["replicas"] >= 2
    assert DATA_DIR in streams["volumes"]
    assert "cap_add" not in streams and "user" not in streams


@pytest.mark.parametrize("service", ["sensor", "streams"])
def test_compose_environment_names_cli_options(service: str) -> None:
    env = set(compose()["services"][service]["environment"])
    assert env and env <= command_envvars(service)


# Grafana


def test_dashboard_queries_only_documented_metrics_and_labels() -> None:
    table = metrics_table()
    assert len(table) == 11
    used: set[str] = set()
    for expr in dashboard_queries():
        for series, selector in re.findall(r"\b(packetless_\w+)(\{[^}]*\})?", expr):
            name = base_metric(series, table)
            assert name in table, f"{series} in {expr!r} is not in deploy/METRICS.md"
            used.add(name)
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert labels <= table[name][1] | PROMETHEUS_LABELS, f"{expr!r}: {labels}"
    assert used == set(table), f"documented but not on the dashboard: {set(table) - used}"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
            for target in panel["targets"]:
                assert set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"} <= variables
