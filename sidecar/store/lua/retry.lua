-- Put an event back on the schedule after a retryable failure.
-- Fenced by the attempt number: only the holder of the latest attempt may reschedule, so a slow attempt whose
-- lease ran out (and whose event another replica has taken since) cannot pull that newer attempt's lease.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- ARGV[1] - next due time (ms)
-- ARGV[2] - schedule member
-- ARGV[3] - attempt number this caller holds
-- ARGV[4] - history entry (JSON array, `AttemptRecord.to_json`)
-- ARGV[5] - last status ('' when none)
-- ARGV[6] - last error ('' when none)
-- ARGV[7] - run this caller's attempt belongs to (`run`, else `first`: see replay.lua), optional
-- returns 1 when rescheduled, 0 when stale
-- No allow-oom flag, unlike the scripts that take, defer, deliver or dead-letter: each retry adds to the event's
-- history, so a full store refuses it and the event comes back at its lease's end instead (its attempts still
-- counted by take.lua, dead-lettered at max_attempts): a store over its maxmemory for every retry of a backlog
-- could grow past what its host allows.
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'hist', 'run', 'first')
if v[1] ~= 'f' and v[1] ~= 'p' then
  return 0
end
if v[2] ~= ARGV[3] or (ARGV[7] and (v[4] or v[5]) ~= ARGV[7]) then
  return 0
end
local h = v[3]
if h and h ~= '' then h = h .. ',' .. ARGV[4] else h = ARGV[4] end
redis.call('HSET', KEYS[1], 'st', 'p', 'due', ARGV[1], 'ls', ARGV[5], 'le', ARGV[6], 'hist', h)
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
