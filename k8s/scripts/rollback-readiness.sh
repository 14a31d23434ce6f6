#!/usr/bin/env bash
# Checks that a cluster can roll a zaiproxy canary back right now, WITHOUT changing anything:
# only get/list calls, `kubectl auth can-i`, and server-side dry runs (--dry-run=server),
# which the API server validates and discards. docs/operations/canary.md, "Rollback readiness".
#
# usage: k8s/scripts/rollback-readiness.sh [-n NAMESPACE] [--context CTX]
# exit 0: ready to roll back; 1: at least one check failed (each failure is printed).
set -uo pipefail

NAMESPACE="${ZAIPROXY_NAMESPACE:-zaiproxy}"
CONTEXT=()
PRODUCTION="${ZAIPROXY_PRODUCTION_DEPLOYMENT:-zaiproxy-production}"
CANARY="${ZAIPROXY_CANARY_DEPLOYMENT:-zaiproxy-canary}"
SPLIT_SERVICE="${ZAIPROXY_SPLIT_SERVICE:-zaiproxy}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) NAMESPACE="$2"; shift 2 ;;
    --context) CONTEXT=(--context "$2"); shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

k() { kubectl "${CONTEXT[@]}" -n "$NAMESPACE" "$@"; }
failures=0
ok() { printf 'ok    %s\n' "$1"; }
bad() { printf 'FAIL  %s\n' "$1"; failures=$((failures + 1)); }

# 1. The API answers and both deployments exist.
if ! k get deployment "$PRODUCTION" -o name >/dev/null 2>&1; then
  bad "deployment/$PRODUCTION not found in namespace $NAMESPACE (or no API access)"
  echo "rollback readiness: NOT READY ($failures problem(s))"; exit 1
fi
ok "deployment/$PRODUCTION exists"
if k get deployment "$CANARY" -o name >/dev/null 2>&1; then
  ok "deployment/$CANARY exists"
else
  bad "deployment/$CANARY not found (nothing to roll back?)"
fi

# 2. Production can take all the traffic: every desired replica ready, and not the canary's image.
read -r want ready <<<"$(k get deployment "$PRODUCTION" \
  -o jsonpath='{.spec.replicas} {.status.readyReplicas}' 2>/dev/null)"
ready="${ready:-0}"
if [ -n "${want:-}" ] && [ "$ready" -ge "$want" ] && [ "$want" -gt 0 ]; then
  ok "production ready: $ready/$want replicas"
else
  bad "production not fully ready: ${ready}/${want:-?} replicas"
fi
prod_image="$(k get deployment "$PRODUCTION" -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null)"
canary_image="$(k get deployment "$CANARY" -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null)"
if [ -n "$prod_image" ] && [ "$prod_image" != "$canary_image" ]; then
  ok "production runs $prod_image (canary: ${canary_image:-none})"
else
  bad "production and canary run the same image (${prod_image:-unknown}): a rollback would not change the version"
fi

# 3. The split service selects by app only, so scaling the canary to 0 moves its share to production.
selector="$(k get service "$SPLIT_SERVICE" -o jsonpath='{.spec.selector}' 2>/dev/null)"
if [ -z "$selector" ]; then
  bad "service/$SPLIT_SERVICE not found"
elif printf '%s' "$selector" | grep -q '"variant"'; then
  bad "service/$SPLIT_SERVICE selects one variant ($selector): it is not the split service"
else
  ok "service/$SPLIT_SERVICE selects both variants ($selector)"
fi

# 4. This identity may scale the canary: asked, and tried as a server-side dry run (nothing changes).
if k auth can-i patch deployments/scale >/dev/null 2>&1 || k auth can-i update deployments/scale >/dev/null 2>&1; then
  ok "allowed to scale deployments"
else
  bad "not allowed to scale deployments in $NAMESPACE"
fi
if k scale deployment "$CANARY" --replicas=0 --dry-run=server >/dev/null 2>&1; then
  ok "kubectl scale deployment/$CANARY --replicas=0 passes a server-side dry run"
else
  bad "a server-side dry run of scaling deployment/$CANARY to 0 was refused"
fi

# 5. The PodDisruptionBudget of production leaves room (a rollback must not be blocked by it).
allowed="$(k get pdb "$PRODUCTION" -o jsonpath='{.status.disruptionsAllowed}' 2>/dev/null)"
if [ -z "$allowed" ]; then
  bad "poddisruptionbudget/$PRODUCTION not found"
else
  ok "poddisruptionbudget/$PRODUCTION: $allowed disruption(s) allowed"
fi

# 6. The alerts that call for a rollback are loaded (Prometheus operator CRD).
if k get prometheusrule zaiproxy -o name >/dev/null 2>&1; then
  ok "prometheusrule/zaiproxy loaded"
else
  bad "prometheusrule/zaiproxy not found: the canary alerts are not loaded"
fi

if [ "$failures" -eq 0 ]; then
  echo "rollback readiness: READY"
  exit 0
fi
echo "rollback readiness: NOT READY ($failures problem(s))"
exit 1
