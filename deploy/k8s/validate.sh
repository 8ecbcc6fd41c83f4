#!/usr/bin/env bash
# Validates the Kubernetes manifests without a cluster:
#  1. renders every overlay (overlays/*) with `kubectl kustomize` (or `kustomize build`);
#     without either, falls back to the plain YAML files of base/ and components/ (the
#     ConfigMap generators are then not rendered);
#  2. validates every built-in object against the Kubernetes OpenAPI schemas of
#     K8S_VERSION (default 1.30.0) with kubernetes-validate (PyPI; pip-installed, pinned,
#     when missing), in strict mode (unknown fields are errors);
#  3. checks the custom resources: KEDA ScaledObject / TriggerAuthentication against KEDA's
#     documented fields (keda.sh/docs/2.16: ScaledObject spec, redis-streams scaler), and
#     the Prometheus Operator objects' required fields;
#  4. refuses Secret objects (secrets are referenced, never shipped);
#  5. checks that the prod overlays (overlays/prod*) require the honua-api-keys secret.
# Usage: deploy/k8s/validate.sh   (VALIDATE_RENDER=plain forces the fallback; K8S_VERSION
# picks the schemas). Exit 0 when everything validates.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
KV_VERSION="1.37.0"

if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "validate: installing kubernetes-validate==$KV_VERSION (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
render=""
if [ "${VALIDATE_RENDER:-}" = "plain" ]; then
  :  # forced fallback (to test it)
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  render="kubectl kustomize"
elif command -v kustomize >/dev/null 2>&1; then
  render="kustomize build"
fi
if [ -n "$render" ]; then
  for o in "$here"/overlays/*/; do
    name="$(basename "$o")"
    $render "$o" > "$out/overlay-$name.yaml"
  done
  echo "validate: rendered $(find "$out" -name "overlay-*.yaml" | wc -l) overlays with $render" >&2
else
  echo "validate: no kubectl/kustomize: validating the plain files of base/ and components/" >&2
  find "$here/base" "$here/components" -name '*.yaml' ! -name kustomization.yaml ! -path '*/config/*' \
    -exec sh -c 'for f; do cp "$f" "'"$out"'/file-$(echo "$f" | tr / _)"; done' sh {} +
fi

python3 - "$K8S_VERSION" "$out" <<'PY'
import glob, os, re, sys
import yaml
import kubernetes_validate as kv

version, out = sys.argv[1], sys.argv[2]
errors = []

# KEDA's documented fields (keda.sh/docs/2.16/reference/scaledobject-spec,
# /scalers/redis-streams, /concepts/authentication).
SO_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
           "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
           "triggers"}
SO_TARGET = {"apiVersion", "kind", "name", "envSourceContainerName"}
SO_ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
SO_HPA_CONFIG = {"name", "behavior"}
TRIGGER = {"type", "metadata", "name", "useCachedMetrics", "authenticationRef", "metricType"}
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}
REDIS_STREAMS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                 "username", "usernameFromEnv", "password", "passwordFromEnv", "stream",
                 "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
                 "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl",
                 "activationValue"}
# redis-cluster-streams (keda.sh/docs/2.16/scalers/redis-cluster-streams): the same
# stream fields, the nodes as comma-separated lists.
REDIS_CLUSTER_STREAMS = (REDIS_STREAMS - {"address", "addressFromEnv", "host", "hostFromEnv",
                                          "port", "portFromEnv", "databaseIndex"}) | {
    "addresses", "addressesFromEnv", "hosts", "hostsFromEnv", "ports", "portsFromEnv"}
# advanced.scalingModifiers (keda.sh/docs/2.16/concepts/scaling-deployments, KEDA >= 2.12).
SCALING_MODIFIERS = {"formula", "target", "activationTarget", "metricType"}
CPU_MEM = {"type", "value", "containerName"}
TA_SPEC = {"podIdentity", "secretTargetRef", "env", "hashiCorpVault", "azureKeyVault",
           "gcpSecretManager", "awsSecretManager", "configMapTargetRef", "boundServiceAccountToken"}
TA_SECRET_REF = {"parameter", "name", "key"}

def unknown(where, got, allowed):
    extra = set(got) - allowed
    if extra:
        errors.append(f"{where}: unknown field(s) {sorted(extra)}")

def check_scaled_object(o, where):
    spec = o.get("spec") or {}
    unknown(where + ".spec", spec, SO_SPEC)
    unknown(where + ".spec.scaleTargetRef", spec.get("scaleTargetRef") or {}, SO_TARGET)
    if not (spec.get("scaleTargetRef") or {}).get("name"):
        errors.append(f"{where}: spec.scaleTargetRef.name is required")
    adv = spec.get("advanced") or {}
    unknown(where + ".spec.advanced", adv, SO_ADVANCED)
    unknown(where + ".spec.advanced.horizontalPodAutoscalerConfig",
            adv.get("horizontalPodAutoscalerConfig") or {}, SO_HPA_CONFIG)
    mods = adv.get("scalingModifiers")
    if mods is not None:
        unknown(where + ".spec.advanced.scalingModifiers", mods, SCALING_MODIFIERS)
        if not isinstance(mods.get("formula"), str) or not isinstance(mods.get("target"), str):
            errors.append(f"{where}: scalingModifiers needs a formula and a target (strings)")
        if mods.get("metricType", "AverageValue") not in METRIC_TYPES:
            errors.append(f"{where}: scalingModifiers.metricType not in {sorted(METRIC_TYPES)}")
        names = {t.get("name") for t in spec.get("triggers") or []}
        used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", mods.get("formula") or ""))
        if None in names:
            errors.append(f"{where}: with scalingModifiers every trigger needs a name")
        if used - names:
            errors.append(f"{where}: the formula names unknown triggers {sorted(used - names)}")
        if names - used - {None}:
            errors.append(f"{where}: triggers {sorted(names - used - {None})} are not in the formula")
    for k in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        if k in spec and not isinstance(spec[k], int):
            errors.append(f"{where}: spec.{k} must be an integer")
    triggers = spec.get("triggers") or []
    if not triggers:
        errors.append(f"{where}: spec.triggers is required")
    for i, t in enumerate(triggers):
        tw = f"{where}.spec.triggers[{i}]"
        unknown(tw, t, TRIGGER)
        md = t.get("metadata") or {}
        for k, v in md.items():
            if not isinstance(v, str):
                errors.append(f"{tw}.metadata.{k}: trigger metadata values are strings")
        if "metricType" in t and t["metricType"] not in METRIC_TYPES:
            errors.append(f"{tw}.metricType: {t['metricType']!r} not in {sorted(METRIC_TYPES)}")
        if t.get("type") in ("redis-streams", "redis-cluster-streams"):
            cluster = t["type"] == "redis-cluster-streams"
            unknown(tw + ".metadata", md, REDIS_CLUSTER_STREAMS if cluster else REDIS_STREAMS)
            for req in ("stream", "consumerGroup"):
                if req not in md:
                    errors.append(f"{tw}.metadata.{req} is required")
            if "lagCount" not in md or "pendingEntriesCount" in md or "streamLength" in md:
                errors.append(f"{tw}: scale on lagCount only (not pendingEntriesCount/streamLength)")
            nodes = (("addresses", "addressesFromEnv", "hosts", "hostsFromEnv") if cluster
                     else ("address", "addressFromEnv", "host", "hostFromEnv"))
            if not any(k in md for k in nodes):
                errors.append(f"{tw}: {nodes[0]} or {nodes[2]} is required")
        elif t.get("type") in ("cpu", "memory"):
            unknown(tw + ".metadata", md, {"value", "containerName", "type"})
            if t.get("metricType") not in ("Utilization", "AverageValue"):
                errors.append(f"{tw}: cpu/memory triggers need metricType Utilization|AverageValue")
        else:
            errors.append(f"{tw}: unexpected trigger type {t.get('type')!r}")

def check_trigger_auth(o, where):
    spec = o.get("spec") or {}
    unknown(where + ".spec", spec, TA_SPEC)
    for i, r in enumerate(spec.get("secretTargetRef") or []):
        unknown(f"{where}.spec.secretTargetRef[{i}]", r, TA_SECRET_REF)
        for k in TA_SECRET_REF:
            if k not in r:
                errors.append(f"{where}.spec.secretTargetRef[{i}].{k} is required")

def check_monitoring(o, where):
    kind, spec = o["kind"], o.get("spec") or {}
    if kind == "ServiceMonitor":
        if "selector" not in spec or not spec.get("endpoints"):
            errors.append(f"{where}: ServiceMonitor needs spec.selector and spec.endpoints")
        for e in spec.get("endpoints") or []:
            unknown(where + ".endpoints[]", e, {"port", "path", "interval", "scrapeTimeout",
                                                 "scheme", "relabelings", "metricRelabelings",
                                                 "honorLabels", "targetPort"})
    elif kind == "PodMonitor":
        if "selector" not in spec or not spec.get("podMetricsEndpoints"):
            errors.append(f"{where}: PodMonitor needs spec.selector and spec.podMetricsEndpoints")
    elif kind == "PrometheusRule":
        for g in spec.get("groups") or []:
            if "name" not in g or not g.get("rules"):
                errors.append(f"{where}: every rule group needs a name and rules")
            for r in g.get("rules") or []:
                if "expr" not in r or ("alert" in r) == ("record" in r):
                    errors.append(f"{where}: rule {r.get('alert') or r.get('record')}: "
                                  "needs expr and exactly one of alert/record")
        if not spec.get("groups"):
            errors.append(f"{where}: PrometheusRule without groups")

CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaled_object,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): check_trigger_auth,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_monitoring,
    ("monitoring.coreos.com/v1", "PodMonitor"): check_monitoring,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_monitoring,
}

def check_api_keys_required(d, where):
    """A prod overlay's scheduler must not start without its API keys (an open API)."""
    if d.get("kind") != "Deployment" or not d["metadata"]["name"].endswith("-scheduler"):
        return
    for c in d["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env") or []:
            if e.get("name") == "HONUA_API_KEYS":
                ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref.get("optional", False):
                    errors.append(f"{where}: HONUA_API_KEYS must be required (optional: false) in prod")
                return
    errors.append(f"{where}: no HONUA_API_KEYS in the scheduler container")

counts = {}
for path in sorted(glob.glob(os.path.join(out, "*.yaml"))):
    src = os.path.basename(path)
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        key = (d.get("apiVersion"), d.get("kind"))
        where = f"{src}: {d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        if d.get("kind") == "Secret":
            errors.append(f"{where}: Secret objects must not be shipped (reference them)")
            continue
        if src.startswith("overlay-prod"):
            check_api_keys_required(d, where)
        if key in CUSTOM:
            CUSTOM[key](d, where)
        else:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                errors.append(f"{where}: {e.message} at {'/'.join(map(str, e.path))}")
            except kv.SchemaNotFoundError:
                errors.append(f"{where}: no schema for {key} in Kubernetes {version}")
        counts[src] = counts.get(src, 0) + 1

for src, n in counts.items():
    print(f"validate: {src}: {n} objects")
if errors:
    for e in errors:
        print("INVALID " + e, file=sys.stderr)
    sys.exit(1)
import importlib.metadata as md
print(f"validate: OK: {sum(counts.values())} objects, Kubernetes {version} schemas "
      f"(kubernetes-validate {md.version('kubernetes-validate')}), KEDA/Prometheus Operator field checks")
PY
