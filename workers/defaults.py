"""Timeouts and TTLs of the worker processes."""

MAINTENANCE_INTERVAL = 15        # s; RQ's default (600) leaves a dead worker's job waiting ten minutes
WORKER_TTL = 30                  # s; a worker silent this long is dead
JOB_MONITORING_INTERVAL = 5      # s; how often a busy worker renews its heartbeat
HEARTBEAT_INTERVAL = 2.0         # s; our own heartbeat (SimpleWorker sends none while a job runs)
WORKER_STATE_TTL = 15            # s; a worker's published state expires unless renewed
JOB_TIMEOUT = 6 * 3600           # s; downloads of large models take long
JOB_RETRIES = 3
RESULT_TTL = 24 * 3600
GPU_EXECUTION_TTL = 20           # s; a GPU job whose worker stops renewing it this long is abandoned
