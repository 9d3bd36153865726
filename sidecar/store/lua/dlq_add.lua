#!lua flags=allow-oom
-- Add (or overwrite) a dead letter and enforce the cap, returning what the cap evicted so the caller can count
-- and log it: a cap never drops anything silently, nor anything a drain or replay holds.
-- All keys share the {dlq} hash tag. The evicted items' per-route index is named from ARGV[6] + the item's route
-- (not knowable before the pop); it is in the same slot, so this stays a single-slot script on a cluster.
-- KEYS[1] - all dead letters zset (score dead_at ms)
-- KEYS[2] - item data hash (id -> JSON)
-- KEYS[3] - item body hash (id -> raw body)
-- KEYS[4] - this item's route zset
-- KEYS[5] - evictions counter hash (route -> count)
-- KEYS[6] - taken hash (dlq_take.lua): an evicted item's mark goes with it
-- KEYS[7] - this burial's record (`KeySpace.dlq_written`: the item id, its run and its dead_at), optional
-- ARGV[1] - item id
-- ARGV[2] - dead_at (ms)
-- ARGV[3] - item JSON (must carry "route" and "event_id")
-- ARGV[4] - raw body
-- ARGV[5] - max length
-- ARGV[6] - route zset key prefix
-- ARGV[7] - the event's first-seen time (ms), as in the item JSON
-- ARGV[8] - how long the record KEYS[7] is kept (ms), with KEYS[7]
-- returns a flat list {id written, evicted id, route, event id, ...}: the id written is ARGV[1] unless an earlier
-- life's item that a drain or replay holds has it (see below)
--
-- The id is the event's (route, dedupe id): burying it again overwrites, so a crash between the two bury steps
-- leaves one item. An item already there from an earlier life of the event (its claim forgotten by an operator,
-- the provider's resend dead too: another first-seen time) is not the same dead letter: it moves to an id of its
-- own, body and history intact, instead of being overwritten.
-- The same burial run again (its answer lost and the call tried again, or cut short before the event was marked
-- dead and finished by a later take, with the version first written) writes nothing: its dead letter may have
-- been drained, deleted, replayed or evicted since, and must not come back (a drain would hand it out twice).
if KEYS[7] then
  local written = redis.call('GET', KEYS[7])
  if written then
    -- a write all the same: the caller's WAIT (redis.wait_replicas) waits for the replicas to reach this point of
    -- the stream, so for the first run's dead letter too (a script that writes nothing leaves WAIT nothing to wait on)
    redis.call('PEXPIRE', KEYS[7], ARGV[8])
    return {written}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Does a drain or replay hold item `id` at `version` (its score) now (dlq_take.lua: that version, a lease not ended)?
-- (and, when it does, the end of that hold)
local function held(id, version)
  local hold = redis.call('HGET', KEYS[6], id)
  if not hold or not version then
    return false
  end
  local v, ends = string.match(hold, '^%S+ (%S+) (%S+)$')
  if v ~= nil and tonumber(v) == tonumber(version) and tonumber(ends) > now then
    return true, tonumber(ends)
  end
  return false
end
-- Item JSON `json` (written by RedisStore.bury: its "id" first) under id `to` instead of ARGV[1]; nil if not so
local head = '{"id": "' .. ARGV[1] .. '"'
local function renamed(json, to)
  if string.sub(json, 1, #head) == head then
    return '{"id": "' .. to .. '"' .. string.sub(json, #head + 1)
  end
end
local new_id, item = ARGV[1], ARGV[3]
local lowest = tonumber(ARGV[2])  -- the lowest dead_at written by this call (see the held prefix below)
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local seen = prev and string.match(prev, '"first_seen_ms": (%d+)')
if prev and seen ~= ARGV[7] then
  -- An earlier life's item that a drain or replay holds now stays where it is: its holder names it by this id (a
  -- held drain's client removes what it stored by id). The new life's dead letter takes an id of its own instead.
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if score and held(ARGV[1], score) then
    new_id = string.sub(redis.sha1hex(ARGV[1] .. ':' .. ARGV[7]), 1, 24)
    item = renamed(item, new_id) or item
  else
    local kept = string.sub(redis.sha1hex(ARGV[1] .. ':' .. (seen or '0')), 1, 24)
    local moved = renamed(prev, kept)
    if moved and redis.call('HEXISTS', KEYS[2], kept) == 0 then
      redis.call('HSET', KEYS[2], kept, moved)
      redis.call('HSET', KEYS[3], kept, redis.call('HGET', KEYS[3], ARGV[1]) or '')
      if score then
        redis.call('ZADD', KEYS[1], score, kept)
        redis.call('ZADD', KEYS[4], score, kept)
        lowest = math.min(lowest, tonumber(score))
      end
    end
  end
end
redis.call('HSET', KEYS[2], new_id, item)
redis.call('HSET', KEYS[3], new_id, ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], new_id)
redis.call('ZADD', KEYS[4], ARGV[2], new_id)
if KEYS[7] then
  redis.call('SET', KEYS[7], new_id, 'PX', ARGV[8])
end
local out = {new_id}  -- the id written, then what the cap evicted
-- the held prefix (see below): an item written at or before its end (a clock behind, an earlier life moved) ends it
local prefix_key = KEYS[6] .. ':prefix'
local hint = redis.call('GET', prefix_key)
local hs, hid, hend
if hint then
  hs, hid, hend = string.match(hint, '^(%S+) (%S+) (%S+)$')
  if not hs or lowest <= tonumber(hs) then
    redis.call('DEL', prefix_key)
    hint = nil
  end
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if over > 0 then
  -- The oldest items go first, but never one a drain or replay holds now (dlq_take.lua: its version, a lease not
  -- ended): a held drain's client may be storing it, and would then be told it is still in the DLQ. Held items
  -- met on the way (a drain takes the oldest first) do not count toward the cap: the DLQ may be over it by as
  -- many as are held, until they are removed or given back. The item being added is never the one evicted.
  --
  -- The held prefix: a drain takes the oldest first, so the items it holds are usually the DLQ's head, and while it
  -- holds a full DLQ (a held drain: 10 minutes by default) every new dead letter would walk all of them again, one
  -- script, the whole store waiting (~5-9 ms per dead letter at the default cap). KEYS[6]..':prefix' remembers
  -- "<dead_at> <id> <earliest hold end>": every item up to that one (in the DLQ's order) was held when it was
  -- written, none of those holds ending before the time given. It stands while that item is still there at that
  -- version, that time has not come, and nothing was written before it since: dlq_take.lua deletes it when a hold
  -- is given back or changed; this script when it writes an item at or before its dead_at.
  local skipped = 0
  local walking_prefix = true  -- everything met so far is held (or was evicted): the head of the DLQ is held
  local last_id, last_score, first_end
  if hint then
    local at = redis.call('ZSCORE', KEYS[1], hid)
    if at and tonumber(at) == tonumber(hs) and tonumber(hend) > now then
      local rank = redis.call('ZRANK', KEYS[1], hid)
      skipped = rank + 1
      over = over - (rank + 1)  -- held: they do not count toward the cap while held
      last_id, last_score, first_end = hid, hs, tonumber(hend)
    end
  end
  while over > 0 do
    local batch = redis.call('ZRANGE', KEYS[1], skipped, skipped + over - 1, 'WITHSCORES')
    if #batch == 0 then
      break
    end
    for i = 1, #batch, 2 do
      local id = batch[i]
      local is_held, ends = false, nil
      if id ~= new_id then
        is_held, ends = held(id, batch[i + 1])
      end
      if id == new_id then
        skipped = skipped + 1
        walking_prefix = false
      elseif is_held then
        skipped = skipped + 1
        over = over - 1  -- held: it does not count toward the cap while held
        if walking_prefix then
          last_id, last_score = id, batch[i + 1]
          first_end = math.min(first_end or ends, ends)
        end
      else
        local item = redis.call('HGET', KEYS[2], id)
        local route, eid = '', ''
        if item then
          local ok, decoded = pcall(cjson.decode, item)
          if ok then
            route = decoded['route'] or ''
            eid = decoded['event_id'] or ''
          end
        end
        redis.call('ZREM', KEYS[1], id)
        redis.call('ZREM', ARGV[6] .. route, id)
        redis.call('HDEL', KEYS[2], id)
        redis.call('HDEL', KEYS[3], id)
        redis.call('HDEL', KEYS[6], id)
        redis.call('HINCRBY', KEYS[5], route, 1)
        table.insert(out, id)
        table.insert(out, route)
        table.insert(out, eid)
        over = over - 1
      end
    end
  end
  if last_id then
    redis.call('SET', prefix_key, last_score .. ' ' .. last_id .. ' ' .. string.format('%d', first_end),
      'PXAT', string.format('%d', first_end))
  end
end
return out
