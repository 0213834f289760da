"""Lua scripts. The append is one script so that the version check, the idempotency check, the unique
claims and the XADDs happen atomically: either every event of the batch lands or none does.

Every command a script runs costs every writer of the fleet (Redis runs them one at a time), so the append
touches as little as it can: what an idempotency key recorded is plain text, ``"<version> <id> <id>..."``,
not JSON. (The version is kept in its own hash, not taken from the length of the aggregate's index: an entry
forged onto the index must not shift the versions of real ones, see events.validation.)

KEYS: 1 log stream, 2 versions hash, 3 idempotency hash, 4 unique hash, 5 aggregate index list,
      6 activity stream
ARGV: aggregate id, expected version ('' = any), idempotency key ('' = none), event count,
      then 6 values per event (type, schema version, time, correlation id, event id, body),
      then claim count and (field, owner) pairs, then release count and fields,
      then the count of activity events to announce once the append has landed, the activity stream's
      approximate cap, and 7 values per activity event (type, schema version, aggregate id, time,
      correlation id, event id, body): the news of the append in the same round trip (none for a duplicate).
Returns {duplicate (0|1), "<version> <id> <id>..."} (a duplicate of an append recorded by the script
before this one: {1, JSON {"ids": [...], "version": n}}).
"""

PER_EVENT = 6
PER_ANNOUNCED = 7

APPEND = """
local agg = ARGV[1]
local expected = ARGV[2]
local idem = ARGV[3]
if idem ~= '' then
  local prior = redis.call('HGET', KEYS[3], idem)
  if prior then return {1, prior} end
end
local current = tonumber(redis.call('HGET', KEYS[2], agg) or '0')
if expected ~= '' and tonumber(expected) ~= current then
  return redis.error_reply('CONFLICT ' .. current)
end
local n = tonumber(ARGV[4])
local after = 5 + n * 6
local nclaims = tonumber(ARGV[after])
for i = 1, nclaims do
  local field = ARGV[after + 2 * i - 1]
  local owner = redis.call('HGET', KEYS[4], field)
  if owner and owner ~= ARGV[after + 2 * i] then
    return redis.error_reply('UNIQUE ' .. owner .. ' ' .. field)
  end
end
local ids = {}
for i = 0, n - 1 do
  local o = 5 + i * 6
  current = current + 1
  ids[i + 1] = redis.call('XADD', KEYS[1], '*', 'type', ARGV[o], 'v', ARGV[o + 1], 'agg', agg, 'ver', current,
                          'time', ARGV[o + 2], 'corr', ARGV[o + 3], 'id', ARGV[o + 4], 'body', ARGV[o + 5])
  redis.call('RPUSH', KEYS[5], ids[i + 1])
end
redis.call('HSET', KEYS[2], agg, current)
for i = 1, nclaims do
  redis.call('HSET', KEYS[4], ARGV[after + 2 * i - 1], ARGV[after + 2 * i])
end
local rel = after + 2 * nclaims + 1
for i = 1, tonumber(ARGV[rel]) do
  local field = ARGV[rel + i]
  if redis.call('HGET', KEYS[4], field) == agg then redis.call('HDEL', KEYS[4], field) end
end
local result = current .. ' ' .. table.concat(ids, ' ')
if idem ~= '' then redis.call('HSET', KEYS[3], idem, result) end
local ann = rel + tonumber(ARGV[rel]) + 1
for i = 0, tonumber(ARGV[ann] or '0') - 1 do
  local o = ann + 2 + i * 7
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[ann + 1], '*', 'type', ARGV[o], 'v', ARGV[o + 1], 'agg', ARGV[o + 2],
             'time', ARGV[o + 3], 'corr', ARGV[o + 4], 'id', ARGV[o + 5], 'body', ARGV[o + 6])
end
return {0, result}
"""

# Quarantine one refused entry once, however many readers refuse it.
# KEYS: 1 quarantine stream, 2 quarantined hash. ARGV: position, type, aggregate, version, reason, time.
# Returns 1 when this call recorded it, 0 when it was recorded before.
QUARANTINE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'position', ARGV[1], 'type', ARGV[2], 'agg', ARGV[3],
                      'ver', ARGV[4], 'reason', ARGV[5], 'time', ARGV[6])
redis.call('HSET', KEYS[2], ARGV[1], id)
return 1
"""
