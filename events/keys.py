"""Redis key and queue names. All share the ``{namespace}`` hash tag, so a Redis Cluster keeps them on one
slot and the multi-key Lua append stays legal."""

from __future__ import annotations

from dataclasses import dataclass

QUEUES = ("install", "download", "hash", "gpu")


@dataclass(frozen=True)
class Keys:
    namespace: str

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    @property
    def events(self) -> str:
        """The domain log: never trimmed."""
        return f"{self.tag}:events"

    @property
    def activity(self) -> str:
        """Operational events, capped by length."""
        return f"{self.tag}:activity"

    @property
    def versions(self) -> str:
        """Hash aggregate id -> current version."""
        return f"{self.tag}:versions"

    @property
    def idempotency(self) -> str:
        """Hash idempotency key -> JSON list of the positions first appended for it."""
        return f"{self.tag}:idempotency"

    @property
    def unique(self) -> str:
        """Hash unique field -> owning aggregate id."""
        return f"{self.tag}:unique"

    @property
    def quarantine(self) -> str:
        """Stream of refused domain-log entries (position, type, aggregate, version, reason): never trimmed."""
        return f"{self.tag}:quarantine"

    @property
    def quarantined(self) -> str:
        """Hash position of a refused entry -> its quarantine stream id: what makes recording it idempotent."""
        return f"{self.tag}:quarantined"

    def aggregate_index(self, aggregate_id: str) -> str:
        """List of the stream positions of one aggregate's events (history without a scan)."""
        return f"{self.tag}:agg:{aggregate_id}"

    def queue(self, name: str) -> str:
        """An RQ queue name; RQ prefixes it with ``rq:queue:``, the hash tag stays inside."""
        return f"{self.tag}:{name}"

    def worker_queue(self, worker_id: str) -> str:
        return f"{self.tag}:gpu:{worker_id}"

    def gpu_hits(self, worker_id: str) -> str:
        """List: requests for a model this GPU worker holds, answered from its cache without RQ."""
        return f"{self.tag}:hits:{worker_id}"

    def gpu_reply(self, request_id: str) -> str:
        """List: the one answer to a cache-hit request (expires if nobody reads it)."""
        return f"{self.tag}:reply:{request_id}"

    def worker_state(self, worker_id: str) -> str:
        return f"{self.tag}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Sorted set worker id -> last heartbeat time."""
        return f"{self.tag}:workers"

    def job(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    def lease(self, rq_job_id: str) -> str:
        """Hash: the running RQ job's lease (holder, expiry) and its fencing token (never reset)."""
        return f"{self.tag}:lease:{rq_job_id}"

    def cancel_flag(self, job_id: str) -> str:
        return f"{self.tag}:cancel:{job_id}"

    def pause_flag(self, run_id: str) -> str:
        """Set while one attempt of an install job (its RQ run id) is paused: its downloads stop."""
        return f"{self.tag}:pause:{run_id}"

    @property
    def jobs(self) -> str:
        """Sorted set of job ids by creation time."""
        return f"{self.tag}:jobs"

    def blob(self, digest: str) -> str:
        """Hash: the installs claiming one store blob (token -> time) and a delete's ``deleting`` mark."""
        return f"{self.tag}:blob:{digest}"

    def api_streams(self, client: str) -> str:
        """Sorted set: the event streams one client address holds open on any API process (seat -> expiry)."""
        return f"{self.tag}:api:streams:{client}"

    def cover(self, model_key: str, blake3: str) -> str:
        """String: the WebP bytes of one model's cover (services.covers), named by their BLAKE3."""
        return f"{self.tag}:cover:{model_key}:{blake3}"
