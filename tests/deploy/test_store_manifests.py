"""The deployments without a shared disk (compose.store.yaml, k8s/store): every modelbus service uses the
store and mounts a volume of its own; the Kubernetes overlay builds with no ReadWriteMany claim."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from modelbus.services.store import parse_store_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_store_gives_every_modelbus_service_the_store_and_its_own_volume() -> None:
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    override = yaml.safe_load((DEPLOY / "compose.store.yaml").read_text())["services"]
    modelbus = [name for name, svc in base.items() if "modelbus-data:/data/modelbus" in svc.get("volumes", [])]
    assert modelbus and set(modelbus) <= set(override)
    mounts = []
    for name in modelbus:
        env = override[name]["environment"]
        assert parse_store_url(env["MODELBUS_STORE_URL"].replace("${MODELBUS_BUCKET:-modelbus}", "modelbus")).scheme == "s3"
        assert env["MODELBUS_S3_ENDPOINT_URL"] == "http://minio:9000"
        (volume,) = override[name]["volumes"]
        assert volume.endswith(":/data/modelbus") and not volume.startswith("modelbus-data")
        mounts.append(volume)
    assert len(set(mounts)) == len(mounts), "each service its own volume: no shared models directory"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
def test_the_k8s_store_overlay_builds_without_a_shared_claim() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / "store")], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "modelbus-config")
    assert parse_store_url(config["data"]["MODELBUS_STORE_URL"]).scheme == "s3"
    deployments = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Deployment"}
    for name, spec in deployments.items():
        volumes = spec["template"]["spec"]["volumes"]
        assert not [v for v in volumes if "persistentVolumeClaim" in v], name
    gpu = deployments["modelbus-gpu-worker"]
    assert gpu["replicas"] == 2 and "podAntiAffinity" in gpu["template"]["spec"]["affinity"]
