-- Mark an event delivered: off the schedule, payload dropped, claim kept for the dedupe window.
-- Applies whoever made the delivering attempt (delivered is the truth even from a stale attempt).
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - the shard's stats hash
-- ARGV[1] - now (ms)
-- ARGV[2] - dedupe ttl (ms)
-- ARGV[3] - schedule member
-- ARGV[4] - history entry (JSON object)
-- ARGV[5] - upstream status
-- ARGV[6] - route name (stats)
-- returns 1 when marked, 0 when the event is gone or already final
local st = redis.call('HGET', KEYS[1], 'st')
if not st or st == 'd' or st == 'x' then
  return 0
end
local h = redis.call('HGET', KEYS[1], 'hist')
if h and h ~= '' then h = h .. ',' .. ARGV[4] else h = ARGV[4] end
redis.call('HSET', KEYS[1], 'st', 'd', 'done', ARGV[1], 'ls', ARGV[5], 'le', '', 'hist', h)
redis.call('HDEL', KEYS[1], 'body')
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':pending', -1)
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':delivered', 1)
return 1
