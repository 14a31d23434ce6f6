"""The Kubernetes manifests (k8s/): rendered, validated against the API schemas, and checked
for the properties the proxy depends on (probes, drain, writable paths, variants, services).

Rendering uses ``kubectl kustomize`` when kubectl is installed; otherwise ``render_fallback``
below, a small renderer of exactly the kustomize features k8s/ uses (it refuses any other, so
a manifest change cannot silently render differently). When both exist, the test
``test_fallback_renderer_matches_kubectl`` keeps them equal.

Non-CRD objects are validated with kubernetes-validate (offline schemas, strict: unknown
fields are errors). CRD kinds (ServiceMonitor, PrometheusRule, AnalysisTemplate) have no
schema there; their apiVersion, kind and required fields are checked by hand.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness import REPO
from zaiproxy.cli import build_parser
from zaiproxy.core.config import Config, ConfigError, load_config
from zaiproxy.request.admin_access import is_loopback, security_warnings

K8S = REPO / "k8s"
OVERLAYS = ("production", "canary")
KUBE_VERSION = "1.30"
KUBECTL = shutil.which("kubectl")
CRD_GROUPS = ("monitoring.coreos.com", "argoproj.io")
DUMMY_KEY = "zai-test-key-0123456789abcdef"
DUMMY_TOKEN = "admin-token-0123456789abcdef"

Obj = dict[str, Any]


# ---- the fallback renderer -------------------------------------------------------------

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "labels",
             "replicas", "images"}

# Where `labels: [{includeSelectors: true}]` writes, per kind (kustomize's commonLabels field
# specs for these kinds; paths that do not exist are only created where kustomize does).
_SELECTOR_PATHS: dict[str, list[tuple[tuple[str, ...], bool]]] = {
    "Service": [(("spec", "selector"), True)],
    "Deployment": [(("spec", "selector", "matchLabels"), True),
                   (("spec", "template", "metadata", "labels"), True)],
    "PodDisruptionBudget": [(("spec", "selector", "matchLabels"), False)],
}
_POD_AFFINITY = ("podAffinity", "podAntiAffinity")
_AFFINITY_LISTS = ("requiredDuringSchedulingIgnoredDuringExecution",
                   "preferredDuringSchedulingIgnoredDuringExecution")


class UnsupportedKustomization(Exception):
    pass


def _set_path(obj: Obj, path: tuple[str, ...], labels: dict[str, str], create: bool) -> None:
    node = obj
    for key in path:
        if key not in node:
            if not create:
                return
            node[key] = {}
        node = node[key]
    node.update(labels)


def _label_pod_selectors(pod_spec: Obj, labels: dict[str, str]) -> None:
    """kustomize also adds selector labels to the pod's (anti-)affinity terms and topology
    spread constraints, where they have matchLabels."""
    for kind in _POD_AFFINITY:
        for lst in _AFFINITY_LISTS:
            for term in pod_spec.get("affinity", {}).get(kind, {}).get(lst, []):
                term = term.get("podAffinityTerm", term)
                if "matchLabels" in term.get("labelSelector", {}):
                    term["labelSelector"]["matchLabels"].update(labels)
    for constraint in pod_spec.get("topologySpreadConstraints", []):
        if "matchLabels" in constraint.get("labelSelector", {}):
            constraint["labelSelector"]["matchLabels"].update(labels)


def render_fallback(directory: Path) -> list[Obj]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render_fallback(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    objects = copy.deepcopy(objects)

    if "namespace" in kust:
        for obj in objects:
            obj["metadata"]["namespace"] = kust["namespace"]
    if "nameSuffix" in kust:
        renamed = {}
        for obj in objects:
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = old + kust["nameSuffix"]
            renamed[(obj["kind"], old)] = obj["metadata"]["name"]
        # Name references: the only one k8s/ has is a Deployment's envFrom ConfigMap.
        for obj in objects:
            if obj["kind"] == "Deployment":
                for c in obj["spec"]["template"]["spec"]["containers"]:
                    for src in c.get("envFrom", []):
                        ref = src.get("configMapRef")
                        if ref and ("ConfigMap", ref["name"]) in renamed:
                            ref["name"] = renamed[("ConfigMap", ref["name"])]
    for spec in kust.get("labels", []):
        if set(spec) - {"pairs", "includeSelectors"}:
            raise UnsupportedKustomization(f"labels: {spec}")
        pairs = spec["pairs"]
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(pairs)
            if spec.get("includeSelectors"):
                for path, create in _SELECTOR_PATHS.get(obj["kind"], []):
                    _set_path(obj, path, pairs, create)
                if obj["kind"] == "Deployment":
                    _label_pod_selectors(obj["spec"]["template"]["spec"], pairs)
    for rep in kust.get("replicas", []):
        hits = [o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["name"] in (rep["name"], rep["name"] + kust.get("nameSuffix", ""))]
        assert len(hits) == 1, rep
        hits[0]["spec"]["replicas"] = rep["count"]
    for image in kust.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise UnsupportedKustomization(f"images: {image}")
        for obj in objects:
            if obj["kind"] != "Deployment":
                continue
            for c in obj["spec"]["template"]["spec"]["containers"]:
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objects


def render(directory: Path) -> list[Obj]:
    if KUBECTL is None:
        return render_fallback(directory)
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def argo() -> list[Obj]:
    return render(K8S / "argo")


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def deployment(objects: list[Obj]) -> Obj:
    found = list(by_kind(objects, "Deployment").values())
    assert len(found) == 1, found
    return found[0]


def container(objects: list[Obj]) -> Obj:
    containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "zaiproxy")


def configmap_env(objects: list[Obj]) -> dict[str, str]:
    maps = by_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    for src in container(objects).get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]]["data"])
    return env


SECRETS = {"zai-api-key": DUMMY_KEY, "admin-token": DUMMY_TOKEN}


def pod_env(objects: list[Obj], secrets: dict[str, str]) -> dict[str, str]:
    """The environment the kubelet would give the proxy: envFrom ConfigMaps, then env (label
    fieldRefs resolved against the pod template, Secret keys from ``secrets``; an optional
    key that is missing leaves the variable unset, as in Kubernetes)."""
    env = configmap_env(objects)
    labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    for var in container(objects).get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", source["fieldRef"]["fieldPath"])
            assert m, source
            env[var["name"]] = labels.get(m.group(1), "")
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["key"] in secrets:
                env[var["name"]] = secrets[ref["key"]]
            else:
                assert ref.get("optional") is True, f"{var['name']}: required key {ref['key']}"
        else:
            pytest.fail(f"unexpected env source {source}")
    return env


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A label selector: a Service's plain map, or matchLabels + matchExpressions."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def quantity(q: str) -> float:
    """A Kubernetes quantity (Mi, Gi, m, plain) as a float in base units."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|m|)", str(q))
    assert m, q
    return float(m.group(1)) * units[m.group(2)]


def is_crd(obj: Obj) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


# ---- rendering ---------------------------------------------------------------------------


def test_overlays_render_the_expected_objects(rendered):
    names = {overlay: sorted((o["kind"], o["metadata"]["name"]) for o in objs)
             for overlay, objs in rendered.items()}
    assert names["production"] == sorted([
        ("ConfigMap", "zaiproxy-production"), ("Deployment", "zaiproxy-production"),
        ("PodDisruptionBudget", "zaiproxy-production"), ("Service", "zaiproxy-production"),
        ("Service", "zaiproxy"), ("ServiceMonitor", "zaiproxy"), ("PrometheusRule", "zaiproxy"),
    ])
    # The canary owns nothing fleet-wide: deleting it leaves the split Service and monitoring.
    assert names["canary"] == sorted([
        ("ConfigMap", "zaiproxy-canary"), ("Deployment", "zaiproxy-canary"),
        ("PodDisruptionBudget", "zaiproxy-canary"), ("Service", "zaiproxy-canary"),
    ])
    for objs in rendered.values():
        assert {o["metadata"].get("namespace") for o in objs} == {"zaiproxy"}
        assert not by_kind(objs, "Secret"), "no secret values are shipped"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare with")
@pytest.mark.parametrize("directory", ["overlays/production", "overlays/canary", "argo", "base"])
def test_fallback_renderer_matches_kubectl(directory):
    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    expected = sorted(render(K8S / directory), key=key)
    assert sorted(render_fallback(K8S / directory), key=key) == expected


def test_fallback_renderer_refuses_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - path: patch.yaml\n")
    with pytest.raises(UnsupportedKustomization, match="patches"):
        render_fallback(tmp_path)


# ---- schemas -----------------------------------------------------------------------------


def test_non_crd_objects_validate_against_the_kubernetes_schema(rendered):
    checked = 0
    for objs in rendered.values():
        for obj in objs:
            if not is_crd(obj):
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                checked += 1
    assert checked == 9


def test_the_schema_validation_catches_mistakes(rendered):
    """The validator is strict: a misspelt field or a wrong type fails (so the test above
    can fail)."""
    broken = copy.deepcopy(deployment(rendered["canary"]))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)
    broken = copy.deepcopy(deployment(rendered["canary"]))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_crd_objects_have_their_required_fields(rendered):
    prod = rendered["production"]
    monitor = by_kind(prod, "ServiceMonitor")["zaiproxy"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] and monitor["spec"]["endpoints"]
    rule = by_kind(prod, "PrometheusRule")["zaiproxy"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for r in (r for g in groups for r in g["rules"]):
        assert ("record" in r) != ("alert" in r) and r["expr"], r
    assert [o["kind"] for o in prod if is_crd(o)] != []


# ---- the pod -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(rendered, overlay):
    c = container(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(configmap_env(rendered[overlay])["ZAIPROXY_PORT"])}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["port"] == "http" and startup["httpGet"]["path"] in ("/health", "/ready")
    # The startup budget covers the ~1 s start with room; liveness does not kill a slow start.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_prestop_plus_drain(rendered, overlay):
    objs = rendered[overlay]
    pod = deployment(objs)["spec"]["template"]["spec"]
    command = container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 1 <= int(command[1]) <= 15, command
    drain = float(configmap_env(objs).get("ZAIPROXY_DRAIN_TIMEOUT", Config().drain_timeout))
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_non_root_with_a_read_only_root(rendered, overlay):
    pod = deployment(rendered[overlay])["spec"]["template"]["spec"]
    c = container(rendered[overlay])
    ctx = {**pod["securityContext"], **c["securityContext"]}
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    # The image's USER (Dockerfile), so files it created (/var/lib/zaiproxy) are the pod's.
    user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert user and ctx["runAsUser"] == int(user.group(1))
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_the_proxy_writes_is_a_writable_volume(rendered, overlay):
    objs = rendered[overlay]
    volumes = {v["name"]: v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(objs)["volumeMounts"]
              if not m.get("readOnly")}
    config, _ = load_config(env=pod_env(objs, SECRETS))

    def volume_of(path: str) -> Obj | None:
        return next((v for mount, v in mounts.items()
                     if Path(path).is_relative_to(mount)), None)

    ledger = config.ledger_path or f"/dev/shm/zaiproxy-{config.port}"  # supervisor.py
    for path in (config.history_path, config.state_file, ledger, "/tmp/x"):
        assert path is not None and Path(path).is_absolute(), path
        volume = volume_of(path)
        assert volume is not None and ("emptyDir" in volume or "persistentVolumeClaim" in volume), path
    shm = volume_of(ledger)["emptyDir"]
    assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= 16 * 2**20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_a_secret(rendered, overlay):
    objs = rendered[overlay]
    env = {v["name"]: v for v in container(objs)["env"]}
    key = env["ZAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    token = env["ZAIPROXY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert key["name"] == token["name"] == "zaiproxy"
    # Both required: a pod bound to 0.0.0.0 must not run with an open admin API.
    assert key.get("optional", False) is False and token.get("optional", False) is False
    assert "value" not in env["ZAI_API_KEY"] and "value" not in env["ZAIPROXY_ADMIN_TOKEN"]
    secret_names = {"ZAI_API_KEY", "ZAIPROXY_ADMIN_TOKEN"}
    assert not secret_names & set(configmap_env(objs)), "secrets in the ConfigMap"
    with pytest.raises(AssertionError, match="required key admin-token"):
        pod_env(objs, {"zai-api-key": DUMMY_KEY})
    config, _ = load_config(env=pod_env(objs, SECRETS))
    assert config.api_key == DUMMY_KEY and config.admin_token == DUMMY_TOKEN
    assert not is_loopback(config.host)
    assert security_warnings(config.host, config.admin_token) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_env_is_a_valid_config_for_its_variant(rendered, overlay):
    objs = rendered[overlay]
    env = pod_env(objs, SECRETS)
    config, sources = load_config(env=env)
    assert config.deployment_variant == overlay
    assert sources["server.deployment_variant"] == "env:DEPLOYMENT_VARIANT"
    assert config.host == "0.0.0.0" and config.workers == int(env["ZAIPROXY_WORKERS"])
    assert config.demo is False


def test_service_links_would_break_the_config_so_they_are_off(rendered):
    """Kubernetes injects <SERVICE>_PORT=tcp://ip:port for every Service of the namespace;
    for the Service "zaiproxy" that is ZAIPROXY_PORT, which the proxy cannot parse."""
    objs = rendered["canary"]
    env = pod_env(objs, SECRETS)
    del env["ZAIPROXY_PORT"]  # the ConfigMap's would win; an operator may well remove it
    links = {"ZAIPROXY_PORT": "tcp://10.96.0.12:8080", "ZAIPROXY_SERVICE_HOST": "10.96.0.12",
             "ZAIPROXY_CANARY_SERVICE_PORT_HTTP": "8080"}
    with pytest.raises(ConfigError):
        load_config(env={**env, **links})
    for overlay in OVERLAYS:
        assert deployment(rendered[overlay])["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_fit_the_configured_workers(rendered, overlay):
    objs = rendered[overlay]
    res = container(objs)["resources"]
    workers = int(configmap_env(objs)["ZAIPROXY_WORKERS"])
    # README.md "Operating it": 58-69 MB per worker; recorder ~130 MB; supervisor ~50 MB.
    needed = (workers * 60 + 130 + 50) * 2**20
    assert quantity(res["requests"]["memory"]) >= needed
    volumes = deployment(objs)["spec"]["template"]["spec"]["volumes"]
    shm = next(v["emptyDir"] for v in volumes if v["emptyDir"].get("medium") == "Memory")
    # A memory-backed emptyDir is charged to the container's memory limit.
    assert quantity(res["limits"]["memory"]) >= needed + quantity(shm["sizeLimit"])
    assert quantity(res["requests"]["cpu"]) > 0
    assert quantity(res["limits"]["cpu"]) >= quantity(res["requests"]["cpu"])


def test_variants_differ_only_where_they_should(rendered):
    prod, canary = (deployment(rendered[o]) for o in OVERLAYS)
    assert prod["spec"]["replicas"] == 3 and canary["spec"]["replicas"] == 1
    # k8s/scripts/rollback-readiness.sh: rolling back must change the version.
    images = [container(rendered[o])["image"] for o in OVERLAYS]
    assert images[0] != images[1] and all(i.startswith("zaiproxy:") for i in images)
    for overlay in OVERLAYS:
        for obj in rendered[overlay]:
            if obj["metadata"]["name"] != "zaiproxy":  # the fleet-wide objects
                assert obj["metadata"]["labels"]["variant"] == overlay, obj["metadata"]
            assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "zaiproxy"
    a, b = (copy.deepcopy(d["spec"]["template"]["spec"]) for d in (prod, canary))
    for spec in (a, b):
        spec["containers"][0]["image"] = spec["containers"][0]["envFrom"] = None
    assert yaml.safe_dump(a).replace("production", "V") == yaml.safe_dump(b).replace("canary", "V")


# ---- services, PDB, ServiceMonitor --------------------------------------------------------


def pod_labels(objs: list[Obj]) -> dict[str, str]:
    return deployment(objs)["spec"]["template"]["metadata"]["labels"]


def test_services_select_their_variant_and_the_split_one_both(rendered):
    pods = {o: pod_labels(rendered[o]) for o in OVERLAYS}
    services = {**by_kind(rendered["production"], "Service"),
                **by_kind(rendered["canary"], "Service")}
    assert set(services) == {"zaiproxy", "zaiproxy-production", "zaiproxy-canary"}
    split = services["zaiproxy"]["spec"]["selector"]
    assert "variant" not in split and all(selects(split, p) for p in pods.values())
    for overlay in OVERLAYS:
        sel = services[f"zaiproxy-{overlay}"]["spec"]["selector"]
        assert {o for o, p in pods.items() if selects(sel, p)} == {overlay}
    for svc in services.values():
        assert [(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", "http")]
    for overlay in OVERLAYS:  # every selector of the Deployment matches its own pods
        assert selects(deployment(rendered[overlay])["spec"]["selector"], pods[overlay])


def test_each_overlay_has_a_pdb_for_its_own_pods_that_allows_a_drain(rendered):
    pods = {o: pod_labels(rendered[o]) for o in OVERLAYS}
    for overlay in OVERLAYS:
        pdbs = list(by_kind(rendered[overlay], "PodDisruptionBudget").values())
        assert len(pdbs) == 1
        spec = pdbs[0]["spec"]
        assert {o for o, p in pods.items() if selects(spec["selector"], p)} == {overlay}
        replicas = deployment(rendered[overlay])["spec"]["replicas"]
        if "maxUnavailable" in spec:
            assert 1 <= spec["maxUnavailable"] < max(replicas, 2)
        else:
            assert spec["minAvailable"] < replicas  # else a node drain blocks forever


def test_service_monitor_scrapes_each_variant_once_keeping_variant(rendered):
    monitor = by_kind(rendered["production"], "ServiceMonitor")["zaiproxy"]
    services = {**by_kind(rendered["production"], "Service"),
                **by_kind(rendered["canary"], "Service")}
    scraped = {name for name, svc in services.items()
               if selects(monitor["spec"]["selector"], svc["metadata"]["labels"])}
    assert scraped == {"zaiproxy-production", "zaiproxy-canary"}  # not the split one too
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    # The proxy's own `variant` label must reach Prometheus unrenamed and undropped.
    assert endpoint.get("honorLabels") is True or "variant" not in (
        monitor["spec"].get("targetLabels", []) + monitor["spec"].get("podTargetLabels", []))
    for relabel in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
        assert "variant" not in str(relabel), relabel
    assert "metadata" not in str(monitor["spec"].get("namespaceSelector", {}))


# ---- Argo Rollouts -----------------------------------------------------------------------


def analysis_job_metric(argo: list[Obj]) -> Obj:
    [template] = argo
    assert template["apiVersion"] == "argoproj.io/v1alpha1"
    assert template["kind"] == "AnalysisTemplate" and template["metadata"]["name"]
    [metric] = template["spec"]["metrics"]
    assert metric["name"] and set(metric["provider"]) == {"job"}
    return metric


def canary_check_command(metric: Obj) -> list[str]:
    [c] = metric["provider"]["job"]["spec"]["template"]["spec"]["containers"]
    return (c.get("command") or []) + (c.get("args") or [])


def test_analysis_template_runs_canary_check_as_a_job(argo):
    template = argo[0]
    metric = analysis_job_metric(argo)
    command = canary_check_command(metric)
    assert command[:2] == ["zaiproxy", "canary-check"]
    assert command[command.index("--window") + 1] == "10m"
    assert command[command.index("--prometheus") + 1] == "{{args.prometheus}}"
    declared = {a["name"] for a in template["spec"]["args"]}
    used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", str(metric)))
    assert used and used <= declared
    # A Job's verdict is its completion: conditions on a value do not apply to it.
    assert "successCondition" not in metric and "failureCondition" not in metric
    assert metric["failureLimit"] == 0  # one "roll back" verdict aborts the rollout
    if metric.get("count", 1) > 1:
        assert re.fullmatch(r"\d+[smh]", metric["interval"]), metric


def test_analysis_job_maps_exit_codes(argo):
    """0 -> Job complete (promote); 1 -> FailJob at once (roll back); 2 -> retried with
    back-off until backoffLimit (wait), never FailJob."""
    job = analysis_job_metric(argo)["provider"]["job"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = spec["podFailurePolicy"]["rules"]

    def action_for(code: int) -> str:
        for rule in rules:
            on = rule.get("onExitCodes")
            if on and (code in on["values"]) == (on["operator"] == "In"):
                assert on["containerName"] == pod["containers"][0]["name"]
                return rule["action"]
        return "Count"

    assert action_for(1) == "FailJob"
    assert action_for(2) == "Count" and spec["backoffLimit"] >= 3
    # The retries fit in the Job's deadline (back-off 10 s doubling, capped at 360 s).
    backoff = sum(min(10 * 2**i, 360) for i in range(spec["backoffLimit"]))
    assert spec["activeDeadlineSeconds"] > backoff
    # The embedded Job is a valid batch/v1 Job (Argo substitutes {{args.*}} first).
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job",
                                  "metadata": {"name": "check", **job.get("metadata", {})},
                                  "spec": spec}, KUBE_VERSION, strict=True)


def test_analysis_command_parses_with_the_real_cli(argo):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    if "canary-check" not in commands:
        pytest.skip("`zaiproxy canary-check` is not in this tree yet")
    command = canary_check_command(analysis_job_metric(argo))
    ns = parser.parse_args([a.replace("{{args.prometheus}}", "http://prom:9090")
                            for a in command[1:]])
    assert ns.command == "canary-check"


def iter_yaml(paths: list[Path]) -> Iterator[Obj]:
    for path in paths:
        yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def test_every_manifest_file_is_rendered_somewhere(rendered, argo):
    """A manifest file left out of every kustomization would never be applied."""
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"]
    keys = {(o["kind"], o["metadata"]["name"]) for objs in (*rendered.values(), argo)
            for o in objs}
    raw = [(o["kind"], o["metadata"]["name"]) for o in iter_yaml(files)]
    missing = {(k, n) for k, n in raw
               if (k, n) not in keys and not any((k, f"{n}-{v}") in keys for v in OVERLAYS)}
    assert not missing and len(raw) >= 8, (missing, raw)
