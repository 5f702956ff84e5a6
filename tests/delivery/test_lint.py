"""Delivery files pass their linters: hadolint, the GitHub workflow and compose schemas,
zizmor, yamllint and kubernetes-validate. With CI=true a missing linter is a failure."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, require_binary

WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml")) + sorted(
    (ROOT / "tenant_template/.github/workflows").glob("*.yml"))
MANIFESTS = sorted((ROOT / "deploy/kubernetes").rglob("*.yaml"))
# The oldest Kubernetes the manifests are written for (docs/operator-guide.md): preStop
# hooks are exec sleeps, not the sleep action of 1.30.
MIN_KUBERNETES = "1.25.0"
DOCKERFILE = ROOT / "docker/Dockerfile"
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def linter(name: str) -> str:
    """The linter installed next to this interpreter (the venv), else on PATH."""
    return require_binary(name, hint="pip install -e '.[dev]'")


def run(args: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_there_is_something_to_lint():
    assert len(WORKFLOWS) >= 3
    names = {str(p.relative_to(ROOT / "deploy/kubernetes")) for p in MANIFESTS}
    assert names >= {"deployment.yaml", "pvc.yaml", "service.yaml", "networkpolicy.yaml",
                     "configmap.yaml", "secret.example.yaml", "scale-out/deployment.yaml",
                     "scale-out/hpa.yaml", "scale-out/pdb.yaml", "scale-out/worker.yaml",
                     "scale-out/networkpolicy.yaml", "pool/deployment.yaml", "pool/pvc.yaml",
                     "pool/service.yaml", "pool/networkpolicy.yaml", "pool/httproute.yaml"}


def test_hadolint_clean_at_warning_level():
    assert_clean(run([linter("hadolint"), "--failure-threshold", "warning", DOCKERFILE]))


def test_workflows_match_the_github_schema():
    assert_clean(run([linter("check-jsonschema"), "--builtin-schema",
                      "vendor.github-workflows", *WORKFLOWS]))


def test_compose_file_matches_the_compose_spec():
    assert_clean(run([linter("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                      "docker/docker-compose.yml"]))


@pytest.mark.parametrize("target", [".github/workflows", "tenant_template"])
def test_zizmor_offline_has_no_findings(target):
    proc = run([linter("zizmor"), "--offline", "--format", "json", target])
    assert_clean(proc)
    assert json.loads(proc.stdout) == []


def test_yamllint_strict():
    assert_clean(run([linter("yamllint"), "--strict", ".github", "tenant_template/.github",
                      "docker", "deploy", ".yamllint"]))


@pytest.mark.parametrize("version", [None, MIN_KUBERNETES])
def test_kubernetes_manifests_validate_strictly(version):
    pin = ["--kubernetes-version", version] if version else []
    proc = run([linter("kubernetes-validate"), *pin, "--strict", "--quiet", *MANIFESTS])
    assert_clean(proc)
    # A kind without a bundled schema only warns: the Gateway API's HTTPRoute (a CRD,
    # checked by test_httproutes_match_the_gateway_api_schema) and nothing else.
    warned = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert all("kind HTTPRoute with api version gateway.networking.k8s.io/v1" in line
               for line in warned), warned


# The Gateway API v1 HTTPRoute (standard channel), strictly, for the fields this project
# writes; the patterns and bounds are the CRD's. kubernetes-validate bundles no CRD schema.
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_DNS_NAME = {**_NAME, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_HOSTNAME = {"type": "string", "minLength": 1, "maxLength": 253,
             "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_MATCH = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "path": {"type": "object", "additionalProperties": False, "required": ["type", "value"],
             "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                            "value": {"type": "string", "maxLength": 1024, "pattern": "^/",
                                      "not": {"pattern": "//|/\\./|/\\.\\./|%2f|%2F|#"}}}},
    "headers": {"type": "array", "maxItems": 16, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "value"],
        "properties": {"type": {"enum": ["Exact", "RegularExpression"]},
                       "name": {"type": "string", "minLength": 1, "maxLength": 256,
                                "pattern": r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$"},
                       "value": {"type": "string", "minLength": 1, "maxLength": 4096}}}}}}
HTTPROUTE_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": _DNS_NAME,
                                    "namespace": _NAME,
                                    "labels": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False,
                 "required": ["parentRefs", "rules"], "properties": {
                     "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                         "type": "object", "additionalProperties": False, "required": ["name"],
                         "properties": {"name": _NAME, "namespace": _NAME,
                                        "sectionName": _NAME}}},
                     "hostnames": {"type": "array", "maxItems": 16, "items": _HOSTNAME},
                     "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                         "type": "object", "additionalProperties": False,
                         "required": ["backendRefs"], "properties": {
                             "matches": {"type": "array", "maxItems": 64, "items": _MATCH},
                             "backendRefs": {"type": "array", "minItems": 1, "maxItems": 16,
                                             "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["name", "port"],  # port: required for a Service
                                 "properties": {"name": _NAME,
                                                "port": {"type": "integer", "minimum": 1,
                                                         "maximum": 65535}}}}}}}}},
    },
}
HTTPROUTES = [p for p in MANIFESTS if any(
    d and d.get("kind") == "HTTPRoute" for d in yaml.safe_load_all(p.read_text()))]


def assert_httproutes(docs: list[dict]) -> None:
    import jsonschema

    assert docs
    for doc in docs:
        jsonschema.Draft202012Validator(HTTPROUTE_SCHEMA).validate(doc)


def test_the_httproute_schema_refuses_what_the_crd_refuses():
    import jsonschema

    good = yaml.safe_load_all((ROOT / "deploy/kubernetes/pool/httproute.yaml").read_text())
    route = next(d for d in good if d["spec"].get("rules", [{}])[0].get("matches"))
    bad = [("spec", "hostnames", ["Acme.example.com"]),
           ("spec", "rules", [{"matches": [{"path": {"type": "PathPrefix", "value": "x"}}],
                               "backendRefs": [{"name": "s", "port": 8080}]}]),
           ("spec", "rules", [{"backendRefs": [{"name": "s"}]}]),
           ("spec", "rules", [{"backendRefs": [{"name": "s", "port": 8080}], "extra": 1}])]
    for top, key, value in bad:
        doc = json.loads(json.dumps(route))
        doc[top][key] = value
        with pytest.raises(jsonschema.ValidationError):
            assert_httproutes([doc])


def test_httproutes_match_the_gateway_api_schema():
    """The example in deploy/ and both renderers of the routing table."""
    from framework.control.gateway import gateway_api
    from framework.control.store import TenantRecord
    from framework.pool.gateway import render_gateway_api

    assert [p.relative_to(ROOT / "deploy/kubernetes").as_posix() for p in HTTPROUTES] == [
        "pool/httproute.yaml"]
    for path in HTTPROUTES:
        assert_httproutes([d for d in yaml.safe_load_all(path.read_text()) if d])
    rendered = render_gateway_api({"acme": "alpha", "globex": "beta"},
                                  {"alpha": ("mtp-pool-alpha", 8080),
                                   "beta": ("mtp-pool-beta", 8080)},
                                  domain="tenants.example.com", namespace="mtp")
    assert_httproutes(list(yaml.safe_load_all(rendered)))
    records = [TenantRecord(id=tid, name=tid, plan="free", status="active", placement=where,
                            created="", updated="")
               for tid, where in (("acme", "pool:alpha"), ("dedi", "dedicated"))]
    assert_httproutes(list(yaml.safe_load_all(gateway_api(records, "tenants.example.com"))))


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    first_from = text.index("\nFROM ")
    assert "ARG BASE_IMAGE=python:3.11-slim" in text[:first_from]
    assert text.count("FROM ${BASE_IMAGE}") == 2  # both stages: the venv moves unchanged
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user and user.group(1).split(":")[0] not in ("root", "0")
    for line in ("STOPSIGNAL SIGTERM", "EXPOSE 8080", 'ENTRYPOINT ["mtp"]', 'CMD ["run"]',
                 "MTP_TENANT_DIR=/srv/tenant", "MTP_DATA_DIR=/var/lib/mtp",
                 "MTP_LISTEN=0.0.0.0:8080", "HEALTHCHECK", "/healthz"):
        assert line in text


def stages(text: str) -> dict[str, str]:
    """The Dockerfile's stages by name, each its text from FROM to the next FROM."""
    parts = re.split(r"^(?=FROM )", text, flags=re.M)[1:]
    return {re.match(r"FROM \S+ AS (\S+)", p).group(1): p for p in parts}  # type: ignore[union-attr]


def test_dockerfile_pool_target():
    """`--target pool`: mtp pool on a bundles volume, no tenant inside, the same hardening."""
    text = DOCKERFILE.read_text()
    named = stages(text)
    order = list(named)
    assert order[-1] == "runtime"  # the default target stays the tenant image
    # A builder that runs every stage up to its target never needs a runtime tree.
    assert order.index("pool") < order.index("tenant-tree")
    pool = named["pool"]
    assert pool.startswith("FROM base AS pool")
    assert 'CMD ["pool", "--name", "default", "--bundles", "/srv/bundles"]' in pool
    assert "MTP_TENANT_DIR" not in named["base"] + pool
    assert "COPY --from=tenant-tree" not in pool
    for line in ("USER 10001:10001", 'ENTRYPOINT ["mtp"]', "STOPSIGNAL SIGTERM",
                 "HEALTHCHECK", "MTP_DATA_DIR=/var/lib/mtp", "MTP_LISTEN=0.0.0.0:8080"):
        assert line in named["base"]
    assert "REQUIREMENTS" in named["build"]
    assert "!build/pool/" in (ROOT / ".dockerignore").read_text().splitlines()


def test_pool_deployment_runs_the_pool_image_as_built():
    """The pool manifest's args, probes and hardening are the image's and the tenant pod's."""
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/pool/deployment.yaml").read_text())
    tenant = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].split(":")[0].endswith("/mtp-pool")
    assert c["args"][:2] == ["pool", "--name"]
    assert c["args"][3:] == ["--bundles", "/srv/bundles"]
    assert {"name": "bundles", "mountPath": "/srv/bundles", "readOnly": True} in c[
        "volumeMounts"]
    sidecar = next(x for x in tenant["spec"]["template"]["spec"]["containers"]
                   if x["name"] == "sidecar")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"] == sidecar[probe]["exec"]
    assert c["securityContext"] == sidecar["securityContext"]
    assert pod["securityContext"] == tenant["spec"]["template"]["spec"]["securityContext"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {"MTP_POOL_DOMAIN", "MTP_POOL_IDLE", "MTP_POOL_MAX_PROCS"} <= set(env)


def test_pod_runs_sidecar_and_framework_from_one_image():
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert containers["sidecar"]["args"] == ["sidecar"]
    assert containers["framework"]["args"] == ["framework"]
    assert containers["sidecar"]["image"] == containers["framework"]["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in containers.values():
        env = {e["name"]: e for e in c["env"]}
        assert env["MTP_UPSTREAM"]["value"] == "unix:/run/mtp/framework.sock"
        assert "secretKeyRef" in env["MTP_SIDECAR_SECRET"]["valueFrom"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "run", "mountPath": "/run/mtp"} in c["volumeMounts"]
    probes = containers["sidecar"]
    assert probes["livenessProbe"]["exec"]["command"][:3] == ["mtp", "probe", "sidecar"]
    assert "/readyz" in probes["readinessProbe"]["exec"]["command"]
    assert {"emptyDir"} <= {k for v in pod["volumes"] if v["name"] == "run" for k in v}


def test_tenant_workflow_calls_the_reusable_pipeline_pinned_by_hash():
    doc = yaml.safe_load((ROOT / "tenant_template/.github/workflows/build.yml").read_text())
    job = doc["jobs"]["image"]
    path, _, ref = job["uses"].partition("@")
    assert path.endswith("/.github/workflows/tenant-pipeline.yml")
    assert HEX40.match(ref)
    assert job["with"]["framework_ref"] == ref
    pipeline = yaml.safe_load((ROOT / ".github/workflows/tenant-pipeline.yml").read_text())
    inputs = pipeline[True]["workflow_call"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert set(job["with"]) <= set(inputs)
    assert {"framework_ref", "tenant_id", "image_name", "registry"} <= set(inputs)
