"""What RQ's own tools (``rq info``, the registries) show is true:

- a failed install's step is *failed* in RQ, with its error (it used to be "finished", exc_info null);
- the own queue of a GPU worker that is gone is removed, and a job routed to it goes to the shared
  gpu queue (they used to pile up in ``rq info``);
- two namespaces on one Redis never see each other's jobs or workers (RQ's ``rq:*`` keys are global,
  the queue names carry the namespace).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from modelbus.events.keys import Keys
from modelbus.events.store import RedisEventStore
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.install import InstallStatus, ModelInstallService
from tests.faults.jobs import registered, stop
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import Bus, _bus, make_service
from tests.waiting import wait_until


def test_a_failed_install_is_failed_in_rq(idle_bus: Bus) -> None:
    bus = idle_bus
    service = make_service(bus)
    client = service.event_store.client
    job = service.heuristic_import(bus.files.url_for("files/no-such-model.safetensors"))
    worker = bus.start_worker(burst=True, name="rq-view-failed")
    ended = service.wait_for_job(job.id, timeout=120)
    worker.wait(timeout=60)
    assert ended.status is InstallStatus.ERROR, ended
    keys = Keys(bus.env["MODELBUS_NAMESPACE"])
    failed = {q: FailedJobRegistry(keys.queue(q), connection=client).get_job_ids() for q in ("install", "download")}
    steps = [Job.fetch(i, connection=client) for ids in failed.values() for i in ids if i.startswith(job.id)]
    print(f"\n[failed install] {ended.error_type}: {ended.error}; RQ failed registries: {failed}")
    assert steps, f"no step of the failed install is in RQ's failed registries: {failed}"
    step = steps[0]
    assert step.get_status() == JobStatus.FAILED
    assert step.latest_result() is not None and ended.error_type in (step.latest_result().exc_string or "")
    service.record_store.close()


def test_a_gone_gpu_workers_own_queue_is_removed(idle_bus: Bus) -> None:
    bus = idle_bus
    client = make_service(bus).event_store.client
    keys = Keys(bus.env["MODELBUS_NAMESPACE"])
    gone = bus.start_worker(queues="gpu", name="rq-view-gpu-gone")
    other = bus.start_worker(queues="hash", name="rq-view-other")
    try:
        wait_until(lambda: registered(bus, client, "rq-view-gpu-gone") and registered(bus, client, "rq-view-other"),
                   120, "the workers", bus.worker_log)
        live = [w.name for w in Worker.all(queue=Queue(keys.queue("gpu"), connection=client))]
        assert "rq-view-gpu-gone" in live, live  # a live GPU worker is in RQ's own listing
        os.killpg(gone.pid, signal.SIGKILL)
        gone.wait(timeout=10)
        own = Queue(keys.worker_queue("rq-view-gpu-gone"), connection=client)
        routed = own.enqueue("os.getcwd")  # a job routed to the worker just before it died
        assert own.key.encode() in client.smembers(Queue.redis_queues_keys)
        wait_until(lambda: own.key.encode() not in client.smembers(Queue.redis_queues_keys), 90,
                   "the dead worker's own queue to be removed", bus.worker_log)
        shared = Queue(keys.queue("gpu"), connection=client)
        assert routed.id in shared.get_job_ids() and not client.exists(own.key)
        assert Job.fetch(routed.id, connection=client).origin == shared.name
        print(f"\n[GPU worker killed] its queue {own.name} was removed; the job routed to it went to {shared.name}")
    finally:
        stop([gone, other])


def test_two_namespaces_on_one_redis_never_see_each_other(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    buses_a, buses_b = _bus(redis_url, tmp_path / "a", 1), _bus(redis_url, tmp_path / "b", 1)
    a, b = next(buses_a), next(buses_b)
    try:
        ns_a, ns_b = Keys(a.env["MODELBUS_NAMESPACE"]), Keys(b.env["MODELBUS_NAMESPACE"])
        # (both buses set the environment: A's service is built from A's own settings)
        config = AppConfig.load(root=a.root, namespace=ns_a.namespace, redis_url=redis_url)
        service = ModelInstallService(config, event_store=RedisEventStore.from_config(config))
        client = service.event_store.client
        model = write_checkpoint(tmp_path / "ns_lora.safetensors", lora_kohya_shapes("sd-1", 8),
                                 {"ss_network_module": "networks.lora", "fault": "namespaces"})
        job = service.heuristic_import(a.files.add_file("files/ns_lora.safetensors", model.read_bytes()))
        assert service.wait_for_job(job.id, timeout=120).status is InstallStatus.COMPLETED
        service.record_store.close()
        assert job.id in a.worker_log() and job.id not in b.worker_log(), "B's worker saw A's job"

        def names(ns: Keys) -> set[str]:
            return {w.name for q in ("install", "download", "hash")
                    for w in Worker.all(queue=Queue(ns.queue(q), connection=client))}
        # B's worker may still be starting (its bus was never asked to do anything): wait until it is up
        wait_until(lambda: names(ns_a) and names(ns_b), 120, "both namespaces' workers to register", interval=0.2)
        workers_a, workers_b = names(ns_a), names(ns_b)
        assert workers_a and workers_b and not workers_a & workers_b
        mb_b = ModelBusClient(store=RedisEventStore.from_url(redis_url, ns_b.namespace))
        assert {w["id"] for w in mb_b.workers()} == workers_b  # modelbus's own view: B's workers only
        for q in ("install", "download", "hash"):
            ids_b = set(Queue(ns_b.queue(q), connection=client).get_job_ids())
            ids_b |= set(FailedJobRegistry(ns_b.queue(q), connection=client).get_job_ids())
            assert not [i for i in ids_b if i.startswith(job.id)]
        print(f"\n[two namespaces, one Redis] A's install ran on A's worker only; RQ lists workers {workers_a} "
              f"for A's queues and {workers_b} for B's")
    finally:
        next(buses_a, None)
        next(buses_b, None)


def test_a_command_id_taken_in_another_namespace_is_refused(redis_url: str, tmp_path: Path) -> None:
    """RQ's job keys are global: B reusing A's command id would overwrite A's RQ job (its access token
    included). B's command is refused, naming the reason, and A's job is untouched."""
    from modelbus.services.install.commands import InstallCommand, submit
    from modelbus.services.install.errors import CommandIdTakenError

    model = write_checkpoint(tmp_path / "shared_id_lora.safetensors", lora_kohya_shapes("sd-1", 8))
    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = AppConfig.load(root=tmp_path / name, namespace=f"ns-{name}-{tmp_path.name[-8:]}",
                                redis_url=redis_url, import_roots=str(tmp_path))
        stores.append((config, RedisEventStore.from_config(config)))
    (config_a, store_a), (config_b, store_b) = stores
    submit(store_a, config_a, InstallCommand(str(model), command_id="shared-cmd", access_token="token-of-a"))
    before = store_a.client.hgetall("rq:job:shared-cmd")
    with pytest.raises(CommandIdTakenError, match="another namespace"):
        submit(store_b, config_b, InstallCommand(str(model), command_id="shared-cmd", access_token="token-of-b"))
    assert store_a.client.hgetall("rq:job:shared-cmd") == before
    assert Job.fetch("shared-cmd", connection=store_a.client).origin == Keys(config_a.namespace).queue("install")
    store_a.client.delete("rq:job:shared-cmd")
