"""The install job as a fold of its events, and the guarded transitions workers and cancels append with."""

from __future__ import annotations

from modelbus.events.schema import (
    InstallCancelled,
    InstallCompleted,
    InstallDownloaded,
    InstallFailed,
    InstallRequested,
    InstallStarted,
)
from modelbus.events.store import InMemoryEventStore
from modelbus.services.install.jobs import InstallStatus, load_job, source_claim, transition, unless_ended


def _requested(store: InMemoryEventStore, job_id: str, source: str = "acme/repo") -> None:
    claim = source_claim(source)
    store.append([InstallRequested(aggregate_id=job_id, source=source, options={"claim": claim})],
                 expected_version=0, claims={claim: job_id})


def test_statuses_follow_the_events() -> None:
    store = InMemoryEventStore()
    _requested(store, "j1")
    seen = [load_job(store, "j1").status]
    steps = [
        InstallStarted(aggregate_id="j1"),
        InstallDownloaded(aggregate_id="j1", path="/tmp/x", total_bytes=10, metadata={"author": "a"}),
        InstallStarted(aggregate_id="j1"),
        InstallCompleted(aggregate_id="j1", key="k" * 32, config={"key": "k" * 32}, total_bytes=10),
    ]
    for event in steps:
        store.append([event])
        seen.append(load_job(store, "j1").status)
    assert seen == [InstallStatus.WAITING, InstallStatus.DOWNLOADING, InstallStatus.DOWNLOADS_DONE,
                    InstallStatus.HASHING, InstallStatus.COMPLETED]
    job = load_job(store, "j1")
    assert (job.key, job.bytes, job.total_bytes, job.metadata) == ("k" * 32, 10, 10, {"author": "a"})


def test_only_one_terminal_event_wins_and_it_frees_the_source() -> None:
    store = InMemoryEventStore()
    _requested(store, "j2")
    assert store.claim_owner(source_claim("acme/repo")) == "j2"
    job, appended = transition(store, "j2", unless_ended(
        lambda j: InstallCancelled(aggregate_id=j.id, reason="by request")))
    assert appended and job.status is InstallStatus.CANCELLED
    job, appended = transition(store, "j2", unless_ended(
        lambda j: InstallFailed(aggregate_id=j.id, error_type="RemoteError", error="HTTP 404")))
    assert not appended and job.status is InstallStatus.CANCELLED and job.error_type is None
    assert store.claim_owner(source_claim("acme/repo")) is None


def test_a_stale_writer_decides_again_on_what_it_missed() -> None:
    store = InMemoryEventStore()
    _requested(store, "j3")
    calls = []

    def decide(job):  # type: ignore[no-untyped-def]
        calls.append(job.status)
        if len(calls) == 1:  # someone else ends the job between our read and our append
            store.append([InstallFailed(aggregate_id="j3", error_type="X", error="boom")])
            return InstallCompleted(aggregate_id="j3", key="k", config={})
        return None if job.terminal else InstallCompleted(aggregate_id="j3", key="k", config={})

    job, appended = transition(store, "j3", decide)
    assert calls == [InstallStatus.WAITING, InstallStatus.ERROR]
    assert not appended and job.status is InstallStatus.ERROR
