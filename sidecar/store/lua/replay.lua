#!lua flags=allow-oom
-- Put a dead-lettered event back on its shard's schedule, due now, for the retry worker: replay takes the same
-- path as every retry. The caller removes the dead letter only after this returned, so a crash in between leaves
-- the item in the DLQ (a second replay is then a no-op) rather than losing the event.
-- No-op unless the event is dead or gone (expired, forgotten): an event that is pending, in flight or delivered
-- is never scheduled twice, so concurrent replays of one item deliver it once.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - the shard's stats hash
-- ARGV[1] - now (ms): the due time
-- ARGV[2] - schedule member (`<route>:<dedupe id>`)
-- ARGV[3] - request metadata JSON (from the dead letter)
-- ARGV[4] - raw body (from the dead letter)
-- ARGV[5] - public event id
-- ARGV[6] - first seen (ms)
-- ARGV[7] - the attempt history so far (comma-joined JSON entries, '' when none)
-- ARGV[8] - replay marker entry (JSON object: replayed_at_ms, reason)
-- ARGV[9] - last status ('' when none)
-- ARGV[10] - last error ('' when none)
-- ARGV[11] - route name (stats)
-- ARGV[12] - the dead letter's version (its dead_at, ms): kept on the event as `dlv`
-- returns {1} when scheduled, {0, state} when left alone (state: f|p|d)
--#include lib_rewrite
local old = redis.call('HMGET', KEYS[1], 'st', 'run', 'first', 'dlv')
local st = old[1]
if st == 'f' or st == 'p' then
  -- Already scheduled from this very dead letter: this is the same replay run again (its answer was lost and
  -- the client resent it, or the caller died before removing the dead letter). Answered as scheduled, so the
  -- caller removes the dead letter rather than keep an item whose event is on its way (a drain would hand it
  -- out again).
  if old[4] == ARGV[12] then
    return {1}
  end
  return {0, st}
end
if st == 'd' then
  return {0, st}
end
-- A new run of attempts: its attempt numbers start again from 1, so an attempt of an earlier run still settling
-- (a replica paused past its lease) must not pass the attempt-number fence of retry/dead/defer.lua as this run's.
-- A run is named by a time (ms): a claim's run is its `first` (no `run` field), a replay's the later of its own
-- time and the run before it plus 1. Never a run an earlier life of the event had: its hash may have expired
-- (dedupe.ttl) or been forgotten since, taking its run with it, and a re-claim starts from its own first sight.
local run = math.max((tonumber(old[2]) or tonumber(old[3]) or 0) + 1, tonumber(ARGV[1]))
local h = ARGV[7]
if h ~= '' then h = h .. ',' .. ARGV[8] else h = ARGV[8] end
-- Rewritten whole: no field of the dead incarnation survives, and the new hash has no TTL (pending never expires).
-- n = 0: take.lua makes it 1, so the replay starts a fresh run of attempts.
rewrite(KEYS[1], {'st', 'p', 'n', 0, 'first', ARGV[6], 'eid', ARGV[5], 'meta', ARGV[3],
  'body', ARGV[4], 'hist', h, 'due', ARGV[1], 'ls', ARGV[9], 'le', ARGV[10], 'run', string.format('%d', run),
  'dlv', ARGV[12]})
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[11] .. ':pending', 1)
return {1}
