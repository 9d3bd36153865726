-- Remove one dead letter, only if it is still the version the caller read (same dead_at): an event replayed and
-- buried again meanwhile has a new version under the same id, which must stay.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - all dead letters zset
-- KEYS[2] - item data hash
-- KEYS[3] - item body hash
-- KEYS[4] - the item's route zset
-- KEYS[5] - taken hash (dlq_take.lua): the item's mark goes with it
-- KEYS[6] - this version's removal marker (`{dlq}:gone:<id>:<dead_at>`), holding the remover's token for a
--           minute: the same removal run again (the client resends it after a lost answer) is answered removed,
--           not gone; another remover of that version is still told gone
-- ARGV[1] - item id
-- ARGV[2] - dead_at (ms) the caller read
-- ARGV[3] - the remover's token (unique per removal call)
-- ARGV[4] - optional: a held drain's id; the item is removed only if that drain took it (dlq_take.lua), its
--           lease ended or not, and nobody has taken it since, nor was it given back
-- returns 1 when removed, 0 when gone or replaced by a newer version, -1 when another owner holds it now,
-- -2 when it is there but the drain given does not hold it
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  if redis.call('GET', KEYS[6]) == ARGV[3] then
    return 1
  end
  return 0
end
if ARGV[4] then
  local cur = redis.call('HGET', KEYS[5], ARGV[1])
  local owner, version, ends
  if cur then
    owner, version, ends = string.match(cur, '^(%S+) (%S+) (%S+)$')
  end
  if owner == ARGV[4] and tonumber(version) ~= tonumber(ARGV[2]) then
    return 0  -- the version this drain took was replaced (buried again): gone
  end
  if owner ~= ARGV[4] then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if owner and tonumber(version) == tonumber(ARGV[2]) and tonumber(ends) > now then
      return -1
    end
    return -2
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
-- pcall: a full store (maxmemory, noeviction) still removes, which is how it frees memory; only the marker is lost
redis.pcall('SET', KEYS[6], ARGV[3], 'PX', 60000)
return 1
