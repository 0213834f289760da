"""Every timeout and limit of the client, the API and the CLI, in one place."""

RECONNECT_BACKOFF_BASE = 0.1      # s; a subscriber's first wait after Redis went away, doubled per try
RECONNECT_BACKOFF_CAP = 2.0       # s
WAIT_POLL_BLOCK_MS = 500          # how long one blocking read waits inside wait()
WORKER_ALIVE_SECONDS = 30.0       # a worker whose last heartbeat is older is reported dead
LIST_LIMIT_MAX = 10_000           # largest page the API serves
LIST_LIMIT_DEFAULT = 100
SSE_KEEPALIVE_SECONDS = 15.0      # comment line sent on an idle SSE stream (proxies drop silent ones)
SSE_BLOCK_MS = 500                # an SSE subscriber notices a gone client within about this long
HEALTH_REDIS_TIMEOUT = 2.0        # s; /healthz answers 503 rather than hang on a dead Redis
SCAN_TIMEOUT = 600.0              # s the API waits for a worker's scan or sync before answering 504
SCAN_POLL_INTERVAL = 0.05         # s between two looks at a scan job's status
SCAN_RESULT_TTL = 3600            # s RQ keeps a scan job's answer
HEALTH_REFRESH_SECONDS = 1.0      # s; /healthz serves its last probe for this long (one probe at a time)
