"""Timeouts and TTLs of the worker processes."""

MAINTENANCE_INTERVAL = 3         # s; how often a worker looks for the jobs of dead workers (RQ's default: 600)
WORKER_TTL = 20                  # s; a worker silent this long is dead (RQ's dequeue wait is this less 15 s)
MAINTENANCE_LOCK_TTL = 30       # s; a worker that dies holding the maintenance lock blocks the others this long
JOB_MONITORING_INTERVAL = 2      # s; how often a busy worker renews its heartbeat and its job's
JOB_HEARTBEAT_SLACK = 6          # s; a running job whose worker stopped renewing it this much longer is abandoned
PUBSUB_POLL = 1.0                # s; how long the thread taking RQ's worker commands waits per poll (a stop joins it)
HEARTBEAT_INTERVAL = 2.0         # s; our own heartbeat (SimpleWorker sends none while a job runs)
HEARTBEAT_COALESCE = 1.0         # s; RQ's loop beats again this soon with the same TTL: not sent (runner._Fenced)
WORKER_STATE_TTL = 15            # s; a worker's published state expires unless renewed
JOB_TIMEOUT = 6 * 3600           # s; downloads of large models take long
JOB_RETRIES = 3
RESULT_TTL = 24 * 3600
GPU_EXECUTION_TTL = 20           # s; a GPU job whose worker stops renewing it this long is abandoned

LEASE_TTL = 8.0                  # s; a running job's lease lapses unless its holder renews it within this
LEASE_RENEW_EVERY = 2.0          # s; how often the holder renews it
LEASE_SAFETY = 0.75              # a holder trusts its lease for this share of the TTL after a renewal was sent
LEASE_KEEP = 7 * 24 * 3600       # s; the lease record (and its fencing token) outlives the job this long
LEASE_POLL = 0.5                 # s; a re-run waiting for a live holder's lease asks again this often

REDIS_BACKOFF_START = 0.5        # s; a worker that lost Redis waits this long before the first retry
REDIS_BACKOFF_MAX = 10.0         # s; ... doubling up to this, for as long as the outage lasts

SLOT_RESTART_START = 1.0         # s; a worker slot (workers.pool) that died starts again after this
SLOT_RESTART_MAX = 30.0          # s; ... doubling with each quick death up to this
SLOT_STABLE_AFTER = 60.0         # s; a slot that ran this long before it died starts again at once
SLOT_POLL = 0.2                  # s; how often the pool's supervisor looks for dead slots
