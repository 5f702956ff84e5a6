"""The Kubernetes manifests and the compose file say one coherent thing: which pods each
selector reaches, when Redis is required, the stop budget, probes that ask for health,
each secret only where it is used, memory for buffered results, egress rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

KUBE = ROOT / "deploy/kubernetes"
GRACE_DEFAULT = 25  # MTP_GRACE_SECONDS' default (framework/settings.py)
# Two deployments of the same tenant: one replica with embedded state, or scale-out on
# Redis. Each is applied alone, with the files both share.
SHARED = ["configmap.yaml", "service.yaml", "networkpolicy.yaml"]
SETS = {
    "single": [*SHARED, "deployment.yaml", "pvc.yaml"],
    "scale-out": [*SHARED, "scale-out/deployment.yaml", "scale-out/hpa.yaml",
                  "scale-out/pdb.yaml", "scale-out/worker.yaml", "scale-out/networkpolicy.yaml"],
}
# The secrets each container may receive; nothing else.
SECRETS = {
    "sidecar": {"MTP_SIDECAR_SECRET", "MTP_JWT_SECRET", "MTP_LDAP_PASSWORD", "MTP_REDIS_URL"},
    "framework": {"MTP_SIDECAR_SECRET", "MTP_BILLING_SECRET", "MTP_REDIS_URL"},
    "worker": {"MTP_BILLING_SECRET", "MTP_REDIS_URL"},
}
SIDECAR_ONLY = {"MTP_JWT_SECRET", "MTP_LDAP_PASSWORD"}


def load(names: list[str]) -> list[dict[str, Any]]:
    return [doc for name in names for doc in yaml.safe_load_all((KUBE / name).read_text())
            if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secrets_of(container: dict[str, Any]) -> set[str]:
    return {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text).groups()  # type: ignore[union-attr]
    return int(number) << {"Ki": 10, "Mi": 20, "Gi": 30, None: 0}[unit]


def sleep_seconds(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"  # an exec sleep: no preStop.sleep, which needs 1.30
    return int(command[1])


def all_deployments() -> list[dict[str, Any]]:
    return [d for names in SETS.values() for d in of_kind(load(names), "Deployment")]


@pytest.mark.parametrize("name", SETS)
def test_selectors_reach_only_their_pods(name):
    docs = load(SETS[name])
    serving = {"app.kubernetes.io/component": "tenant-runtime"}
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs,
                                                                             "Deployment")]
    assert any(t.get("app.kubernetes.io/component") == "job-worker" for t in templates) == (
        name == "scale-out")
    selectors = [d["spec"]["selector"] for d in of_kind(docs, "Service")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in
                  of_kind(docs, "PodDisruptionBudget")]
    for selector in selectors:  # Service and PDB: the serving pods, never a job worker
        reached = [t for t in templates if matches(selector, t)]
        assert reached and all(matches(serving, t) for t in reached), selector
    for deployment in of_kind(docs, "Deployment"):  # and the HPA's target counts its own
        own = deployment["spec"]["template"]["metadata"]["labels"]
        reached = [t for t in templates if matches(deployment["spec"]["selector"]["matchLabels"],
                                                   t)]
        assert reached == [own], deployment["metadata"]["name"]


def test_more_than_one_replica_only_with_redis():
    single = load(SETS["single"])
    (deployment,) = of_kind(single, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod owns the PVC
    assert not of_kind(single, "HorizontalPodAutoscaler")
    assert not of_kind(single, "PodDisruptionBudget")  # minAvailable 1 of 1 blocks drains
    scale = load(SETS["scale-out"])
    targets = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
               for h in of_kind(scale, "HorizontalPodAutoscaler")}
    for deployment in of_kind(scale, "Deployment"):
        pods = max(deployment["spec"]["replicas"],
                   targets.get(deployment["metadata"]["name"], 0))
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            redis = env_of(container)["MTP_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert not redis.get("optional", False), container["name"]  # required
        if deployment["metadata"]["name"] == "mtp-demo":
            assert pods >= 2


@pytest.mark.parametrize("deployment", all_deployments(), ids=lambda d: d["metadata"]["name"])
def test_one_stop_budget_nested_inside_the_grace_period(deployment):
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    graces = {int(env_of(c)["MTP_GRACE_SECONDS"]["value"]) for c in containers.values()}
    assert graces == {GRACE_DEFAULT}
    waits = {name: sleep_seconds(c) if "lifecycle" in c else 0 for name, c in containers.items()}
    # Every container's drain ends inside the pod's grace period.
    assert pod["terminationGracePeriodSeconds"] > max(waits.values()) + GRACE_DEFAULT
    if "sidecar" in containers:  # the sidecar stops accepting first; the framework outlives it
        assert 0 < waits["sidecar"] < waits["framework"]


@pytest.mark.parametrize("deployment", all_deployments(), ids=lambda d: d["metadata"]["name"])
def test_every_probe_asks_for_health_with_mtp_probe(deployment):
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        probes = {k: v for k, v in container.items() if k.endswith("Probe")}
        assert {"startupProbe", "livenessProbe"} <= set(probes), container["name"]
        for probe in probes.values():
            assert probe["exec"]["command"][:3] == ["mtp", "probe", container["name"]]
            # The probe's own timeout ends before the kubelet gives up on it.
            command = probe["exec"]["command"]
            assert float(command[command.index("--timeout") + 1]) < probe["timeoutSeconds"]


@pytest.mark.parametrize("deployment", all_deployments(), ids=lambda d: d["metadata"]["name"])
def test_each_secret_only_in_the_container_that_uses_it(deployment):
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert "envFrom" not in container  # a whole Secret would bring every key
        got = secrets_of(container)
        assert got <= SECRETS[container["name"]], (container["name"], got)
        if container["name"] != "sidecar":
            assert not got & SIDECAR_ONLY
        if container["name"] in ("sidecar", "framework"):
            assert "MTP_SIDECAR_SECRET" in got


@pytest.mark.parametrize("deployment", [d for d in all_deployments()
                                        if d["metadata"]["name"] == "mtp-demo"])
def test_sidecar_memory_holds_buffered_results(deployment):
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "sidecar")
    max_result = int(env_of(sidecar)["MTP_MAX_RESULT"]["value"])
    limit = quantity(sidecar["resources"]["limits"]["memory"])
    # Its own ~128 Mi plus the 25 slow readers that measured 350 MiB, each holding a
    # result of MTP_MAX_RESULT (operator guide, "Memory").
    assert limit >= (128 << 20) + 25 * max_result
    framework = next(c for c in pod["containers"] if c["name"] == "framework")
    assert env_of(framework)["MTP_MAX_RESULT"]["value"] == str(max_result)


@pytest.mark.parametrize("deployment", [d for d in all_deployments()
                                        if d["metadata"]["name"] == "mtp-demo"])
def test_metrics_files_live_in_memory_not_on_the_data_disk(deployment):
    pod = deployment["spec"]["template"]["spec"]
    framework = next(c for c in pod["containers"] if c["name"] == "framework")
    path = env_of(framework)["MTP_METRICS_DIR"]["value"]
    (mount,) = [m for m in framework["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", SETS)
def test_every_pod_has_an_egress_policy(name):
    docs = load(SETS[name])
    policies = [p for p in of_kind(docs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if matches(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert mine, deployment["metadata"]["name"]
        ports = {port["port"] for p in mine for rule in p["spec"]["egress"]
                 for port in rule.get("ports", [])}
        assert 53 in ports  # DNS
        if name == "scale-out":
            assert 6379 in ports  # Redis


def test_compose_stop_budget_and_secrets():
    compose = yaml.safe_load((ROOT / "docker/docker-compose.yml").read_text())
    tenant = compose["services"]["tenant"]
    grace = int(str(tenant["environment"]["MTP_GRACE_SECONDS"]).split(":-")[-1].rstrip("}"))
    assert grace == GRACE_DEFAULT
    assert int(tenant["stop_grace_period"].rstrip("s")) > grace  # SIGKILL only after the drain
    assert "MTP_JWT_SECRET" not in tenant["environment"]  # a compose secret, not env
    assert "jwt_secret" in tenant["secrets"]
    for name, service in compose["services"].items():
        if name != "tenant":
            assert not service.get("secrets"), name
            assert not any(k.startswith("MTP_") for k in service.get("environment", {})), name


def test_docs_name_the_minimum_kubernetes_version():
    guide = (ROOT / "docs/operator-guide.md").read_text()
    assert "Kubernetes ≥ 1.25" in guide
    text = Path(KUBE / "deployment.yaml").read_text()
    assert "preStop.sleep" not in text and "sleep:" not in text


# The pool (docs/pools.md): applied with its own files only.
POOL = ["pool/deployment.yaml", "pool/pvc.yaml", "pool/service.yaml",
        "pool/networkpolicy.yaml", "pool/httproute.yaml"]


def test_pool_service_is_what_the_routing_table_names():
    """The HTTPRoutes (example and both renderers) reach the pool pod's port."""
    from framework.control.backends import PORT, backend_name
    from framework.pool.gateway import render_gateway_api

    docs = load(POOL)
    (deployment,) = of_kind(docs, "Deployment")
    (service,) = of_kind(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(service["spec"]["selector"], labels)
    tenant = load(["deployment.yaml"])[0]["spec"]["template"]["metadata"]["labels"]
    assert not matches(service["spec"]["selector"], tenant)
    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    name = container["args"][container["args"].index("--name") + 1]
    # mtp control's table: mtp-pool-<name> on PORT.
    assert (service["metadata"]["name"], port["port"]) == (backend_name(f"pool:{name}", ""), PORT)
    routes = of_kind(docs, "HTTPRoute")
    assert {(b["name"], b["port"]) for r in routes for rule in r["spec"]["rules"]
            for b in rule["backendRefs"]} == {(service["metadata"]["name"], port["port"])}
    domain = env_of(container)["MTP_POOL_DOMAIN"]["value"]
    tenants = sorted({r["metadata"]["labels"]["mtp.dev/tenant"] for r in routes})
    assert routes == list(yaml.safe_load_all(render_gateway_api(
        dict.fromkeys(tenants, name), {name: (service["metadata"]["name"], port["port"])},
        domain=domain)))


def test_tenant_service_is_what_the_routing_table_names():
    """A dedicated tenant's Service: mtp-<tenant> on the port mtp control routes to."""
    from framework.control.backends import PORT, backend_name

    (service,) = of_kind(load(["service.yaml"]), "Service")
    tenant = service["metadata"]["labels"]["app.kubernetes.io/instance"]
    (port,) = service["spec"]["ports"]
    assert (service["metadata"]["name"], port["port"]) == (
        backend_name("dedicated", tenant), PORT)


def test_pool_stop_budget_probes_and_memory_volumes():
    (deployment,) = of_kind(load(POOL), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert int(env["MTP_GRACE_SECONDS"]["value"]) == GRACE_DEFAULT
    assert pod["terminationGracePeriodSeconds"] > sleep_seconds(container) + GRACE_DEFAULT
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["mtp", "probe", "sidecar"]  # the pool's sidecar
        assert float(command[command.index("--timeout") + 1]) < container[probe][
            "timeoutSeconds"]
    assert "/readyz" in container["readinessProbe"]["exec"]["command"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for var in ("MTP_POOL_RUN_DIR", "MTP_METRICS_DIR"):  # sockets and metrics: RAM
        assert volumes[mounts[env[var]["value"]]]["emptyDir"]["medium"] == "Memory"
    bundles = volumes[mounts[container["args"][container["args"].index("--bundles") + 1]]]
    assert bundles["persistentVolumeClaim"]["readOnly"] is True


def test_pool_pod_has_an_egress_policy():
    docs = load(POOL)
    (deployment,) = of_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    mine = [p for p in of_kind(docs, "NetworkPolicy")
            if matches(p["spec"]["podSelector"]["matchLabels"], labels)]
    assert mine and all("Egress" in p["spec"]["policyTypes"] for p in mine)
    ports = {port["port"] for p in mine for rule in p["spec"]["egress"]
             for port in rule.get("ports", [])}
    assert {53, 6379} <= ports
    ingress = {port["port"] for p in mine for rule in p["spec"]["ingress"]
               for port in rule.get("ports", [])}
    assert ingress == {8080}
