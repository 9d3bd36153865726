#!lua flags=allow-oom
-- Step 0 of a burial: read the event's fence and, when the burying attempt still holds the event, note on it that
-- it is being buried (field `bur`) before the dead letter is written (dlq_add.lua) and the event marked dead
-- (dead.lua). A process that dies, or a store write that fails for good, between those steps leaves the event
-- scheduled with its dead letter already listed: the next take (take.lua returns `bur`) finishes the burial
-- instead of sending the event again, which could deliver it while its dead letter stays (a drain or replay would
-- hand it out a second time). dead.lua clears the note; replay.lua starts a new hash without it.
-- KEYS[1] - the event hash
-- ARGV[1] - attempt number the caller holds (fence, as in dead.lua)
-- ARGV[2] - the burial: JSON {"reason": ..., "entry": history entry (`AttemptRecord.to_json`)}
-- ARGV[3] - run the caller's attempt belongs to (as in dead.lua), optional
-- returns {st, n, run, first} as read (before the note)
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'run', 'first')
if (v[1] == 'f' or v[1] == 'p') and v[2] == ARGV[1] and (not ARGV[3] or (v[3] or v[4]) == ARGV[3]) then
  redis.call('HSET', KEYS[1], 'bur', ARGV[2])
end
return v
