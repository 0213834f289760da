#!/bin/sh
# Start one Redis data node of the Sentinel variant (compose.ha.yaml, k8s/sentinel/).
#
# Which primary to follow is decided at every start, never taken from a stale file:
#   1. the primary the sentinels name now, when one of them answers (a node that was primary before a
#      failover comes back as a replica of the new primary instead of a second primary);
#   2. else REDIS_REPLICA_OF (the initial topology: empty, or this node's own address, on the initial primary).
# Environment: REDIS_PASSWORD (required), REDIS_REPLICA_OF (host[:port]), REDIS_ANNOUNCE_HOST (the name
# other nodes and the sentinels reach this node by), SENTINEL_HOSTS (host:port,...), SENTINEL_SERVICE,
# SENTINEL_PASSWORD, REDIS_PORT (default 6379), REDIS_CONF_TEMPLATE (default /usr/local/etc/redis/redis.conf).
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set}"
template=${REDIS_CONF_TEMPLATE:-/usr/local/etc/redis/redis.conf}
conf=${REDIS_CONF:-/data/redis.conf}
my_port=${REDIS_PORT:-6379}
cp "$template" "$conf"

primary=""
if [ -n "${SENTINEL_HOSTS:-}" ]; then
  if [ -n "${SENTINEL_PASSWORD:-}" ]; then export REDISCLI_AUTH="$SENTINEL_PASSWORD"; fi
  for address in $(echo "$SENTINEL_HOSTS" | tr ',' ' '); do
    answer=$(redis-cli -h "${address%:*}" -p "${address##*:}" --raw \
             SENTINEL get-master-addr-by-name "${SENTINEL_SERVICE:-modelbus}" 2>/dev/null || true)
    case "$answer" in
      ""|*ERR*|*NOAUTH*|*WRONGPASS*) continue ;;
    esac
    primary=$(echo "$answer" | tr '\n' ' ' | sed 's/ *$//')
    break
  done
  unset REDISCLI_AUTH || true
fi

is_me() {  # $1 $2: the host and port the sentinels gave
  [ "$2" = "$my_port" ] || return 1
  [ "$1" = "${REDIS_ANNOUNCE_HOST:-}" ] && return 0
  for own in $(hostname -i 2>/dev/null) $(hostname) localhost 127.0.0.1; do
    [ "$1" = "$own" ] && return 0
  done
  return 1
}

if [ -n "$primary" ]; then
  host=${primary% *}; port=${primary#* }
  if ! is_me "$host" "$port"; then
    echo "replicaof $host $port" >> "$conf"
  fi
  echo "ha-entrypoint: sentinels name $host:$port as primary" >&2
elif [ -n "${REDIS_REPLICA_OF:-}" ]; then
  host=${REDIS_REPLICA_OF%:*}; port=${REDIS_REPLICA_OF##*:}
  [ "$port" = "$REDIS_REPLICA_OF" ] && port=6379
  if is_me "$host" "$port"; then  # a StatefulSet gives every pod the same REDIS_REPLICA_OF (pod 0)
    echo "ha-entrypoint: no sentinel answered; this node is the initial primary" >&2
  else
    echo "replicaof $host $port" >> "$conf"
    echo "ha-entrypoint: no sentinel answered; following the initial primary $host:$port" >&2
  fi
else
  echo "ha-entrypoint: no sentinel answered; starting as the initial primary" >&2
fi
if [ -n "${REDIS_ANNOUNCE_HOST:-}" ]; then
  echo "replica-announce-ip $REDIS_ANNOUNCE_HOST" >> "$conf"
fi

# passwords on the command line, not in the file on the volume
exec redis-server "$conf" --port "$my_port" --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD"
