"""deploy/ and docker/ checked offline by the tools of their ecosystems, and KServe's client against a live server.

* every Kubernetes manifest, base and each overlay built (a small strategic-merge patcher below, as kustomize
  applies `patches` and `images`), validated by kubernetes-validate (the Kubernetes OpenAPI schemas, strict:
  unknown fields are errors);
* every InferenceService through KServe's own SDK models (deploy/kserve/kserve_check.py, run in the KServe venv);
* every Dockerfile clean under hadolint (each ignored rule is explained where it is ignored);
* deploy/compose.yaml parsed and normalised by podman-compose;
* KServe's v2 REST client (`kserve.InferenceRESTClient`) classifying a photograph against a real ganet-serve.

The KServe SDK pins FastAPI, uvicorn, pydantic and protobuf, so it lives in a venv of its own: `.ci/run` creates
it at KSERVE_VENV (GANET_KSERVE_PYTHON names its interpreter); without it those tests skip, except under CI.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ganet.serve.local import free_port, stop, wait_ready
from ganet.serve.settings import ServeSettings

from test_serve import export_dir  # noqa: F401  (the session's one real export)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
KUBERNETES_VERSION = "1.33.0"
_PIN = (KSERVE / "requirements.txt").read_text().strip().replace("==", "-")  # where .ci/run puts the KServe venv
KSERVE_PYTHON = Path(os.environ.get("GANET_KSERVE_PYTHON", f"/var/tmp/ganet-{_PIN}/bin/python"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---- kustomize, the part these overlays use -----------------------------------------------------------------

def merge(base, patch):
    """Strategic merge as kustomize applies it to these kinds: mappings merge, lists of named mappings (containers,
    env, volumes, volumeMounts) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch and all(isinstance(x, dict) and "name" in x
                                                                               for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            at = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def build(directory: Path) -> list[dict]:
    """The resources `kustomize build directory` gives for these files (resources, labels, patches, images)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        resources += build(path) if path.is_dir() else _docs(path)
    for patch_ref in k.get("patches", []):
        for patch in _docs((directory / patch_ref["path"]).resolve()):
            key = (patch["kind"], patch["metadata"]["name"])
            hits = [i for i, r in enumerate(resources) if (r["kind"], r["metadata"]["name"]) == key]
            assert hits, f"{directory}: patch {patch_ref['path']} targets {key}, which no resource is"
            if patch.get("$patch") == "delete":
                del resources[hits[0]]
            else:
                resources[hits[0]] = merge(resources[hits[0]], {k: v for k, v in patch.items() if k != "$patch"})
    for group in k.get("labels", []):
        for r in resources:
            r.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
            if group.get("includeSelectors") and r["kind"] in ("Deployment", "Service", "PodDisruptionBudget"):
                spec = r["spec"]
                if r["kind"] == "Service":
                    spec.setdefault("selector", {}).update(group["pairs"])
                else:
                    spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(group["pairs"])
                if r["kind"] == "Deployment":
                    spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    for image in k.get("images", []):
        for r in resources:
            pod = r.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["image"] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return resources


OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())


def test_merge_and_build_follow_kustomize():
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}], "ports": [1, 2]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}, {"name": "b"}],
                      "ports": [3]}}
    got = merge(base, patch)
    assert got["spec"]["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert [c["name"] for c in got["spec"]["containers"]] == ["a", "b"] and got["spec"]["ports"] == [3]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_validates_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    resources = build(K8S / "overlays" / overlay)
    kinds = sorted(r["kind"] for r in resources)
    for r in resources:
        kubernetes_validate.validate(r, KUBERNETES_VERSION, strict=True)  # raises ValidationError naming the field
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds), kinds
    (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (serve,) = pod["containers"]
    assert serve["image"].startswith("registry.example.com/ganet-serve:")
    assert serve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # the selector picks the pods the template makes; the Service and PDB pick the same pods
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for r in resources:
        if r["kind"] in ("Service", "PodDisruptionBudget"):
            assert (r["spec"]["selector"].get("matchLabels") or r["spec"]["selector"]) == selector
    # stop timeline: preStop sleep + the server's grace period must fit inside the pod's grace period
    env = {e["name"]: e["value"] for e in serve["env"]}
    prestop = float(serve["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = prestop + float(env["GANET_GRACE_S"]) + float(env["GANET_DRAIN_DELAY_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + 5, (pod["terminationGracePeriodSeconds"], drain)
    assert set(env) - {"GANET_KERNEL_LIBRARY"} <= {f"GANET_{f.upper()}" for f in ServeSettings.model_fields}
    hpas = [r for r in resources if r["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1 and hpas[0]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    gpu = overlay.startswith("gpu")
    assert ("nvidia.com/gpu" in serve["resources"]["limits"]) is gpu
    metric = hpas[0]["spec"]["metrics"][0]
    assert (metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "ganet_queue_depth") is gpu
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
    assert all(m["readOnly"] for c in pod["containers"] + pod["initContainers"] for m in c["volumeMounts"]
               if m["name"] == "model")
    if overlay == "gpu-tensorrt":
        assert env["GANET_ENGINE_CACHE"] in {m["mountPath"] for m in serve["volumeMounts"]}


def test_validation_catches_a_misspelled_field():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment = next(r for r in build(K8S / "overlays" / "cpu") if r["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_standalone_manifests_validate():
    import kubernetes_validate

    for path in (K8S / "prometheus-adapter-rules.yaml", K8S / "hpa-queue-depth.yaml"):
        for doc in _docs(path):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    rules = yaml.safe_load(_docs(K8S / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == "ganet_queue_depth"
    from ganet.serve.metrics import Metrics

    assert "ganet_queue_depth" in {m.name for m in Metrics().registry.collect()}  # the gauge the HPA reads


def test_the_init_container_check_finds_a_changed_file(export_dir, tmp_path):  # noqa: F811
    """The model-verifying init container's script, run here on a good export and on a tampered copy."""
    deployment = next(r for r in _docs(K8S / "base" / "deployment.yaml"))
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    script = init["args"][0]
    good = subprocess.run([sys.executable, "-c", script.replace("/models/model", str(export_dir))],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "match manifest.json" in good.stdout, good.stderr
    bad_dir = tmp_path / "export"
    shutil.copytree(export_dir, bad_dir)
    (bad_dir / "labels.txt").write_text("tampered\n")
    bad = subprocess.run([sys.executable, "-c", script.replace("/models/model", str(bad_dir))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "labels.txt" in bad.stderr


def test_every_dockerfile_is_hadolint_clean():
    dockerfiles = sorted(p for p in ROOT.rglob("Dockerfile*") if ".git" not in p.parts)
    assert dockerfiles
    for path in dockerfiles:
        out = subprocess.run(["hadolint", "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{path}:\n{out.stdout}{out.stderr}"
        text = path.read_text().splitlines()
        for i, line in enumerate(text):  # every ignored rule is explained in the comment lines just above it
            if "hadolint ignore=" in line:
                rules = line.split("=", 1)[1].split(",")
                above = " ".join(text[max(0, i - 4):i])
                assert all(rule.strip() in above for rule in rules), f"{path}:{i + 1}: unexplained {rules}"


def test_compose_file_parses_with_podman_compose(tmp_path):
    compose = ROOT / "deploy" / "compose.yaml"
    out = subprocess.run(["podman-compose", "-f", str(compose), "--profile", "gpu", "config"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "GANET_EXPORT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert set(services) == {"ganet-cpu", "ganet-gpu", "ganet-gpu-torch"}
    assert services["ganet-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/var/cache/ganet/engines" in " ".join(map(str, services["ganet-gpu"]["volumes"]))
    assert set(config["volumes"]) == {"model", "engine-cache"}
    assert config["volumes"]["model"]["driver_opts"]["device"] == str(tmp_path)
    for name, service in services.items():
        assert any(str(v).endswith(":/models/model:ro") for v in service["volumes"]), (name, service["volumes"])
        assert service["healthcheck"]["test"][-1].endswith("/v2/health/ready', timeout=2)")
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.read_text().replace("<<: *serve", "<<: *nosuchanchor", 1))
    out = subprocess.run(["podman-compose", "-f", str(broken), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0  # the negative control: a real parse error is reported


# ---- KServe's own package -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kserve_python() -> Path:
    if not KSERVE_PYTHON.is_file():
        message = (f"no KServe venv at {KSERVE_PYTHON}: `.ci/run` creates it (python3 -m venv DIR && DIR/bin/pip "
                   "install -r deploy/kserve/requirements.txt), GANET_KSERVE_PYTHON names another")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return KSERVE_PYTHON


def _kserve(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(KSERVE / "kserve_check.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_inference_services_validate_against_kserves_models(kserve_python, tmp_path):
    files = sorted(KSERVE.glob("inferenceservice-*.yaml"))
    out = _kserve(kserve_python, "validate", *map(str, files))
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["documents"] == len(files) == 2
    by_name = {d["metadata"]["name"]: d for f in files for d in _docs(f)}
    custom = by_name["ganet"]["spec"]["predictor"]["containers"][0]
    assert custom["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert by_name["ganet-triton"]["spec"]["predictor"]["model"]["modelFormat"]["name"] == "triton"
    # the negative control: a misspelled field and a wrongly typed one are both named
    bad = tmp_path / "bad.yaml"
    bad.write_text((KSERVE / "inferenceservice-ganet.yaml").read_text()
                   .replace("minReplicas", "minReplica").replace("scaleTarget: 70", "scaleTarget: \"70\""))
    out = _kserve(kserve_python, "validate", str(bad))
    problems = json.loads(out.stdout)["problems"]
    assert out.returncode == 1 and len(problems) == 2, problems
    assert "minReplica: not a field of V1beta1PredictorSpec" in problems[0] and "scaleTarget: expected int" in problems[1]


def test_kserve_v2_client_classifies_a_photograph(kserve_python, export_dir, tmp_path):  # noqa: F811
    """KServe's InferenceRESTClient (v2, binary BYTES) against a real ganet-serve on 127.0.0.1: the logits equal
    model.onnx's on the same decoded photograph."""
    import onnxruntime as ort

    from ganet.export.manifest import load_manifest
    from ganet.serve.images import decode_image

    import sklearn.datasets

    photo = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    port = free_port()
    proc = subprocess.Popen(["ganet-serve", str(export_dir), "--port", str(port), "--model-name", "ganet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout_s=120)
        out = _kserve(kserve_python, "infer", f"http://127.0.0.1:{port}", "ganet", str(photo))
    finally:
        stop(proc)
    assert out.returncode == 0, out.stdout + out.stderr + proc.stderr.read()[-2000:]
    answer = json.loads(out.stdout)
    assert answer["model_ready"] is True and answer["output"] == "logits" and answer["datatype"] == "FP32"
    manifest = load_manifest(export_dir)
    image = decode_image(photo.read_bytes(), manifest.preprocessing, 50_000_000)[None]
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": image})[0]
    assert answer["shape"] == [1, manifest.num_classes]
    np.testing.assert_allclose(np.array(answer["logits"]), expected, atol=1e-4)
    assert int(np.argmax(answer["logits"])) == int(np.argmax(expected))
