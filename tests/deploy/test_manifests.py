"""The deployment files under deploy/: every YAML parses, every worker command names real queues,
every worker kind is deployed everywhere, the KEDA list names are the keys RQ really uses, copies
agree, and the Redis configuration is accepted by a real redis-server with the settings we promise."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from rq import Queue

from modelbus.events.embedded import free_port
from modelbus.events.keys import QUEUES, Keys
from modelbus.workers.runner import parse_queues
from tests.record_configs import record_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
WORKER_RE = re.compile(r"-m\s+modelbus\.workers\b(?P<rest>[^\n\"'`\]]*)")
QUEUES_RE = re.compile(r"--queues[=\s]+(?P<queues>[^\s\"'`),\]]+(?:,[^\s\"'`),\]]+)*)")


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node: Any) -> list[str]:
    """Every command line in a YAML tree: lists of strings joined with spaces, and plain strings."""
    found: list[str] = []
    if isinstance(node, dict):
        for value in node.values():
            found += _walk(value)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            found.append(" ".join(node))
        for value in node:
            found += _walk(value)
    elif isinstance(node, str):
        found.append(node)
    return found


def _worker_queue_lists(text: str) -> list[str]:
    out = []
    for match in WORKER_RE.finditer(text):
        queues = QUEUES_RE.search(match.group("rest"))
        out.append(queues.group("queues") if queues else "<missing --queues>")
    return out


def test_there_are_yaml_files_and_each_parses() -> None:
    assert len(YAML_FILES) >= 10
    for path in YAML_FILES:
        assert _docs(path), f"{path} holds no document"


def test_every_worker_command_names_real_queues() -> None:
    seen: list[tuple[str, str]] = []
    for path in YAML_FILES:
        for line in _walk(_docs(path)):
            seen += [(str(path), q) for q in _worker_queue_lists(line)]
    for path in [*DEPLOY.rglob("*.service"), DEPLOY / "Dockerfile", DEPLOY / "OPERATIONS.md"]:
        text = path.read_text()
        seen += [(str(path), q) for q in _worker_queue_lists(text) if q not in ("%I", "<kinds>")]
    assert len(seen) >= 10
    for where, queues in seen:
        names = queues.split(",")
        assert all(n in QUEUES for n in names), f"{where}: --queues {queues} names no real queue ({QUEUES})"
        assert parse_queues(queues) == names


@pytest.mark.parametrize("name", ["compose.yaml", "compose.ha.yaml"])
def test_compose_runs_the_api_and_every_worker_kind(name: str) -> None:
    (doc,) = _docs(DEPLOY / name)
    services = doc["services"]
    kinds = {}
    for svc_name, svc in services.items():
        command = " ".join(svc.get("command", []))
        for queues in _worker_queue_lists(command):
            kinds[queues] = svc_name
        assert "${" not in svc.get("image", "") or "MODELBUS_IMAGE" in svc["image"]
    assert set(kinds) == set(QUEUES)
    assert "modelbus.services.api:create_app --factory" in " ".join(services["api"]["command"])
    gpu = services[kinds["gpu"]]
    assert "--device cuda:0" in " ".join(gpu["command"])
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    for svc_name in kinds.values():
        env = services[svc_name]["environment"]
        assert env["MODELBUS_REDIS_URL"].startswith(("redis://", "redis+sentinel://"))


def test_compose_redis_uses_the_shipped_config() -> None:
    (doc,) = _docs(DEPLOY / "compose.yaml")
    redis_svc = doc["services"]["redis"]
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis_svc["volumes"]
    assert redis_svc["command"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]


def test_compose_ha_has_primary_replica_and_three_sentinels() -> None:
    (doc,) = _docs(DEPLOY / "compose.ha.yaml")
    services = doc["services"]
    assert services["redis-replica"]["environment"]["REDIS_REPLICA_OF"] == "redis-primary:6379"
    sentinels = [n for n, s in services.items() if "sentinel-entrypoint.sh" in " ".join(s.get("command", []))]
    assert len(sentinels) == 3
    url = services["api"]["environment"]["MODELBUS_REDIS_URL"]
    assert url.startswith("redis+sentinel://") and all(f"{s}:26379" in url for s in sentinels)
    assert services["api"]["environment"]["MODELBUS_DURABILITY"] == "replicated"


def _k8s_objects() -> list[dict[str, Any]]:
    return [d for p in YAML_FILES if "k8s" in p.parts and p.name != "kustomization.yaml"
            and not p.name.endswith("-patch.yaml") for d in _docs(p)]


def test_k8s_has_a_deployment_per_worker_kind_and_scaling_on_the_real_rq_keys() -> None:
    objects = _k8s_objects()
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    kinds = {}
    for name, dep in deployments.items():
        (container, *_) = dep["spec"]["template"]["spec"]["containers"]
        for queues in _worker_queue_lists(" ".join(container.get("command", []))):
            kinds[queues] = name
    assert set(kinds) == set(QUEUES) and "modelbus-api" in deployments
    gpu = deployments[kinds["gpu"]]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    assert len(scaled) == 2 * len(QUEUES)  # single Redis and Sentinel variants
    for obj in scaled:
        (trigger,) = obj["spec"]["triggers"]
        target = obj["spec"]["scaleTargetRef"]["name"]
        kind = next(k for k, d in kinds.items() if d == target)
        assert trigger["metadata"]["listName"] == f"{Queue.redis_queue_namespace_prefix}{Keys('modelbus').queue(kind)}"
    redis_sets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    assert {"redis", "redis-ha", "redis-sentinel"} <= set(redis_sets)
    assert redis_sets["redis"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_keda_list_name_is_where_rq_keeps_waiting_jobs(redis_url: str, namespace: str) -> None:
    """Enqueue a real RQ job on a modelbus queue name and read the list KEDA would read."""
    client = redis.Redis.from_url(redis_url)
    (doc,) = [d for d in _docs(DEPLOY / "k8s" / "redis" / "scaling.yaml") if d["kind"] == "ScaledObject"
              and d["metadata"]["name"] == "modelbus-download-worker"]
    list_name = doc["spec"]["triggers"][0]["metadata"]["listName"].replace("{modelbus}", "{" + namespace + "}")
    queue = Queue(Keys(namespace).queue("download"), connection=client)
    queue.enqueue("os.getcwd")
    queue.enqueue("os.getcwd")
    try:
        assert client.type(list_name) == b"list" and client.llen(list_name) == 2
    finally:
        queue.delete(delete_jobs=True)


def test_k8s_copies_match_the_originals() -> None:
    for copy in [DEPLOY / "k8s" / "redis" / "redis.conf", *(DEPLOY / "k8s" / "sentinel").glob("*.sh"),
                 DEPLOY / "k8s" / "sentinel" / "redis.conf"]:
        assert copy.read_text() == (DEPLOY / "redis" / copy.name).read_text(), f"{copy} differs from deploy/redis/"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
@pytest.mark.parametrize("folder", ["k8s", "k8s/sentinel"])
def test_kustomizations_build(folder: str) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout) if d]
    assert kinds.count("ScaledObject") == len(QUEUES) and "StatefulSet" in kinds and "Namespace" in kinds


def test_systemd_units_stop_workers_warm() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "modelbus-worker@.service")
    service = parser["Service"]
    assert service["ExecStart"].endswith("-m modelbus.workers --queues %I")
    # SIGTERM to the worker only: its work horse must not be killed with it
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    api = configparser.ConfigParser(strict=False, interpolation=None)
    api.read(DEPLOY / "systemd" / "modelbus-api.service")
    assert "modelbus.services.api:create_app --factory" in api["Service"]["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not on PATH")
def test_systemd_units_verify(tmp_path: Path) -> None:
    units = [(DEPLOY / "systemd" / "modelbus-api.service", "modelbus-api.service"),
             (DEPLOY / "systemd" / "modelbus-worker@.service", "modelbus-worker@install\\x2chash.service")]
    for source, name in units:
        target = tmp_path / name
        shutil.copy(source, target)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(target)], check=False, capture_output=True,
                              text=True, timeout=60)
        problems = [line for line in (done.stdout + done.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]  # the venv is not installed here
        assert not problems, problems


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not on PATH")
def test_redis_conf_is_accepted_with_aof_and_noeviction(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(["redis-server", str(DEPLOY / "redis" / "redis.conf"), "--port", str(port),
                                "--bind", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server with deploy/redis/redis.conf did not answer"
                time.sleep(0.1)
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["no-appendfsync-on-rewrite"] == "no"
        client.xadd("probe", {"a": "1"})
        assert (tmp_path / "appendonlydir").is_dir()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_dockerfile_installs_torch_from_a_build_arg_then_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert 'ARG TORCH_SPEC="torch==2.13.0"' in text
    assert text.index("pip install ${TORCH_SPEC}") < text.index("pip install --no-deps .")


def test_operations_guide_has_the_fault_report_table() -> None:
    text = (DEPLOY / "OPERATIONS.md").read_text()
    report = text.split("## Fault report", 1)[1]
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert len(rows) >= 2 + 7  # header, rule, one row per fault of issue 8 at least
    for needle in ("SIGKILL", "Redis killed", "primary", "twice", "dropped", "disk fills", "projection"):
        assert any(needle.lower() in row.lower() for row in rows), needle
    for heading in ("## Scaling", "## Backups", "## Rebuilding projections", "## Upgrading the event schema",
                    "## Monitoring", "## Security", "## Durability", "## High availability"):
        assert heading in text, heading


def test_acl_user_from_the_guide_can_run_modelbus(redis_url: str, namespace: str) -> None:
    """The ACL rule OPERATIONS.md gives, applied for real: the store, the fitness check and an RQ
    worker all work as that user, and a key outside its patterns is refused."""
    from rq import SimpleWorker

    from modelbus.events.connection import check_fit, connect
    from modelbus.events.schema import ModelAdded
    from modelbus.events.store import RedisEventStore

    rule = next(line for line in (DEPLOY / "OPERATIONS.md").read_text().splitlines()
                if line.startswith("ACL SETUSER modelbus "))
    user = f"acl-{namespace}"
    args = rule.split()[3:]  # after "ACL SETUSER modelbus"
    args = [a.replace("{modelbus}", "{" + namespace + "}").replace(">s3cret", ">pw-" + namespace) for a in args]
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", user, "reset", *args)
    try:
        url = redis_url.replace("redis://", f"redis://{user}:pw-{namespace}@", 1)
        client = connect(url)
        check_fit(client, url)
        store = RedisEventStore(client, namespace)
        store.append([ModelAdded(aggregate_id="acl-model", config=record_config("acl-model"))], expected_version=0)
        assert [s.event.aggregate_id for s in store.history("acl-model")] == ["acl-model"]
        queue = Queue(Keys(namespace).queue("hash"), connection=client)
        job = queue.enqueue("os.getcwd")
        assert SimpleWorker([queue], connection=client).work(burst=True)
        assert job.get_status(refresh=True) == "finished"
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("not-modelbus", "1")
    finally:
        admin.execute_command("ACL", "DELUSER", user)
