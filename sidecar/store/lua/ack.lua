#!lua flags=allow-oom
-- Mark events delivered: off the schedule, payload and metadata dropped, claim kept for the dedupe window.
-- Applies whoever made the delivering attempt (delivered is the truth even from a stale attempt).
-- Several events per call: the delivered marks of one flush go in one script call (one call per shard on a
-- cluster, where a script's keys must share a slot; any mix of shards on a single server).
-- For event i (1-based):
--   KEYS[3i-2] - the event hash
--   KEYS[3i-1] - its shard's schedule zset
--   KEYS[3i]   - its shard's stats hash
--   ARGV[4i-1] - schedule member
--   ARGV[4i]   - history entry (JSON array, `AttemptRecord.to_json`)
--   ARGV[4i+1] - upstream status
--   ARGV[4i+2] - route name (stats)
-- ARGV[1] - now (ms)
-- ARGV[2] - dedupe ttl (ms)
-- returns, per event, 1 when marked, 0 when the event is gone or already final
--#include lib_rewrite
local out = {}
for i = 1, #KEYS / 3 do
  local ev, sched, stats = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 4 * i - 1
  local f = redis.call('HMGET', ev, 'st', 'n', 'first', 'eid', 'hist')
  local st = f[1]
  if not st or st == 'd' or st == 'x' then
    out[i] = 0
  else
    -- The event is rewritten with only what the dedupe window needs (state, counts, times, history): no
    -- payload, no request metadata. A hash that once held the body keeps Redis's large encoding even after
    -- HDEL; recreated small, it takes the compact one (~4x less memory for every delivered event kept).
    local h = f[5]
    if h and h ~= '' then h = h .. ',' .. ARGV[a + 1] else h = ARGV[a + 1] end
    rewrite(ev, {'st', 'd', 'n', f[2] or 0, 'first', f[3] or ARGV[1], 'eid', f[4] or '', 'done', ARGV[1],
                 'ls', ARGV[a + 2], 'hist', h})
    redis.call('ZREM', sched, ARGV[a])
    redis.call('PEXPIRE', ev, ARGV[2])
    redis.call('HINCRBY', stats, ARGV[a + 3] .. ':pending', -1)
    redis.call('HINCRBY', stats, ARGV[a + 3] .. ':delivered', 1)
    out[i] = 1
  end
end
return out
