#!lua flags=allow-oom
-- Mark an event dead after its dead letter has been written (dlq_add.lua runs first: if this process dies in
-- between, the event is still scheduled and gets buried again, idempotently, rather than vanishing).
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - the shard's stats hash
-- ARGV[1] - now (ms)
-- ARGV[2] - dedupe ttl (ms)
-- ARGV[3] - schedule member
-- ARGV[4] - attempt number this caller holds (fence, as in retry.lua)
-- ARGV[5] - history entry (JSON array, `AttemptRecord.to_json`)
-- ARGV[6] - last status ('' when none)
-- ARGV[7] - last error ('' when none)
-- ARGV[8] - route name (stats)
-- ARGV[9] - run this caller's attempt belongs to (`run`, else `first`: see replay.lua), optional
-- returns 1 when marked, 0 when stale
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'hist', 'run', 'first')
if v[1] ~= 'f' and v[1] ~= 'p' then
  return 0
end
if v[2] ~= ARGV[4] or (ARGV[9] and (v[4] or v[5]) ~= ARGV[9]) then
  return 0
end
local h = v[3]
if h and h ~= '' then h = h .. ',' .. ARGV[5] else h = ARGV[5] end
redis.call('HSET', KEYS[1], 'st', 'x', 'done', ARGV[1], 'ls', ARGV[6], 'le', ARGV[7], 'hist', h)
redis.call('HDEL', KEYS[1], 'body', 'bur')  -- its burial note (burying.lua) too
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[8] .. ':pending', -1)
redis.call('HINCRBY', KEYS[3], ARGV[8] .. ':dead', 1)
return 1
