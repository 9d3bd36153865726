#!lua flags=allow-oom
-- Give back a taken event without attempting it (the upstream's circuit is open): the attempt count taken by
-- take.lua is returned and no history is written, so a breaker never burns an event's attempts.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- ARGV[1] - new due time (ms)
-- ARGV[2] - schedule member
-- ARGV[3] - attempt number this caller holds (fence, as in retry.lua)
-- ARGV[4] - run this caller's attempt belongs to (`run`, else `first`: see replay.lua), optional
-- returns 1 when deferred, 0 when stale
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'run', 'first')
if v[1] ~= 'f' or v[2] ~= ARGV[3] or (ARGV[4] and (v[3] or v[4]) ~= ARGV[4]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'n', -1)
redis.call('HSET', KEYS[1], 'st', 'p', 'due', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
