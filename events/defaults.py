"""Every timeout, TTL and limit of the event layer, in one place."""

READ_BATCH = 1000                 # entries fetched per XRANGE/XREAD call
HISTORY_CACHE = 512               # aggregates whose decoded history a store keeps (RedisEventStore.history)
RECENT_ENTRIES = 512              # log entries a store appended or saw arrive, kept for its history reads
REBUILD_BATCH = 5000              # entries per XRANGE during a full replay (read ahead while the last applies)
SUBSCRIBE_BLOCK_MS = 1000         # how long one blocking XREAD waits before looping
RECONNECT_BACKOFF_BASE = 0.05     # seconds; doubled per failed attempt
RECONNECT_BACKOFF_CAP = 2.0
RECONNECT_DEADLINE = 30.0         # seconds of retrying a transient Redis error before giving up
ACTIVITY_MAXLEN = 100_000         # approximate cap of the activity stream
RECLAIM_MIN_IDLE_MS = 30_000      # a pending entry idle this long belongs to a dead consumer
EMBEDDED_START_TIMEOUT = 20.0     # seconds to wait for an embedded redis-server to answer
SOCKET_TIMEOUT = 10.0
REPLICATION_TIMEOUT_MS = 5000    # how long an append waits for its replicas (durability=replicated)
WATCH_HEARTBEAT = 0.5             # seconds between a log watch's pings on its tracking connection
WATCH_MAX_QUIET = 2.0             # a log watch trusts silence this long after its last answered ping
WATCH_RETRY_EVERY = 1.0           # seconds before a lost log watch connects again
WATCH_PING_TIMEOUT = 0.5          # a ping unanswered this long drops the watch (reads make the round trip)
