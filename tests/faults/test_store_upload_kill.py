"""An install worker killed (SIGKILL) in the middle of uploading a model's blob to the store: the
half-sent multipart upload is never visible as a blob nor referenced by a record, and the worker that
retries the job uploads it whole, then records the model."""

from __future__ import annotations

import time
from pathlib import Path

from rq.registry import StartedJobRegistry

from modelbus.events.keys import Keys
from modelbus.services.install import InstallStatus
from modelbus.services.store import parse_store_url
from modelbus.services.store.s3 import S3BlobStore
from tests.fixtures.model_files import lora_kohya_shapes, make_sparse_safetensors
from tests.install.conftest import _bus, make_service
from tests.servers.s3_server import CREDENTIALS, S3Server
from tests.store.conftest import s3_server  # noqa: F401 - the S3 endpoint fixture
from tests.waiting import wait_until

SIZE = 64 << 20
BUCKET = "upload-kill"


def test_an_upload_killed_half_way_is_never_referenced(redis_url: str, s3_server: S3Server,  # noqa: F811
                                                       tmp_path: Path) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    env = {"MODELBUS_STORE_URL": f"s3://{BUCKET}/fleet", "MODELBUS_S3_ENDPOINT_URL": s3_server.url, **CREDENTIALS}
    source = make_sparse_safetensors(tmp_path / "big_upload_lora.safetensors", SIZE,
                                     shapes=lora_kohya_shapes("sd-1", 4), pad_name="lora_unet_zz_padding.alpha")
    for bus in _bus(redis_url, tmp_path, start_workers=0, extra_env=env):
        service = make_service(bus)
        try:
            victim = bus.start_worker(name="victim")
            job = service.heuristic_import(str(source))
            wait_until(lambda: s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads"), 120,
                       "the upload to start", details=bus.worker_log, interval=0.01)
            bus.kill(victim)
            assert service.record_store.all_models() == []
            listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
            assert listed == [], "no blob is visible before its upload completed"

            # what a surviving worker's maintenance does once the victim's heartbeat expired
            name = Keys(bus.env["MODELBUS_NAMESPACE"]).queue("hash")
            StartedJobRegistry(name, connection=service.event_store.client).cleanup(timestamp=time.time() + 3600)
            bus.start_worker(burst=True, name="rescuer")
            done = service.wait_for_job(job, timeout=180)
            assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
            [entry] = next(s.event for s in service.record_store.history(done.key)
                           if s.event.type == "ModelAdded").files  # type: ignore[attr-defined]
            store = S3BlobStore(parse_store_url(f"s3://{BUCKET}/fleet"), endpoint_url=s3_server.url)
            assert store.size_of(entry.blake3) == SIZE
        finally:
            service.record_store.close()
