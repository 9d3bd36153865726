-- Claim an event and persist it, atomically, before any forward.
-- Why one script: a SET NX followed by a separate write would let a crash between the two answer the provider's
-- retry "duplicate" for an event nobody holds. Here the claim, the stored request and the schedule entry (with a
-- short lease, so a replica retries it if this process dies mid-forward) appear together or not at all.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - the shard's stats hash (`<route>:pending|delivered|dead|duplicates` counters)
-- ARGV[1] - now (ms)
-- ARGV[2] - lease deadline (ms): when another replica may take the event if this one never reports back; with
--           'f', at least the store's TIME + (ARGV[2] - ARGV[1]), as in take.lua (a replica whose clock stood still)
-- ARGV[3] - schedule member (`<route>:<dedupe id>`)
-- ARGV[4] - request metadata (JSON: method, path, headers, forwarding context, event id)
-- ARGV[5] - raw body
-- ARGV[6] - public event id
-- ARGV[7] - 'f': attempt 1 is being made now (score = lease deadline), or 'p': no attempt now, the upstream's
--           circuit is open (score = due time of attempt 1)
-- ARGV[8] - route name (for the stats counters)
-- returns {1} when claimed (attempt 1 is ours), or {0, state, public id of the stored event} for a duplicate
-- (state: f|p|d|x)
-- A server older than Redis 7.0 has no redis.REDIS_VERSION, and cannot compile the other scripts (their
-- `#!lua flags=` line): a claim taken there would be answered 2xx and never retried, marked or dead-lettered.
if not redis.REDIS_VERSION then
  return redis.error_reply('UNSUPPORTED the store is older than Redis 7.0: the sidecar needs Redis 7.0 or later, or Valkey')
end
local held = redis.call('HMGET', KEYS[1], 'st', 'eid')
if held[1] then
  -- pcall: a store refusing writes (maxmemory) still answers a duplicate as one; only the counter is lost
  redis.pcall('HINCRBY', KEYS[3], ARGV[8] .. ':duplicates', 1)
  return {0, held[1], held[2] or ''}
end
local n = 1
if ARGV[7] == 'p' then n = 0 end
local score = tonumber(ARGV[2])
if ARGV[7] ~= 'p' then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (score - tonumber(ARGV[1]))
  if floor > score + 1000 then score = floor end  -- behind by more than a round trip's slack
end
-- The schedule entry before the event: a script is not rolled back when a command fails half way (an ACL or a
-- renamed command refusing TIME or ZADD), and an event stored without its entry would be answered `duplicate` to
-- every resend and never delivered. An entry without its event is harmless: take.lua drops it.
redis.call('ZADD', KEYS[2], string.format('%d', score), ARGV[3])
redis.call('HSET', KEYS[1], 'st', ARGV[7], 'n', n, 'first', ARGV[1], 'eid', ARGV[6], 'meta', ARGV[4], 'body', ARGV[5])
redis.call('HINCRBY', KEYS[3], ARGV[8] .. ':pending', 1)
return {1}
