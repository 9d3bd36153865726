#!lua flags=allow-oom
-- Take one dead letter for an operator's drain or replay, so that two of them never both act on it: a drain
-- emits only the items it took, a replay schedules only those it took. Taken for a lease (a drain or replay that
-- dies gives the item back when it ends), timed by this server's clock so replicas' clocks do not matter; only the
-- version the caller read (same dead_at) can be taken, so a copy read before the item was replayed and buried
-- again is refused. A lease of 0 gives the item back, only when this owner holds it.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - all dead letters zset
-- KEYS[2] - taken hash (id -> "<owner> <dead_at> <until ms>")
-- ARGV[1] - item id
-- ARGV[2] - dead_at (ms) the caller read
-- ARGV[3] - owner (one drain or replay request)
-- ARGV[4] - lease (ms)
-- returns 1 when taken (or given back) by this owner, 0 when gone or replaced by a newer version (or, giving
-- back, not this owner's), -1 when another owner holds it
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HGET', KEYS[2], ARGV[1])
local owner, version, ends
if cur then
  owner, version, ends = string.match(cur, '^(%S+) (%S+) (%S+)$')
  if owner and owner ~= ARGV[3] and tonumber(version) == tonumber(ARGV[2]) and tonumber(ends) > now then
    return -1
  end
end
-- a hold given back or changed: the held prefix dlq_add.lua remembers (KEYS[2]..':prefix') may not stand any more
if cur then
  redis.call('DEL', KEYS[2] .. ':prefix')
end
if tonumber(ARGV[4]) == 0 then
  if owner ~= ARGV[3] or tonumber(version) ~= tonumber(ARGV[2]) then
    return 0
  end
  -- given back: no hold left at all, so this owner cannot remove it afterwards as if its hold had merely ended
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ' ' .. ARGV[2] .. ' ' .. string.format('%d', now + tonumber(ARGV[4])))
return 1
