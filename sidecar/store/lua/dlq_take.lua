-- Take one dead letter for an operator's drain or replay, so that two of them never both act on it: a drain
-- emits only the items it took, a replay schedules only those it took. Taken for a lease (a drain or replay that
-- dies gives the item back when it ends); only the version the caller read (same dead_at) can be taken, so a copy
-- read before the item was replayed and buried again is refused.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - all dead letters zset
-- KEYS[2] - taken hash (id -> "<owner> <dead_at> <until ms>")
-- ARGV[1] - item id
-- ARGV[2] - dead_at (ms) the caller read
-- ARGV[3] - owner (one drain or replay request)
-- ARGV[4] - now (ms)
-- ARGV[5] - lease (ms)
-- returns 1 when taken by this owner, 0 when gone, replaced, or held by another owner
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then
  local owner, version, ends = string.match(cur, '^(%S+) (%S+) (%S+)$')
  if owner and owner ~= ARGV[3] and tonumber(version) == tonumber(ARGV[2]) and tonumber(ends) > tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ' ' .. ARGV[2] .. ' ' .. (tonumber(ARGV[4]) + tonumber(ARGV[5])))
return 1
