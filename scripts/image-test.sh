#!/usr/bin/env bash
# Build docker/Dockerfile with podman on a local Debian base and prove the image works:
# it starts (read-only root, no capabilities), answers /healthz, serves a service through
# the sidecar with a JWT, runs as non-root, and stops cleanly on SIGTERM; then the same
# as the Kubernetes pod does it (two containers sharing a unix socket). Then the pool image
# (target `pool`, `mtp pool`) serving three tenants from a read-only bundles volume, one of
# them added while it serves: each tenant's own service by Host, path prefix and
# X-Tenant-ID, another tenant's token 403, an unknown tenant 403, every process non-root
# and without capabilities, a read-only root, exit 0 on SIGTERM. Prints the images' sizes
# and build and run times.
#
# No Docker engine and no registry are needed: the base image is made with debootstrap
# (cached under $MTP_PODMAN_DIR, default /var/tmp/mtp-podman, never in the repo) and the
# wheels are built on the host into build/wheelhouse, installed offline in the build.
#
#   make image-test                      # or: bash scripts/image-test.sh
#   NO_CACHE=1 make image-test           # rebuild every layer (to time a cold build)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TENANT_DIR=tenant_template   # the checks below call its hello service
WORK=${MTP_PODMAN_DIR:-/var/tmp/mtp-podman}
BASE=localhost/mtp-base:bookworm-slim
IMAGE=${IMAGE:-localhost/mtp-image-test:latest}
# The Debian mirror this machine's apt uses (sources.list, sources.list.d/*.list or
# deb822 *.sources), so no host is named here; DEBIAN_MIRROR overrides it.
MIRROR=${DEBIAN_MIRROR:-}
GRACE=${GRACE:-20}
NO_CACHE=${NO_CACHE:-}           # NO_CACHE=1: rebuild every layer (for timing a cold build)
POOL_IMAGE=${POOL_IMAGE:-localhost/mtp-pool-image-test:latest}
NAME="mtp-image-test-$$"

log() { printf 'image-test: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
if ! { have podman && have debootstrap && have runc; }; then
  # A fresh machine: install what the notes list, as make test does for its servers.
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "installing podman and friends with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
      podman buildah debootstrap runc uidmap fuse-overlayfs slirp4netns >/dev/null \
      || fail "apt-get install of podman failed"
  fi
fi
for bin in podman debootstrap runc; do
  have "$bin" || fail "$bin is not installed"
done

mkdir -p "$WORK"
# runc + cgroupfs and low default ulimits: what works without systemd on these machines.
cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"
P=(podman --root "$WORK/storage" --runroot "$WORK/runroot")
# Without systemd, podman 4 logs an error about healthcheck timers on run/stop/rm;
# harmless (step 7 runs the HEALTHCHECK itself), so those lines are dropped.
quiet() { "$@" 2> >(grep -v "systemd connection" >&2); }

# 1. A local Debian base with python3 (no registry is reachable here).
if ! "${P[@]}" image exists "$BASE"; then
  if [ ! -d "$WORK/rootfs" ]; then
    if [ -z "$MIRROR" ]; then
      MIRROR=$("$PY" scripts/debian-mirror.py --suite bookworm) \
        || fail "no Debian mirror in the apt sources: set DEBIAN_MIRROR"
    fi
    log "debootstrap bookworm from $MIRROR (about a minute, once)"
    rm -rf "$WORK/rootfs.partial"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$WORK/rootfs.partial" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || fail "debootstrap failed, see $WORK/debootstrap.log"
    mv "$WORK/rootfs.partial" "$WORK/rootfs"
  fi
  # Trimmed like the official -slim images: no apt caches or lists, docs, man pages, locales.
  log "importing $BASE"
  tar -C "$WORK/rootfs" -c \
    --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/cache/apt/*.bin' \
    --exclude='./var/lib/apt/lists/*' --exclude='./usr/share/doc/*' \
    --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' . \
    | "${P[@]}" import -q - "$BASE" >/dev/null
fi

# 2. Wheels on the host (the build cannot reach a package index); setuptools and wheel
#    are there for the isolated build of the framework's own wheel inside the image.
#    The host resolves markers for its own Python: redis needs async-timeout below
#    3.11.3 (Debian bookworm has 3.11.2), so it is named here explicitly.
mkdir -p build/wheelhouse
log "building the wheelhouse"
"$PY" -m pip wheel -q -w build/wheelhouse . setuptools wheel "async-timeout>=4.0.3" \
  -r "$TENANT_DIR/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
rm -f build/wheelhouse/mtp-*.whl   # the image builds the framework's wheel from source

# 3. Steps 3-4 of the pipeline: the runtime tree the image serves. Its manifest's time is
#    the commit's (SOURCE_DATE_EPOCH), so an unchanged tree leaves the build cache valid.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH
"$VENV/bin/mtp" assemble --tenant-dir "$TENANT_DIR" --out build/runtime >/dev/null

# 3b. The pool image's tenants (step 10): the same Dockerfile's target `pool` (`mtp pool`,
#     no tenant inside).
#     Three small tenants, each with its own service, JWT secret and API key, assembled
#     by `mtp assemble` into a bundles directory mounted read-only at /srv/bundles (a
#     volume, not baked in: a pool takes bundles added, replaced or removed while it
#     serves). Its virtualenv holds the framework and the union of the tenants'
#     requirements (build/pool/requirements.txt, written before either build so both
#     see one build context).
mkdir -p "$WORK"
POOL_TMP=$(mktemp -d "$WORK/pool.XXXXXX")
trap 'rm -rf "$POOL_TMP"' EXIT   # until cleanup() below takes over
chmod 0755 "$POOL_TMP"   # the container's uid 10001 reads the bundles
POOL_TENANTS=(acme globex initech)
POOL_DOMAIN=pool.image-test
mkdir -p "$POOL_TMP/bundles" "$POOL_TMP/staging" build/pool
for t in "${POOL_TENANTS[@]}"; do
  key="key-$t-$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
  digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
  mkdir -p "$POOL_TMP/src/$t/services"
  cat >"$POOL_TMP/src/$t/tenant.toml" <<TOML
[tenant]
id = "$t"
name = "Tenant $t"

[auth.jwt]
algorithms = ["HS256"]
secret_env = "MTP_JWT_SECRET"

[auth.api_keys.ci]
hash = "sha256:$digest"
roles = ["admin"]

[[authz.rules]]
service = "*"
operations = ["*"]
TOML
  # The tenant's own code: the answer names the tenant that wrote it and the process.
  cat >"$POOL_TMP/src/$t/services/whoami.py" <<SERVICE
"""Which tenant's code answered, for whom, in which process."""
import os


def handle(context):
    return {"written_by": "$t", "tenant": context.tenant_id, "user": context.user,
            "pid": os.getpid(), "uid": os.getuid()}
SERVICE
  "$VENV/bin/mtp" assemble --skip-tests --tenant-dir "$POOL_TMP/src/$t" \
    --out "$POOL_TMP/staging/$t" >/dev/null
  # A tenant's secret for the pool: MTP_JWT_SECRET__<TENANT> (docs/pools.md).
  upper=$(printf '%s' "$t" | tr 'a-z-' 'A-Z_')
  export "MTP_JWT_SECRET__$upper=jwt-$t-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
  export "POOL_API_KEY__$upper=$key"
done
cat "$POOL_TMP"/staging/*/requirements.txt | sort -u >build/pool/requirements.txt
chmod -R a+rX "$POOL_TMP"
# Two bundles at start; initech's is moved in while the pool serves.
mv "$POOL_TMP/staging/acme" "$POOL_TMP/staging/globex" "$POOL_TMP/bundles/"

# 4. The image. --format docker keeps HEALTHCHECK (OCI images drop it).
log "podman build $IMAGE"
start=$(date +%s)
"${P[@]}" build -q --format docker ${NO_CACHE:+--no-cache} -f docker/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/build/wheelhouse \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --build-arg TENANT_ID="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tenant_id"])' build/runtime/manifest.json)" \
  . >/dev/null
build_seconds=$(( $(date +%s) - start ))

# 5. Run it with secrets in the environment (passed by name: values stay off argv), with
#    the restrictions docker-compose.yml and the Kubernetes manifests use: read-only root,
#    no capabilities, no privilege escalation; only MTP_DATA_DIR and /tmp are writable.
free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
MTP_JWT_SECRET=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
MTP_SIDECAR_SECRET=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export MTP_JWT_SECRET MTP_SIDECAR_SECRET
POD="$NAME-pod"
cleanup() {
  "${P[@]}" rm -f -t 1 "$NAME" "$NAME-pool" >/dev/null 2>&1 || true
  "${P[@]}" pod rm -f -t 1 "$POD" >/dev/null 2>&1 || true
  "${P[@]}" volume rm -f "$NAME-solo" "$NAME-run" "$NAME-data" "$NAME-pooldata" \
    "$NAME-poolrun" >/dev/null 2>&1 || true
  if [ -n "$POOL_TMP" ]; then rm -rf "$POOL_TMP"; fi
}
trap cleanup EXIT
HARDENED=(--read-only --cap-drop ALL --security-opt no-new-privileges
          --tmpfs /tmp:rw,nosuid,nodev --health-interval=disable)

wait_healthy() {  # PORT CONTAINER...: /healthz answers, or a container died
  local port=$1; shift
  for _ in $(seq 120); do
    if "$PY" -c 'import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=2)' "$port" 2>/dev/null
    then return 0; fi
    for c in "$@"; do
      if [ "$("${P[@]}" inspect --format '{{.State.Running}}' "$c")" != "true" ]; then
        "${P[@]}" logs "$c" >&2 || true
        fail "container $c exited before /healthz answered"
      fi
    done
    sleep 0.5
  done
  fail "no /healthz on port $port within 60s"
}

http_checks() {  # PORT: through the sidecar, with and without a token
  PORT=$1 "$PY" - <<'PYCHECK'
import json, os, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{os.environ['PORT']}"
for _ in range(60):  # ready once the framework behind the sidecar answers
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("/readyz never answered 200")
req = urllib.request.Request(
    base + "/services/hello", data=json.dumps({"name": "image"}).encode(), method="POST",
    headers={"Authorization": "Bearer " + os.environ["TOKEN"],
             "Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    body = json.load(r)
assert body == {"message": "Hello, image!", "tenant": "demo"}, body
try:
    urllib.request.urlopen(base + "/services/hello", timeout=5)
    raise SystemExit("an unauthenticated call was served")
except urllib.error.HTTPError as exc:
    assert exc.code == 401, exc.code
    assert exc.headers["Content-Type"].startswith("application/problem+json")
print(f"image-test: {base}: /healthz, /readyz, POST /services/hello 200, no token 401: ok")
PYCHECK
}

TOKEN=$(MTP_TENANT_DIR=build/runtime "$VENV/bin/mtp" token --user alice)
export TOKEN

# 6. One container, `mtp run` (the image's default command): both processes, supervised.
#    A new named volume starts with the image's /var/lib/mtp, owned by uid 10001.
PORT=$(free_port)
"${P[@]}" volume create "$NAME-solo" >/dev/null
quiet "${P[@]}" run -d --name "$NAME" -p "127.0.0.1:$PORT:8080" "${HARDENED[@]}" \
  -v "$NAME-solo:/var/lib/mtp" \
  -e MTP_JWT_SECRET -e MTP_SIDECAR_SECRET "$IMAGE" >/dev/null
log "container $NAME (mtp run) on 127.0.0.1:$PORT"
wait_healthy "$PORT" "$NAME"
http_checks "$PORT" || { "${P[@]}" logs "$NAME" >&2 || true; fail "HTTP checks (mtp run)"; }

# 7. Every process in the container runs as the image's non-root user; HEALTHCHECK works.
uids=$("${P[@]}" exec "$NAME" python -c \
  'import glob, os; print(" ".join(sorted({str(os.stat(p).st_uid) for p in glob.glob("/proc/[0-9]*")})))')
[ "$uids" = "10001" ] || fail "process uids in the container: $uids (want only 10001)"
log "processes run as uid $uids"
"${P[@]}" healthcheck run "$NAME" >/dev/null || fail "the image's HEALTHCHECK failed"
log "HEALTHCHECK passes"

# 8. SIGTERM (podman stop) drains and exits 0 before the grace period ends in a SIGKILL.
start=$(date +%s)
quiet "${P[@]}" stop -t "$GRACE" "$NAME" >/dev/null
stop_seconds=$(( $(date +%s) - start ))
code=$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = "0" ] || { "${P[@]}" logs "$NAME" >&2 || true; fail "exit code $code after SIGTERM"; }
[ "$stop_seconds" -lt "$GRACE" ] || fail "stop took ${stop_seconds}s (grace ${GRACE}s)"
log "SIGTERM: exit 0 after ${stop_seconds}s"

# 9. The Kubernetes layout: one pod, two containers of the same image (`mtp framework`,
#    `mtp sidecar`) sharing the framework's unix socket through a volume at /run/mtp.
PORT=$(free_port)
"${P[@]}" volume create "$NAME-run" >/dev/null
"${P[@]}" volume create "$NAME-data" >/dev/null
"${P[@]}" pod create --name "$POD" -p "127.0.0.1:$PORT:8080" >/dev/null
SHARED=(--pod "$POD" "${HARDENED[@]}" -v "$NAME-run:/run/mtp" -v "$NAME-data:/var/lib/mtp"
        -e MTP_UPSTREAM=unix:/run/mtp/framework.sock -e MTP_SIDECAR_SECRET)
quiet "${P[@]}" run -d --name "$POD-framework" "${SHARED[@]}" "$IMAGE" framework >/dev/null
quiet "${P[@]}" run -d --name "$POD-sidecar" "${SHARED[@]}" -e MTP_JWT_SECRET \
  "$IMAGE" sidecar >/dev/null
log "pod $POD (mtp framework + mtp sidecar) on 127.0.0.1:$PORT"
wait_healthy "$PORT" "$POD-framework" "$POD-sidecar"
http_checks "$PORT" || {
  "${P[@]}" logs "$POD-framework" >&2 || true; "${P[@]}" logs "$POD-sidecar" >&2 || true
  fail "HTTP checks (two-container pod)"; }
# The manifests' probes and preStop hooks, run as the kubelet runs them (exec).
for check in "$POD-framework mtp probe framework" "$POD-sidecar mtp probe sidecar" \
             "$POD-sidecar mtp probe sidecar --path /readyz" "$POD-sidecar sleep 0"; do
  # shellcheck disable=SC2086  # word splitting intended: container, then its command
  "${P[@]}" exec $check || fail "exec probe failed: $check"
done
log "pod: exec probes (mtp probe) and the preStop sleep work in the image"
quiet "${P[@]}" pod stop -t "$GRACE" "$POD" >/dev/null
for c in "$POD-framework" "$POD-sidecar"; do
  code=$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$c")
  [ "$code" = "0" ] || { "${P[@]}" logs "$c" >&2 || true; fail "$c: exit $code after SIGTERM"; }
done
log "pod: both containers exit 0 on SIGTERM"

# 10. The pool image, built from the tenants prepared in step 3b.
log "podman build $POOL_IMAGE (--target pool)"
start=$(date +%s)
"${P[@]}" build -q --format docker ${NO_CACHE:+--no-cache} -f docker/Dockerfile \
  --target pool -t "$POOL_IMAGE" \
  --build-arg BASE_IMAGE="$BASE" --build-arg REQUIREMENTS=build/pool/requirements.txt \
  --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/build/wheelhouse \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  . >/dev/null
pool_build_seconds=$(( $(date +%s) - start ))
"${P[@]}" image inspect --format '{{.Config.Env}}' "$POOL_IMAGE" | grep -q MTP_TENANT_DIR \
  && fail "the pool image names a tenant (MTP_TENANT_DIR)"

# The image's default command (`mtp pool --name default --bundles /srv/bundles`) with
# the pool's name given as Kubernetes' args give it; secrets passed by name; the tenant
# processes' sockets on a volume at /run/mtp, as the manifest's MTP_POOL_RUN_DIR.
pool_start=$(date +%s)
PORT=$(free_port)
"${P[@]}" volume create "$NAME-pooldata" >/dev/null
"${P[@]}" volume create "$NAME-poolrun" >/dev/null
quiet "${P[@]}" run -d --name "$NAME-pool" -p "127.0.0.1:$PORT:8080" "${HARDENED[@]}" \
  -v "$POOL_TMP/bundles:/srv/bundles:ro" -v "$NAME-pooldata:/var/lib/mtp" \
  -v "$NAME-poolrun:/run/mtp" -e MTP_POOL_RUN_DIR=/run/mtp \
  -e MTP_SIDECAR_SECRET -e MTP_POOL_DOMAIN="$POOL_DOMAIN" -e MTP_POOL_IDLE=300 \
  -e MTP_POOL_MAX_PROCS=3 -e MTP_GRACE_SECONDS=10 \
  -e MTP_JWT_SECRET__ACME -e MTP_JWT_SECRET__GLOBEX -e MTP_JWT_SECRET__INITECH \
  "$POOL_IMAGE" pool --name image-test --bundles /srv/bundles >/dev/null
log "container $NAME-pool (mtp pool, tenants: acme globex; initech added later) on 127.0.0.1:$PORT"
wait_healthy "$PORT" "$NAME-pool"
pool_logs() { "${P[@]}" logs "$NAME-pool" >&2 || true; }

pool_checks() {  # STAGE: "two" (initech has no bundle yet) or "three"
  PORT=$PORT STAGE=$1 DOMAIN=$POOL_DOMAIN "$PY" - <<'PYCHECK'
import http.client, json, os, time

import jwt

port, domain, stage = int(os.environ["PORT"]), os.environ["DOMAIN"], os.environ["STAGE"]
served = ["acme", "globex"] + (["initech"] if stage == "three" else [])


def secret(t, kind):
    return os.environ[f"{kind}__{t.upper()}"]


def token(t, claim=None, user="alice"):
    claims = {"sub": user, "tenant_id": claim or t, "exp": int(time.time()) + 300}
    return jwt.encode(claims, secret(t, "MTP_JWT_SECRET"), algorithm="HS256")


def call(path, headers, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None,
                     headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def refused(reply, want, problem=None):
    status, ctype, body = reply
    assert status == want, (status, body)
    assert ctype.startswith("application/problem+json"), ctype
    doc = json.loads(body)
    assert doc["request_id"], doc
    if problem:
        assert doc["type"].endswith(problem), doc


status, _, body = call("/healthz", {}, "GET")
assert status == 200 and json.loads(body)["pool"] == "image-test", body
pids = {}
for t in served:
    ways = {  # each identification method alone, with the tenant's own credential
        "host": ("/services/whoami", {"Host": f"{t}.{domain}:8080",
                                      "Authorization": f"Bearer {token(t)}"}),
        "path": (f"/tenants/{t}/services/whoami", {"Authorization": f"Bearer {token(t)}"}),
        "header": ("/services/whoami", {"X-Tenant-ID": t,
                                        "X-API-Key": secret(t, "POOL_API_KEY")}),
    }
    for way, (path, headers) in ways.items():
        status, _, body = call(path, headers)
        assert status == 200, (t, way, status, body)
        doc = json.loads(body)
        assert doc["written_by"] == t and doc["tenant"] == t, (t, way, doc)
        assert doc["uid"] == 10001, doc
        pids.setdefault(t, set()).add(doc["pid"])
    other = "globex" if t == "acme" else "acme"
    # t's token for another tenant: refused, whichever way the other tenant is named.
    for headers in ({"Host": f"{other}.{domain}"}, {"X-Tenant-ID": other}):
        refused(call("/services/whoami", {**headers, "Authorization": f"Bearer {token(t)}"}),
                want=403, problem="tenant-mismatch")
    refused(call(f"/tenants/{other}/services/whoami",
                  {"Authorization": f"Bearer {token(t)}"}), want=403, problem="tenant-mismatch")
    # t's secret signing a token that claims the other tenant: the other's keys refuse it.
    refused(call("/services/whoami", {"Authorization": f"Bearer {token(t, claim=other)}"}),
            want=401)
    refused(call("/services/whoami", {"Host": f"{t}.{domain}"}), want=401)  # no credential
# One process per tenant, never shared.
assert all(len(p) == 1 for p in pids.values()), pids
assert len({p for ps in pids.values() for p in ps}) == len(served), pids
unknown = ["nosuch"] + (["initech"] if stage == "two" else [])
for t in unknown:
    for path, headers in (("/services/whoami", {"Host": f"{t}.{domain}"}),
                          ("/services/whoami", {"X-Tenant-ID": t}),
                          (f"/tenants/{t}/services/whoami", {})):
        refused(call(path, headers), want=403, problem="unknown-tenant")
refused(call("/services/whoami", {}), want=403, problem="unknown-tenant")
print(f"image-test: pool: {', '.join(served)} each by Host, path prefix and X-Tenant-ID "
      f"in its own process; another tenant's token 403, a forged claim 401, "
      f"{', '.join(unknown)} 403 unknown-tenant: ok")
PYCHECK
}

pool_checks two || { pool_logs; fail "pool HTTP checks (two bundles)"; }
# A bundle moved into the volume (a rename, as a pipeline publishes): served, no restart.
mv "$POOL_TMP/staging/initech" "$POOL_TMP/bundles/initech"
pool_checks three || { pool_logs; fail "pool HTTP checks (initech added while serving)"; }
log "pool: initech's bundle, added while serving, is served without a restart"

# The pool, its warm parent and the three tenant processes: uid 10001, no capabilities,
# a read-only root and bundles; the per-tenant state is on the data volume.
"${P[@]}" exec -i "$NAME-pool" python - <<'PYCHECK' || { pool_logs; fail "pool process checks"; }
import errno, glob, os

procs = {}
for status in glob.glob("/proc/[0-9]*/status"):
    try:
        fields = dict(line.split(":", 1) for line in open(status).read().splitlines())
    except OSError:
        continue  # a process that ended meanwhile
    pid = int(status.split("/")[2])
    if pid != os.getpid():  # this check itself is not one of the pool's processes
        procs[pid] = fields
uids = {f["Uid"].split()[0] for f in procs.values()}
assert uids == {"10001"}, f"process uids: {uids}"
caps = {f[c].strip() for f in procs.values() for c in ("CapEff", "CapPrm", "CapBnd")}
assert caps == {"0000000000000000"}, f"capabilities: {caps}"
assert len(procs) >= 5, f"{len(procs)} processes: the pool, its parent, three tenants?"
for path in ("/opt/mtp/x", "/srv/bundles/acme/x", "/x"):
    try:
        open(path, "w")
        raise SystemExit(f"{path} is writable")
    except OSError as exc:
        assert exc.errno == errno.EROFS, (path, exc)
tenants = sorted(os.listdir("/var/lib/mtp/tenants"))
assert tenants == ["acme", "globex", "initech"], tenants
sockets = sorted(p.split("-")[0] for p in os.listdir("/run/mtp") if p.endswith(".sock"))
assert sockets == tenants, sockets  # one live process per tenant, in MTP_POOL_RUN_DIR
print(f"image-test: pool: {len(procs)} processes, all uid 10001, no capabilities; "
      "root and bundles read-only; state per tenant on the data volume, a socket per "
      "tenant in MTP_POOL_RUN_DIR: ok")
PYCHECK
"${P[@]}" healthcheck run "$NAME-pool" >/dev/null || fail "the pool image's HEALTHCHECK failed"
"${P[@]}" exec "$NAME-pool" mtp probe sidecar --path /readyz --timeout 2 \
  || fail "the pool's readiness probe (mtp probe sidecar --path /readyz) failed"
log "pool: HEALTHCHECK and the manifest's exec probes pass"

start=$(date +%s)
quiet "${P[@]}" stop -t "$GRACE" "$NAME-pool" >/dev/null
pool_stop_seconds=$(( $(date +%s) - start ))
code=$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$NAME-pool")
[ "$code" = "0" ] || { pool_logs; fail "pool: exit code $code after SIGTERM"; }
[ "$pool_stop_seconds" -lt "$GRACE" ] || fail "pool: stop took ${pool_stop_seconds}s (grace ${GRACE}s)"
log "pool: SIGTERM: exit 0 after ${pool_stop_seconds}s"
pool_run_seconds=$(( $(date +%s) - pool_start ))

# Earlier builds and the build stage stay behind as dangling images in the private store.
"${P[@]}" image prune -f >/dev/null
size=$("${P[@]}" image inspect --format '{{.Size}}' "$IMAGE")
base_size=$("${P[@]}" image inspect --format '{{.Size}}' "$BASE")
pool_size=$("${P[@]}" image inspect --format '{{.Size}}' "$POOL_IMAGE")
printf 'image-test: PASSED image=%s size=%s bytes (%s MB; base %s MB) build=%ss\n' \
  "$IMAGE" "$size" "$(( size / 1000000 ))" "$(( base_size / 1000000 ))" "$build_seconds"
printf 'image-test: PASSED pool image=%s size=%s bytes (%s MB) build=%ss run+checks+stop=%ss\n' \
  "$POOL_IMAGE" "$pool_size" "$(( pool_size / 1000000 ))" "$pool_build_seconds" \
  "$pool_run_seconds"
