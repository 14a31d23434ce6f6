"""The Kubernetes manifests (k8s/): rendered, validated against the API schemas, and checked
for the properties the proxy depends on (probes, drain, writable paths, variants, services).

Rendering uses ``kubectl kustomize`` when kubectl is installed; otherwise ``render_fallback``
below, a small renderer of exactly the kustomize features k8s/ uses (it refuses any other, so
a manifest change cannot silently render differently). When both exist, the test
``test_fallback_renderer_matches_kubectl`` keeps them equal.

Non-CRD objects (the limits' Redis StatefulSet and NetworkPolicy included) are validated
with kubernetes-validate (offline schemas, strict: unknown fields are errors). CRD kinds
(ServiceMonitor, PrometheusRule, AnalysisTemplate) have no schema there; their apiVersion,
kind and required fields are checked by hand.
"""

from __future__ import annotations

import copy
import hashlib
import os
import posixpath
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.harness import REPO
from zaiproxy.cli import build_parser
from zaiproxy.core.config import Config, ConfigError, load_config
from zaiproxy.core.durations import parse_duration
from zaiproxy.limits.keys import load_keys
from zaiproxy.request.admin_access import is_loopback, security_warnings

# Run once, with h11: `make test`'s second run (h11-mypyc) is for what parses HTTP.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="manifests do not depend on the HTTP parser")

K8S = REPO / "k8s"
OVERLAYS = ("production", "canary")
KUBE_VERSION = "1.30"
KUBECTL = shutil.which("kubectl")
CRD_GROUPS = ("monitoring.coreos.com", "argoproj.io")
DUMMY_KEY = "zai-test-key-0123456789abcdef"
DUMMY_TOKEN = "admin-token-0123456789abcdef"
DUMMY_REDIS_PASSWORD = "redis-password-0123456789abcdef"
# The limits' Redis (k8s/base/redis): its StatefulSet, Service and NetworkPolicy, and the
# Secret with its password that the server and the proxies read.
REDIS = "zaiproxy-redis"

Obj = dict[str, Any]


# ---- the fallback renderer -------------------------------------------------------------

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "labels",
             "replicas", "images", "replacements"}
# An object with this annotation is an input of the build (a replacement's source), never part
# of its output: kustomize drops it at the end of the top-level build, unless the value is
# exactly "false" (a kustomization that includes another still sees the other's).
LOCAL_CONFIG = "config.kubernetes.io/local-config"

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


def _only(mapping: Obj, allowed: set[str], what: str) -> None:
    if not isinstance(mapping, dict) or set(mapping) - allowed:
        raise UnsupportedKustomization(f"{what}: {mapping}")


def _select(objects: list[Obj], kind: str, name: str, what: str) -> list[Obj]:
    """Objects by kind and *current* name. kustomize also matches a name an object had before
    a nameSuffix of an included kustomization renamed it; this renderer keeps no such history,
    so a selector that matches nothing by its current name is refused, not guessed."""
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if not hits:
        raise UnsupportedKustomization(f"{what}: no {kind} named {name}")
    return hits


def _field_nodes(node: Any, path: list[str]) -> list[tuple[Any, str | int]]:
    """The (parent, key) of every field a replacement path names. ``*`` is every element of a
    list, a number one element; a path that runs into a missing field yields nothing there
    (without ``create``, kustomize changes only fields that exist)."""
    if not path:
        return []
    head, rest = path[0], path[1:]
    if re.search(r"[\[\]=]", head):
        raise UnsupportedKustomization(f"replacement field path element {head!r}")
    keys: list[str | int]
    if isinstance(node, list):
        if head == "*":
            keys = list(range(len(node)))
        elif head.isdigit():
            keys = [int(head)] if int(head) < len(node) else []
        else:
            raise UnsupportedKustomization(f"{head!r} on a list")
    elif head == "*":
        raise UnsupportedKustomization("`*` on something that is not a list")
    elif isinstance(node, dict):
        keys = [head] if head in node else []
    else:
        keys = []
    if not rest:
        return [(node, k) for k in keys]
    return [hit for k in keys for hit in _field_nodes(node[k], rest)]


def _replace(objects: list[Obj], rep: Obj) -> None:
    """One entry of ``replacements``: a value from one object's field into fields of others.
    With ``options.delimiter`` the target (a string) is split on it and ``index`` replaces that
    part; an index < 0 puts the value in front (joined by the delimiter), an index past the
    last part after it (kustomize's filters/replacement)."""
    _only(rep, {"source", "targets"}, "replacements")
    source = rep["source"]
    _only(source, {"kind", "name", "fieldPath"}, "replacement source")
    found = _select(objects, source["kind"], source["name"], "replacement source")
    if len(found) != 1:
        raise ValueError(f"replacement source {source}: {len(found)} objects")
    hits = _field_nodes(found[0], source["fieldPath"].split("."))
    if len(hits) != 1:
        raise ValueError(f"replacement source {source}: fieldPath is missing")
    parent, key = hits[0]
    value = parent[key]
    for target in rep["targets"]:
        _only(target, {"select", "fieldPaths", "options"}, "replacement target")
        _only(target["select"], {"kind", "name"}, "replacement select")
        options = target.get("options", {})
        _only(options, {"delimiter", "index"}, "replacement options")
        for obj in _select(objects, target["select"]["kind"], target["select"]["name"],
                           "replacement target"):
            for field_path in target["fieldPaths"]:
                fields = _field_nodes(obj, field_path.split("."))
                if not fields:  # kustomize: "unable to find field … in replacement target"
                    raise ValueError(f"replacement target {obj['metadata']['name']}: "
                                     f"no field {field_path}")
                for parent, key in fields:
                    if "delimiter" not in options:
                        parent[key] = copy.deepcopy(value)
                        continue
                    delimiter, index = options["delimiter"], options.get("index", 0)
                    if not isinstance(parent[key], str) or not isinstance(value, str):
                        raise UnsupportedKustomization("a delimiter on a value that is no string")
                    parts = parent[key].split(delimiter)
                    if index < 0:
                        parts.insert(0, value)
                    elif index >= len(parts):
                        parts.append(value)
                    else:
                        parts[index] = value
                    parent[key] = delimiter.join(parts)


def is_local_config(obj: Obj) -> bool:
    annotations = obj["metadata"].get("annotations") or {}
    return LOCAL_CONFIG in annotations and annotations[LOCAL_CONFIG] != "false"


def render_fallback(directory: Path) -> list[Obj]:
    return [o for o in _render(directory) if not is_local_config(o)]


def _render(directory: Path) -> list[Obj]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += _render(path)
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
    # After the kustomization's other transformers, as kustomize runs them.
    for rep in kust.get("replacements", []):
        _replace(objects, rep)
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


# The client keys: the Secret "zaiproxy-keys", its key `keys.toml` mounted as the keys file.
KEYS = "zaiproxy-keys"
DUMMY_CLIENT_KEY = "zp-test-client-0123456789abcdef"
KEYS_TOML = ('[[keys]]\nalias = "ci-client"\n'
             f'key_sha256 = "{hashlib.sha256(DUMMY_CLIENT_KEY.encode()).hexdigest()}"\n')
# Secret name -> key -> value: what the operator creates (k8s/README.md).
SECRETS = {"zaiproxy": {"zai-api-key": DUMMY_KEY, "admin-token": DUMMY_TOKEN},
           REDIS: {"password": DUMMY_REDIS_PASSWORD},
           KEYS: {"keys.toml": KEYS_TOML}}


def container_env(objects: list[Obj], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the kubelet would give the proxy: envFrom ConfigMaps, then env (label
    fieldRefs resolved against the pod template, Secret keys from ``secrets``; an optional
    key that is missing is skipped, as in Kubernetes: the variable keeps the value envFrom
    gave it, or stays unset)."""
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
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is not None:
                env[var["name"]] = value
            else:
                assert ref.get("optional") is True, (
                    f"{var['name']}: required key {ref['key']} of Secret {ref['name']}")
        else:
            pytest.fail(f"unexpected env source {source}")
    return env


def secret_mounts(objects: list[Obj]) -> dict[str, Obj]:
    """The proxy container's Secret volumes: mountPath -> (the mount, the volume's ``secret``)."""
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: {"mount": m, "secret": volumes[m["name"]]["secret"]}
            for m in container(objects).get("volumeMounts", [])
            if "secret" in volumes[m["name"]]}


def secret_files(objects: list[Obj], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The files the kubelet mounts into the proxy container from Secrets, by their path in
    the container: the volume's ``items`` (key -> path), or else one file per key. A missing
    Secret, or a missing key an item names, keeps the pod from starting (it waits in
    ContainerCreating) unless the volume is ``optional``: an AssertionError here."""
    files: dict[str, str] = {}
    for mount_path, found in secret_mounts(objects).items():
        mount, source = found["mount"], found["secret"]
        # A subPath mount is a copy the kubelet never updates; this harness does not model it.
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
        name, optional = source["secretName"], source.get("optional") is True
        data = secrets.get(name)
        if data is None:
            assert optional, f"required Secret {name} (volume {mount['name']})"
            continue
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                assert optional, f"required key {item['key']} of Secret {name}"
                continue
            files[posixpath.join(mount_path, item["path"])] = data[item["key"]]
    return files


def pod_env(objects: list[Obj], secrets: dict[str, dict[str, str]], root: Path) -> dict[str, str]:
    """``container_env``, ready for ``load_config`` here: the files the pod mounts from
    Secrets (``secret_files``) are written under ``root`` (at root/<path in the container>),
    and every variable naming a path inside such a mount is pointed there. The config's checks
    (a keys file must exist) then see what the pod would see: a file the mount does not
    provide is missing here too."""
    env = container_env(objects, secrets)
    for path, content in secret_files(objects, secrets).items():
        local = root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content)
    mounts = list(secret_mounts(objects))
    for name, value in env.items():
        if value.startswith("/") and any(Path(value).is_relative_to(m) for m in mounts):
            env[name] = str(root / value.lstrip("/"))
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
        ("StatefulSet", REDIS), ("Service", REDIS), ("NetworkPolicy", REDIS),
    ])
    # The canary owns nothing fleet-wide: deleting it leaves the split Service, monitoring and
    # the limits' Redis (which both variants use: one server, applied once).
    assert names["canary"] == sorted([
        ("ConfigMap", "zaiproxy-canary"), ("Deployment", "zaiproxy-canary"),
        ("PodDisruptionBudget", "zaiproxy-canary"), ("Service", "zaiproxy-canary"),
    ])
    for objs in rendered.values():
        assert {o["metadata"].get("namespace") for o in objs} == {"zaiproxy"}
        assert not by_kind(objs, "Secret"), "no secret values are shipped"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare with")
@pytest.mark.parametrize("directory", ["overlays/production", "overlays/canary", "argo", "base",
                                       "base/redis"])
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


def write_kustomization(directory: Path, kustomization: Obj, objects: list[Obj]) -> None:
    directory.mkdir(parents=True)
    (directory / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["objects.yaml"], **kustomization}))


def replacement_fixture(tmp_path: Path, targets: list[Obj]) -> Path:
    """A local-config ConfigMap and a rule-like object in child/, the replacements in parent/
    (which sees the child's local-config objects; the output of neither has them)."""
    setting = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "setting", "annotations": {LOCAL_CONFIG: "true"}},
               "data": {"base": "https://runbooks.example/r", "word": "new"}}
    kept = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kept", "annotations": {LOCAL_CONFIG: "false"}},
            "data": {"x": "y"}}
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "rules"},
            "spec": {"groups": [
                {"name": "a", "rules": [
                    {"record": "r1", "expr": "1"},
                    {"alert": "A1", "expr": "1", "annotations": {"url": "docs/x.md#a1",
                                                                 "tag": "one#two"}}]},
                {"name": "b", "rules": [
                    {"alert": "B1", "expr": "1", "annotations": {"url": "docs/x.md#b1",
                                                                 "tag": "three"}}]}]}}
    write_kustomization(tmp_path / "child", {}, [setting, kept, rule])
    write_kustomization(tmp_path / "parent", {"replacements": [
        {"source": {"kind": "ConfigMap", "name": "setting", "fieldPath": f"data.{field}"},
         "targets": [{"select": {"kind": "PrometheusRule", "name": "rules"}, **target}]}
        for field, target in targets]}, [])
    kust = yaml.safe_load((tmp_path / "parent" / "kustomization.yaml").read_text())
    kust["resources"] = ["../child"]
    (tmp_path / "parent" / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    return tmp_path / "parent"


def test_fallback_renderer_replacements_and_local_config(tmp_path):
    parent = replacement_fixture(tmp_path, [
        ("base", {"fieldPaths": ["spec.groups.*.rules.*.annotations.url"],
                  "options": {"delimiter": "/", "index": -1}}),   # in front
        ("word", {"fieldPaths": ["spec.groups.*.rules.*.annotations.tag"],
                  "options": {"delimiter": "#", "index": 0}}),    # one part
        ("word", {"fieldPaths": ["spec.groups.1.rules.0.annotations.tag"],
                  "options": {"delimiter": "#", "index": 5}}),    # past the end: after it
        ("word", {"fieldPaths": ["spec.groups.0.name"]}),         # the whole value
    ])
    objs = render_fallback(parent)
    assert sorted(o["metadata"]["name"] for o in objs) == ["kept", "rules"]
    [rule] = [o for o in objs if o["kind"] == "PrometheusRule"]
    groups = rule["spec"]["groups"]
    assert groups[0]["name"] == "new" and groups[0]["rules"][0] == {"record": "r1", "expr": "1"}
    assert groups[0]["rules"][1]["annotations"] == {"url": "https://runbooks.example/r/docs/x.md#a1",
                                                    "tag": "new#two"}
    assert groups[1]["rules"][0]["annotations"] == {"url": "https://runbooks.example/r/docs/x.md#b1",
                                                    "tag": "new#new"}
    assert [o["metadata"]["name"] for o in render_fallback(tmp_path / "child")] == ["kept", "rules"]
    if KUBECTL is not None:
        assert sorted(render(parent), key=str) == sorted(objs, key=str)
        assert sorted(render(tmp_path / "child"), key=str) == sorted(
            render_fallback(tmp_path / "child"), key=str)


def test_fallback_renderer_fails_on_a_replacement_that_finds_no_field(tmp_path):
    parent = replacement_fixture(tmp_path, [
        ("base", {"fieldPaths": ["spec.groups.*.rules.*.labels.url"]})])
    with pytest.raises(ValueError, match="no field"):
        render_fallback(parent)
    if KUBECTL is not None:
        with pytest.raises(subprocess.CalledProcessError):
            render(parent)


@pytest.mark.parametrize("target", [
    {"fieldPaths": ["spec.groups.[name=a].name"]},
    {"fieldPaths": ["spec.groups.0.name"], "options": {"create": True}},
    {"fieldPaths": ["spec.groups.0.name"], "reject": [{"kind": "ConfigMap"}]},
])
def test_fallback_renderer_refuses_replacement_features_it_does_not_implement(tmp_path, target):
    with pytest.raises(UnsupportedKustomization):
        render_fallback(replacement_fixture(tmp_path, [("word", target)]))


# ---- schemas -----------------------------------------------------------------------------


def test_non_crd_objects_validate_against_the_kubernetes_schema(rendered):
    checked = 0
    for objs in rendered.values():
        for obj in objs:
            if not is_crd(obj):
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                checked += 1
    assert checked == 12


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
def test_every_path_the_proxy_writes_is_a_writable_volume(rendered, overlay, tmp_path):
    objs = rendered[overlay]
    volumes = {v["name"]: v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(objs)["volumeMounts"]
              if not m.get("readOnly")}
    config, _ = load_config(env=pod_env(objs, SECRETS, tmp_path))

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
def test_secrets_come_from_a_secret(rendered, overlay, tmp_path):
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
        pod_env(objs, {**SECRETS, "zaiproxy": {"zai-api-key": DUMMY_KEY}}, tmp_path)
    config, _ = load_config(env=pod_env(objs, SECRETS, tmp_path))
    assert config.api_key == DUMMY_KEY and config.admin_token == DUMMY_TOKEN
    assert not is_loopback(config.host)
    assert security_warnings(config.host, config.admin_token) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_env_is_a_valid_config_for_its_variant(rendered, overlay, tmp_path):
    objs = rendered[overlay]
    env = pod_env(objs, SECRETS, tmp_path)
    config, sources = load_config(env=env)
    assert config.deployment_variant == overlay
    assert sources["server.deployment_variant"] == "env:DEPLOYMENT_VARIANT"
    assert config.host == "0.0.0.0" and config.workers == int(env["ZAIPROXY_WORKERS"])
    assert config.demo is False


def test_service_links_would_break_the_config_so_they_are_off(rendered, tmp_path):
    """Kubernetes injects <SERVICE>_PORT=tcp://ip:port for every Service of the namespace;
    for the Service "zaiproxy" that is ZAIPROXY_PORT, which the proxy cannot parse."""
    objs = rendered["canary"]
    env = pod_env(objs, SECRETS, tmp_path)
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
    shm = next(v["emptyDir"] for v in volumes if v.get("emptyDir", {}).get("medium") == "Memory")
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
            labels = obj["metadata"]["labels"]
            if obj["metadata"]["name"] not in ("zaiproxy", REDIS):  # the fleet-wide objects
                assert labels["variant"] == overlay, obj["metadata"]
            else:
                assert "variant" not in labels, obj["metadata"]
            if obj["metadata"]["name"] == REDIS:  # Valkey, a part of zaiproxy
                assert labels["app.kubernetes.io/part-of"] == "zaiproxy"
            else:
                assert labels["app.kubernetes.io/name"] == "zaiproxy"
    a, b = (copy.deepcopy(d["spec"]["template"]["spec"]) for d in (prod, canary))
    for spec in (a, b):
        spec["containers"][0]["image"] = spec["containers"][0]["envFrom"] = None
    assert yaml.safe_dump(a).replace("production", "V") == yaml.safe_dump(b).replace("canary", "V")


# ---- the client keys file ------------------------------------------------------------------


def keys_env_path(objs: list[Obj]) -> str:
    env = {v["name"]: v for v in container(objs)["env"]}
    assert set(env["ZAIPROXY_KEYS_FILE"]) == {"name", "value"}, "a literal path"
    path: str = env["ZAIPROXY_KEYS_FILE"]["value"]
    return path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_keys_file_is_a_secret_mounted_read_only_where_the_variable_points(rendered, overlay):
    objs = rendered[overlay]
    pod = deployment(objs)["spec"]["template"]["spec"]
    path = PurePosixPath(keys_env_path(objs))
    assert path.is_absolute() and "ZAIPROXY_KEYS_FILE" not in configmap_env(objs)
    # The path lies in exactly one mount, a Secret volume of the Secret zaiproxy-keys.
    holders = [m for m in (c["mountPath"] for c in container(objs)["volumeMounts"])
               if path.is_relative_to(m)]
    assert len(holders) == 1, holders
    found = secret_mounts(objs)[holders[0]]
    mount, source = found["mount"], found["secret"]
    assert mount["readOnly"] is True
    # The whole directory, so the kubelet's updates of the Secret reach the file.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert source["secretName"] == KEYS
    # The file the variable names is the volume's one item: the Secret's key of that name.
    relative = path.relative_to(holders[0]).as_posix()
    assert source["items"] == [{"key": path.name, "path": relative}] and path.name == "keys.toml"
    assert set(secret_files(objs, SECRETS)) == {str(path)}
    # Readable by the pod's group only (a Secret volume's files belong to fsGroup), by nobody
    # else, writable by nobody; the proxy runs with that group.
    mode = source["defaultMode"]
    assert mode & 0o040 and not mode & 0o007 and not mode & 0o222, oct(mode)
    ctx = pod["securityContext"]
    assert ctx["fsGroup"] == ctx["runAsGroup"]
    # Not a path the proxy writes (the writable volumes are elsewhere).
    writable = [m["mountPath"] for m in container(objs)["volumeMounts"] if not m.get("readOnly")]
    assert not [m for m in writable if path.is_relative_to(m)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_keys_secret_is_required_and_the_proxy_loads_the_mounted_file(rendered, overlay,
                                                                          tmp_path):
    """Required: without the Secret, or its key keys.toml, the pod does not start (it waits
    in ContainerCreating) rather than run open; with them the proxy loads that file."""
    objs = rendered[overlay]
    source = secret_mounts(objs)[str(PurePosixPath(keys_env_path(objs)).parent)]["secret"]
    assert source.get("optional", False) is False
    with pytest.raises(AssertionError, match=f"required Secret {KEYS}"):
        pod_env(objs, {n: v for n, v in SECRETS.items() if n != KEYS}, tmp_path)
    with pytest.raises(AssertionError, match=f"required key keys.toml of Secret {KEYS}"):
        pod_env(objs, {**SECRETS, KEYS: {"keys": KEYS_TOML}}, tmp_path)
    config, sources = load_config(env=pod_env(objs, SECRETS, tmp_path))
    assert sources["auth.keys_file"] == "env:ZAIPROXY_KEYS_FILE"
    assert config.keys_file == str(tmp_path / keys_env_path(objs).lstrip("/"))
    table = load_keys(config.keys_file)
    assert table.aliases == ("ci-client",)
    assert table.lookup(DUMMY_CLIENT_KEY.encode()) is not None
    # The harness is faithful: a variable naming a file the mount does not provide fails the
    # configuration here, as the proxy would fail to start in the pod.
    broken = copy.deepcopy(objs)
    for var in container(broken)["env"]:
        if var["name"] == "ZAIPROXY_KEYS_FILE":
            var["value"] = var["value"].replace("keys.toml", "other.toml")
    with pytest.raises(ConfigError, match="ZAIPROXY_KEYS_FILE"):
        load_config(env=pod_env(broken, SECRETS, tmp_path / "broken"))


def test_the_keys_file_example_of_the_k8s_readme_is_valid(tmp_path):
    [example] = re.findall(r"```toml\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    (tmp_path / "keys.toml").write_text(example)
    table = load_keys(tmp_path / "keys.toml")
    assert len(table) == 1 and "key_sha256" in example  # digests: no client secret in it


# ---- the alerts' runbook links -------------------------------------------------------------


RUNBOOK = REPO / "docs" / "operations" / "canary.md"
RUNBOOK_SETTING = K8S / "overlays" / "production" / "runbook.yaml"


def github_anchor(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor of a Markdown heading: lower case, every character but letters, digits,
    `_`, `-` and spaces dropped, spaces turned into `-`; a repeated one gets -1, -2, …"""
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen.get(anchor, 0)
    seen[anchor] = n + 1
    return anchor if n == 0 else f"{anchor}-{n}"


def runbook_anchors() -> set[str]:
    text = re.sub(r"```.*?```", "", RUNBOOK.read_text(), flags=re.S)  # no headings in code
    seen: dict[str, int] = {}
    return {github_anchor(h, seen) for h in re.findall(r"^#{1,6} +(.+?)[ #]*$", text, re.M)}


def runbook_base_url(directory: Path = K8S / "overlays" / "production") -> str:
    [setting] = [o for o in iter_yaml([directory / "runbook.yaml"])]
    assert is_local_config(setting)
    base: str = setting["data"]["runbook_base_url"]
    return base


def alert_rules(objs: list[Obj]) -> list[Obj]:
    rule = by_kind(objs, "PrometheusRule")["zaiproxy"]
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def test_github_anchors_are_computed_like_github():
    seen: dict[str, int] = {}
    assert github_anchor("ZaiProxyCanaryHighErrorRate", seen) == "zaiproxycanaryhigherrorrate"
    assert github_anchor("Canary deployments: deploy, watch", seen) == "canary-deployments-deploy-watch"
    assert github_anchor("Alert links: runbook_base_url", seen) == "alert-links-runbook_base_url"
    assert github_anchor("ZaiProxyCanaryHighErrorRate", seen) == "zaiproxycanaryhigherrorrate-1"


def test_every_alert_links_to_its_runbook_section_by_an_absolute_url(rendered):
    base = runbook_base_url()
    parts = urlsplit(base)
    assert parts.scheme == "https" and parts.netloc, base
    assert not (parts.query or parts.fragment or base.endswith("/")), base
    anchors = runbook_anchors()
    alerts = alert_rules(rendered["production"])
    assert len(alerts) >= 10
    page = f"{base}/{RUNBOOK.relative_to(REPO).as_posix()}"
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("https://"), url
        assert url.partition("#")[0] == page, url
        anchor = url.partition("#")[2]
        assert anchor == alert["alert"].lower() and anchor in anchors, url
    # The replacement touches the alerts only: the recording rules get no annotations.
    rule = by_kind(rendered["production"], "PrometheusRule")["zaiproxy"]
    assert not [r for g in rule["spec"]["groups"] for r in g["rules"]
                if "record" in r and "annotations" in r]
    # Rendered alone, base keeps the repository path (tests/test_alerts.py checks that form).
    for alert in alert_rules(render(K8S / "base")):
        assert alert["annotations"]["runbook_url"] == (
            f"{RUNBOOK.relative_to(REPO).as_posix()}#{alert['alert'].lower()}")


def test_the_runbook_base_url_is_one_setting(tmp_path):
    """Changing runbook.yaml alone changes every alert's link (and nothing else)."""
    copy_of_k8s = tmp_path / "k8s"
    shutil.copytree(K8S, copy_of_k8s)
    setting = copy_of_k8s / "overlays" / "production" / "runbook.yaml"
    other = "https://docs.internal.example/ops/zaiproxy/tree/v9.9.9"
    setting.write_text(setting.read_text().replace(runbook_base_url(), other))
    before = render(K8S / "overlays" / "production")
    after = render(copy_of_k8s / "overlays" / "production")
    for alert in alert_rules(after):
        assert alert["annotations"]["runbook_url"].startswith(f"{other}/docs/operations/canary.md#")

    def without_links(objs: list[Obj]) -> list[Obj]:
        objs = copy.deepcopy(objs)
        for alert in alert_rules(objs):
            del alert["annotations"]["runbook_url"]
        return objs

    assert without_links(before) == without_links(after)


# ---- the runbook keeps the canary's history ------------------------------------------------


def runbook_section(title: str) -> str:
    return RUNBOOK.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def sh_lines(text: str) -> list[str]:
    """The command lines of a text's ``sh`` blocks (continuations joined, comments dropped)."""
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    return lines


def test_the_runbook_exports_the_canarys_history_before_scaling_it_to_zero(rendered, tmp_path):
    objs = rendered["canary"]
    config, _ = load_config(env=pod_env(objs, SECRETS, tmp_path))
    # The history file is on an emptyDir: deleting the pod (scaling to 0) deletes it.
    volumes = {v["name"]: v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    [holder] = [m for m in container(objs)["volumeMounts"]
                if Path(config.history_path).is_relative_to(m["mountPath"])]
    assert "emptyDir" in volumes[holder["name"]]
    lines = sh_lines(runbook_section("Roll back"))
    exports = [i for i, line in enumerate(lines) if " -- zaiproxy history " in line]
    scales = [i for i, line in enumerate(lines)
              if re.search(r"scale deployment/zaiproxy-canary --replicas=0\b", line)]
    assert exports and scales and max(exports) < min(scales), lines
    canary = deployment(objs)["metadata"]["name"]
    for i in exports:
        argv = shlex.split(lines[i])
        redirect = argv[argv.index(">") + 1] if ">" in argv else None
        argv = argv[:argv.index(">")] if redirect else argv
        kubectl, inside = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        assert kubectl[:3] == ["kubectl", "-n", deployment(objs)["metadata"]["namespace"]]
        assert "exec" in kubectl and f"deployment/{canary}" in kubectl
        # What runs in the pod parses with the real CLI, exports Parquet, covers every raw row
        # the pod keeps, and lands on the operator's machine.
        assert inside[0] == "zaiproxy"
        ns = build_parser().parse_args(inside[1:])
        assert ns.command == "history" and ns.export[0] == "parquet"
        assert parse_duration(ns.range) >= config.history_raw_days * 86400
        assert ns.export[1] == "/dev/stdout" and redirect and not redirect.startswith("/dev/")
    # Promoting deletes the canary's pods too: the runbook says to export before that.
    promote = runbook_section("Promote")
    assert promote.index("export") < promote.index("kubectl delete -k k8s/overlays/canary")


# ---- services, PDB, ServiceMonitor --------------------------------------------------------


def pod_labels(objs: list[Obj]) -> dict[str, str]:
    return deployment(objs)["spec"]["template"]["metadata"]["labels"]


def test_services_select_their_variant_and_the_split_one_both(rendered):
    pods = {o: pod_labels(rendered[o]) for o in OVERLAYS}
    services = {**by_kind(rendered["production"], "Service"),
                **by_kind(rendered["canary"], "Service")}
    del services[REDIS]  # not the proxy's: test_redis_pods_are_apart_from_every_proxy_selector
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


# ---- the canary's variant name ---------------------------------------------------------
# One line of k8s/overlays/canary/kustomization.yaml names the canary's variant; the original
# service's runbook called it "test". Rendered from a copy of the overlay with that line
# changed, as an operator changes it.

CANARY_LINE = "variant: canary  # the canary's variant name"


def canary_overlay_named(name: str, directory: Path) -> list[Obj]:
    """k8s/overlays/canary with its variant line set to ``name``, rendered from ``directory``
    (its resource path made relative to there: kustomize refuses an absolute one)."""
    overlay = K8S / "overlays" / "canary"
    text = (overlay / "kustomization.yaml").read_text()
    assert text.count(CANARY_LINE) == 1
    assert yaml.safe_load(text)["labels"] == [{"pairs": {"variant": "canary"},
                                                "includeSelectors": True}]
    base = posixpath.relpath((K8S / "base" / "variant").as_posix(), directory.as_posix())
    assert text.count("../../base/variant") == 1
    text = text.replace(CANARY_LINE, f"variant: {name}  # renamed").replace(
        "../../base/variant", base)
    (directory / "kustomization.yaml").write_text(text)
    return render(directory)


def relabelled(objs: list[Obj], old: str, new: str) -> list[Obj]:
    """``objs`` with every ``variant: old`` (labels and selectors) set to ``new``."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: new if k == "variant" and v == old else walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return [walk(o) for o in objs]


@pytest.mark.parametrize("name", ["test", "v2"])
def test_the_canary_variant_is_named_in_one_place(rendered, name, tmp_path):
    """Only the `variant` label and the selectors change: names, images, replicas and the
    environment stay the canary's, and the pod's DEPLOYMENT_VARIANT is the new name."""
    objs = canary_overlay_named(name, tmp_path)

    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(objs, key=key) == sorted(relabelled(rendered["canary"], "canary", name),
                                           key=key)
    assert sorted(render_fallback(tmp_path), key=key) == sorted(objs, key=key)
    config, sources = load_config(env=pod_env(objs, SECRETS, tmp_path))
    assert config.deployment_variant == name
    assert sources["server.deployment_variant"] == "env:DEPLOYMENT_VARIANT"
    assert deployment(objs)["metadata"]["name"] == "zaiproxy-canary"  # the alerts' and scripts'


def test_a_canary_named_test_is_served_scraped_and_admitted(rendered, tmp_path):
    """The split Service, the canary's own Service, its PDB, the ServiceMonitor and the limits'
    Redis NetworkPolicy all take pods labelled variant=test as they took variant=canary."""
    objs = canary_overlay_named("test", tmp_path)
    pod = pod_labels(objs)
    assert pod["variant"] == "test"
    prod = rendered["production"]
    services = by_kind(prod, "Service") | by_kind(objs, "Service")
    assert selects(services["zaiproxy"]["spec"]["selector"], pod)  # the split one
    assert selects(services["zaiproxy-canary"]["spec"]["selector"], pod)
    assert not selects(services["zaiproxy-production"]["spec"]["selector"], pod)
    assert not selects(services["zaiproxy-canary"]["spec"]["selector"], pod_labels(prod))
    [pdb] = by_kind(objs, "PodDisruptionBudget").values()
    assert selects(pdb["spec"]["selector"], pod)
    monitor = by_kind(prod, "ServiceMonitor")["zaiproxy"]
    assert selects(monitor["spec"]["selector"], services["zaiproxy-canary"]["metadata"]["labels"])
    _, _, policy = redis_objects(prod)
    [rule] = policy["spec"]["ingress"]
    assert any(selects(peer["podSelector"], pod) for peer in rule["from"])


def test_the_alert_rules_take_any_variant_but_production_as_the_canary(rendered):
    """No expression of the shipped rules names a canary variant (promtool runs them with
    `test` and two canaries: tests/alerts/canary_names.yaml)."""
    [rule] = by_kind(rendered["production"], "PrometheusRule").values()
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    matchers = {m for e in exprs for m in re.findall(r'variant\s*(=~|!~|!=|=)\s*"([^"]*)"', e)}
    assert matchers == {("=", "production"), ("!=", "production")}
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            assert r.get("labels", {}).get("variant") is None, r.get("alert")


def test_the_analysis_job_finds_the_canary_by_any_name(argo):
    """No --canary: canary-check takes the one variant besides production (a canary
    overlay renamed to `test` needs no change here)."""
    command = canary_check_command(analysis_job_metric(argo))
    assert "--canary" not in command and "--production" not in command
    ns = build_parser().parse_args([a.replace("{{args.prometheus}}", "http://prom:9090")
                                    for a in command[1:]])
    assert (ns.production, ns.canary) == ("production", None)


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


# ---- the limits' Redis -------------------------------------------------------------------


def redis_objects(objs: list[Obj]) -> tuple[Obj, Obj, Obj]:
    """The limits' Redis: its StatefulSet, Service and NetworkPolicy."""
    return tuple(by_kind(objs, kind)[REDIS] for kind in ("StatefulSet", "Service", "NetworkPolicy"))


def redis_container(objs: list[Obj]) -> Obj:
    [c] = redis_objects(objs)[0]["spec"]["template"]["spec"]["containers"]
    return c


def redis_pod_labels(objs: list[Obj]) -> dict[str, str]:
    return redis_objects(objs)[0]["spec"]["template"]["metadata"]["labels"]


def test_the_limits_redis_is_one_server_for_both_variants(rendered):
    """Applied once, with the fleet-wide objects of production; the canary owns no part of it
    (so deleting the canary keeps it) and reaches the same server."""
    prod = rendered["production"]
    assert REDIS not in by_kind(rendered["canary"], "StatefulSet")
    assert REDIS not in by_kind(rendered["canary"], "Service")
    assert REDIS not in by_kind(rendered["canary"], "NetworkPolicy")
    sts, svc, policy = redis_objects(prod)
    # k8s/base renders the same objects (production takes them from there, unchanged).
    base = {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "base")}
    for obj in (sts, svc, policy):
        assert base[(obj["kind"], REDIS)] == obj
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == REDIS
    assert selects(sts["spec"]["selector"], redis_pod_labels(prod))
    # The Service sends its port to the server's port.
    [port] = svc["spec"]["ports"]
    [container_port] = redis_container(prod)["ports"]
    assert port["port"] == container_port["containerPort"] == 6379
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert selects(svc["spec"]["selector"], redis_pod_labels(prod))
    for overlay in OVERLAYS:  # the proxies' namespace: the Service's short name resolves there
        namespace = deployment(rendered[overlay])["metadata"]["namespace"]
        assert namespace == svc["metadata"]["namespace"]


def test_redis_pods_are_apart_from_every_proxy_selector(rendered, argo):
    """Redis pods must never get proxy traffic (split or variant Services), count in a proxy
    PDB or spread constraint, or be scraped as a proxy; and the Redis Service selects Redis."""
    redis_pod = redis_pod_labels(rendered["production"])
    services = {**by_kind(rendered["production"], "Service"),
                **by_kind(rendered["canary"], "Service")}
    selectors = [svc["spec"]["selector"] for name, svc in services.items() if name != REDIS]
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        pod = deployment(objs)["spec"]["template"]["spec"]
        selectors.append(deployment(objs)["spec"]["selector"])
        selectors += [p["spec"]["selector"] for p in by_kind(objs, "PodDisruptionBudget").values()]
        selectors += [t["labelSelector"] for t in pod["topologySpreadConstraints"]]
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        selectors += [t["podAffinityTerm"]["labelSelector"] for t in anti]
    assert len(selectors) >= 10
    assert not [s for s in selectors if selects(s, redis_pod)]
    redis_svc = services[REDIS]
    assert not [o for o in OVERLAYS
                if selects(redis_svc["spec"]["selector"], pod_labels(rendered[o]))]
    monitor = by_kind(rendered["production"], "ServiceMonitor")["zaiproxy"]
    assert not selects(monitor["spec"]["selector"], redis_svc["metadata"]["labels"])
    job = analysis_job_metric(argo)["provider"]["job"]
    assert not selects(redis_svc["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])


def test_redis_network_policy_admits_the_proxy_pods_of_both_variants_only(rendered, argo):
    prod = rendered["production"]
    _, svc, policy = redis_objects(prod)
    redis_pod = redis_pod_labels(prod)
    proxies = {o: pod_labels(rendered[o]) for o in OVERLAYS}
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == svc["metadata"]["namespace"]
    # It applies to the Redis pods, and to no proxy pod.
    assert selects(spec["podSelector"], redis_pod)
    assert not [o for o, p in proxies.items() if selects(spec["podSelector"], p)]
    assert "Ingress" in spec["policyTypes"]
    [rule] = spec["ingress"]
    # Pods of this namespace only: no namespaceSelector, no ipBlock.
    peers = rule["from"]
    assert peers and all(set(peer) == {"podSelector"} for peer in peers), peers

    def admitted(labels: dict[str, str]) -> bool:
        return any(selects(peer["podSelector"], labels) for peer in peers)

    assert {o for o, p in proxies.items() if admitted(p)} == set(OVERLAYS)
    # Not the analysis Job's pods (they run a zaiproxy image, but are no proxy), not Redis.
    job = analysis_job_metric(argo)["provider"]["job"]
    assert not admitted(job["spec"]["template"]["metadata"]["labels"])
    assert not admitted(redis_pod)
    assert not admitted({"app.kubernetes.io/name": "something-else"})
    # The server's port only, the one the Service sends to.
    assert rule["ports"] == [{"port": svc["spec"]["ports"][0]["port"], "protocol": "TCP"}]
    assert rule["ports"][0]["port"] == 6379
    # Redis opens no connection of its own.
    if "Egress" in spec["policyTypes"]:
        assert not spec.get("egress")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_proxy_pods_keep_their_limits_in_the_fleet_redis(rendered, overlay, tmp_path):
    objs = rendered[overlay]
    config, sources = load_config(env=pod_env(objs, SECRETS, tmp_path))
    assert config.limits_backend == "redis"
    _, svc, _ = redis_objects(rendered["production"])
    url = urlsplit(config.redis_url)
    assert url.scheme == "redis" and url.hostname == svc["metadata"]["name"]
    assert url.port == svc["spec"]["ports"][0]["port"] and url.path == "/0"
    # The password comes from the Secret, never from the URL (a ConfigMap value) or a literal.
    assert url.username is None and url.password is None
    assert config.redis_password == DUMMY_REDIS_PASSWORD
    assert sources["limits.redis_password"] == "env:ZAIPROXY_REDIS_PASSWORD"
    env = {v["name"]: v for v in container(objs)["env"]}
    password = env["ZAIPROXY_REDIS_PASSWORD"]
    assert "value" not in password
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref == {"name": REDIS, "key": "password"}  # required (no `optional`)
    with pytest.raises(AssertionError, match=f"required key password of Secret {REDIS}"):
        pod_env(objs, {**SECRETS, REDIS: {}}, tmp_path)
    # The server requires that same key.
    server_env = {v["name"]: v for v in redis_container(rendered["production"])["env"]}
    assert any(v.get("valueFrom", {}).get("secretKeyRef") == ref for v in server_env.values())
    cm = configmap_env(objs)
    assert not {"ZAIPROXY_REDIS_PASSWORD", "ZAIPROXY_REDIS_PASSWORD_FILE"} & set(cm)
    # Redis away: each pod keeps serving on its local share (ZAIPROXY_LIMITS_LOCAL_SHARE).
    assert config.limits_fail == "local"
    # Readiness does not wait for Redis: /ready (which checks no Redis), nothing before start.
    assert container(objs)["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "initContainers" not in deployment(objs)["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_external_redis_url_in_the_secret_replaces_the_in_cluster_one(rendered, overlay, tmp_path):
    """k8s/README.md: the key `url` of the Secret wins over the ConfigMap's URL (env over
    envFrom); without it the in-cluster Service is used."""
    objs = rendered[overlay]
    external = "rediss://redis.example.net:6380/0"
    secrets = {**SECRETS, REDIS: {**SECRETS[REDIS], "url": external}}
    config, sources = load_config(env=pod_env(objs, secrets, tmp_path))
    assert sources["limits.redis_url"] == "env:ZAIPROXY_REDIS_URL"
    assert config.redis_url == external and config.redis_password == DUMMY_REDIS_PASSWORD
    url = {v["name"]: v for v in container(objs)["env"]}["ZAIPROXY_REDIS_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": REDIS, "key": "url", "optional": True}
    config, _ = load_config(env=pod_env(objs, SECRETS, tmp_path))
    assert config.redis_url == configmap_env(objs)["ZAIPROXY_REDIS_URL"]


def test_production_and_canary_spend_one_budget(rendered, tmp_path):
    envs = {o: pod_env(rendered[o], SECRETS, tmp_path) for o in OVERLAYS}
    configs = {o: load_config(env=env)[0] for o, env in envs.items()}
    # One server, one key prefix (both set alike, or both left to the default).
    assert len({c.redis_url for c in configs.values()}) == 1
    assert len({env.get("ZAIPROXY_REDIS_KEY_PREFIX") for env in envs.values()}) == 1
    assert len({c.redis_key_prefix for c in configs.values()}) == 1
    # Redis away: every pod's local share of the limits adds up to about one budget.
    total = sum(configs[o].limits_local_share * deployment(rendered[o])["spec"]["replicas"]
                for o in OVERLAYS)
    assert total == pytest.approx(1.0)


def test_no_secret_is_a_literal(rendered):
    """Passwords, tokens and keys come from secretKeyRefs, in the proxies and in Redis."""
    containers = [container(rendered[o]) for o in OVERLAYS]
    containers.append(redis_container(rendered["production"]))
    secretish = re.compile(r"PASSWORD|TOKEN|API_KEY")
    named = [var for c in containers for var in c["env"] if secretish.search(var["name"])]
    assert len(named) == 7, named
    for var in named:
        assert set(var) == {"name", "valueFrom"} and "secretKeyRef" in var["valueFrom"], var
    for overlay in OVERLAYS:
        assert not [k for k in configmap_env(rendered[overlay]) if secretish.search(k)]


def redis_args(objs: list[Obj]) -> list[str]:
    c = redis_container(objs)
    return (c.get("command") or []) + (c.get("args") or [])


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_redis_runs_non_root_with_its_data_on_a_volume_claim(rendered):
    prod = rendered["production"]
    sts = redis_objects(prod)[0]
    pod = sts["spec"]["template"]["spec"]
    c = redis_container(prod)
    ctx = {**pod["securityContext"], **c["securityContext"]}
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Its data directory (the only writable path) is a PersistentVolumeClaim of its own.
    args = redis_args(prod)
    data_dir = arg_after(args, "--dir") or "/data"
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    writable = {m["mountPath"]: m["name"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {data_dir: writable[data_dir]} and writable[data_dir] in claims
    assert not [v for v in pod.get("volumes", []) if v["name"] == writable[data_dir]]
    claim = claims[writable[data_dir]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert quantity(claim["resources"]["requests"]["storage"]) >= 256 * 2**20
    assert "fsGroup" in pod["securityContext"]  # the fresh volume is writable by the user
    # Persistent (append-only file), never evicting a window or quota to make room.
    assert arg_after(args, "--appendonly") == "yes"
    assert arg_after(args, "--maxmemory-policy") == "noeviction"
    res = c["resources"]
    maxmemory = quantity(arg_after(args, "--maxmemory").replace("mb", "Mi"))
    assert 0 < maxmemory < quantity(res["limits"]["memory"])
    assert quantity(res["requests"]["memory"]) > 0 and quantity(res["requests"]["cpu"]) > 0
    # A pinned image: a full version, not a moving tag.
    pinned = r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(pinned, c["image"]), c["image"]
    assert pod["enableServiceLinks"] is False


def test_redis_requires_the_password_from_the_secret(rendered):
    c = redis_container(rendered["production"])
    env = {v["name"]: v for v in c["env"]}
    password = arg_after(redis_args(rendered["production"]), "--requirepass")
    # Kubernetes substitutes $(NAME) only for a variable of the container's env: otherwise
    # the literal "$(NAME)" would be the password.
    m = re.fullmatch(r"\$\((\w+)\)", password or "")
    assert m and m.group(1) in env, password
    assert env[m.group(1)]["valueFrom"]["secretKeyRef"] == {"name": REDIS, "key": "password"}


def run_probe(command: list[str], reply: str, tmp_path: Path) -> int:
    """Run an exec probe with a fake valkey-cli that answers ``reply`` to an authenticated
    PING (and "NOAUTH" otherwise), as the real one prints it to a pipe."""
    fake = tmp_path / "valkey-cli"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = -a ] && [ "$2" = "{DUMMY_REDIS_PASSWORD}" ] && [ "$3" = --no-auth-warning ] \\
   && [ "$4" = ping ]; then
  printf '%s\\n' "{reply}"
else
  echo "NOAUTH Authentication required."
fi
""")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "REDIS_PASSWORD": DUMMY_REDIS_PASSWORD}
    return subprocess.run(command, env=env, timeout=10).returncode


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_redis_probes_authenticate_and_tell_loading_from_dead(rendered, tmp_path):
    c = redis_container(rendered["production"])
    env = {v["name"] for v in c["env"]}
    ready, alive = c["readinessProbe"]["exec"]["command"], c["livenessProbe"]["exec"]["command"]
    for command in (ready, alive):
        assert command[:2] == ["sh", "-c"] and "$REDIS_PASSWORD" in command[2]
        assert "REDIS_PASSWORD" in env
    replies = {"PONG": (0, 0), "LOADING Valkey is loading the dataset in memory": (1, 0),
               "": (1, 1), "ERR something else": (1, 1)}
    for reply, (ready_rc, alive_rc) in replies.items():
        assert run_probe(ready, reply, tmp_path) == ready_rc, reply
        assert run_probe(alive, reply, tmp_path) == alive_rc, reply
    # A wrong password (the fake answers NOAUTH) is neither ready nor alive.
    wrong = [arg.replace("$REDIS_PASSWORD", "$NOPE") for arg in ready]
    assert run_probe(wrong, "PONG", tmp_path) == 1
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= 20


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
    """A manifest file left out of every kustomization would never be applied. A local-config
    object is never applied: the kustomization next to it lists it and a replacement of that
    kustomization reads it (else it would be a setting that sets nothing)."""
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"]
    keys = {(o["kind"], o["metadata"]["name"]) for objs in (*rendered.values(), argo)
            for o in objs}
    local = [(path, o) for path in files for o in iter_yaml([path]) if is_local_config(o)]
    assert local, "k8s/overlays/production/runbook.yaml is a local-config ConfigMap"
    for path, obj in local:
        kust = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
        assert path.name in kust.get("resources", []), path
        sources = {(r["source"]["kind"], r["source"]["name"]) for r in kust.get("replacements", [])}
        assert (obj["kind"], obj["metadata"]["name"]) in sources, path
        assert (obj["kind"], obj["metadata"]["name"]) not in keys, "a local-config object rendered"
    raw = [(o["kind"], o["metadata"]["name"]) for o in iter_yaml(files) if not is_local_config(o)]
    missing = {(k, n) for k, n in raw
               if (k, n) not in keys and not any((k, f"{n}-{v}") in keys for v in OVERLAYS)}
    assert not missing and len(raw) >= 8, (missing, raw)
