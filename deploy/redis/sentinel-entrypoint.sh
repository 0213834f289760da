#!/bin/sh
# Start one Sentinel of the Sentinel variant (compose.ha.yaml, k8s/sentinel/).
#
# The config file is written on the first start only: Sentinel rewrites it with what it learned (the
# current primary after a failover, the other sentinels, the replicas), and a restart must keep that.
# Environment: REDIS_PASSWORD (data nodes), SENTINEL_PASSWORD (optional: this sentinel's own
# password, also used to talk to the other sentinels), SENTINEL_SERVICE (default modelbus),
# SENTINEL_PRIMARY (host[:port] of the initial primary), SENTINEL_QUORUM (default 2),
# SENTINEL_ANNOUNCE_HOST (optional), SENTINEL_DOWN_AFTER_MS (default 5000),
# SENTINEL_FAILOVER_TIMEOUT_MS (default 60000).
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set}"
: "${SENTINEL_PRIMARY:?SENTINEL_PRIMARY must be set (the initial primary, host[:port])}"
conf=${SENTINEL_CONF:-/data/sentinel.conf}
service=${SENTINEL_SERVICE:-modelbus}
host=${SENTINEL_PRIMARY%:*}; port=${SENTINEL_PRIMARY##*:}
[ "$port" = "$SENTINEL_PRIMARY" ] && port=6379

if [ ! -f "$conf" ]; then
  {
    echo "port ${SENTINEL_PORT:-26379}"
    echo "sentinel resolve-hostnames yes"
    if [ -n "${SENTINEL_ANNOUNCE_HOST:-}" ]; then
      echo "sentinel announce-hostnames yes"
      echo "sentinel announce-ip $SENTINEL_ANNOUNCE_HOST"
    fi
    echo "sentinel monitor $service $host $port ${SENTINEL_QUORUM:-2}"
    echo "sentinel auth-pass $service $REDIS_PASSWORD"
    echo "sentinel down-after-milliseconds $service ${SENTINEL_DOWN_AFTER_MS:-5000}"
    echo "sentinel failover-timeout $service ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}"
    echo "sentinel parallel-syncs $service 1"
    if [ -n "${SENTINEL_PASSWORD:-}" ]; then
      echo "requirepass $SENTINEL_PASSWORD"
      echo "sentinel sentinel-pass $SENTINEL_PASSWORD"
    fi
  } > "$conf"
  echo "sentinel-entrypoint: wrote $conf (initial primary $host:$port)" >&2
fi
exec redis-server "$conf" --sentinel
