-- One bounded step of a last_status-filtered listing: look at up to ARGV[9] dead letters in (dead_at, id) order
-- after a position, count those whose last_status matches, and return the matching ones after the client's
-- cursor. The caller repeats from the returned position until the window is exhausted, so the server is never
-- busy for more than one step however long the DLQ is (each item's JSON has to be decoded to filter it).
-- All keys share the {dlq} hash tag.
-- KEYS[1] - the index zset: all dead letters, or one route's (score = dead_at ms, member = id)
-- KEYS[2] - item data hash (id -> JSON)
-- ARGV[1] - scan after this dead_at (ms), or '' to start at the beginning of the window
-- ARGV[2] - ... and this id
-- ARGV[3] - lowest dead_at to include (ms, or '-inf')
-- ARGV[4] - highest dead_at to include (ms, or '+inf')
-- ARGV[5] - last_status filter: 'eq:<code>', 'class:<digit>' (e.g. 5 for 5xx) or 'none' (no status)
-- ARGV[6] - return only matches after this dead_at (ms) (the client's cursor), or '' for all
-- ARGV[7] - ... and this id
-- ARGV[8] - return at most this many matches (they are still counted past it)
-- ARGV[9] - look at most at this many items in this step
-- returns {matched, last dead_at, last id, id, dead_at, item JSON, ...}: `matched` counts the matches looked at
-- in this step; last dead_at/id is where the next step starts, '' when the window is exhausted.
local key, data = KEYS[1], KEYS[2]
local status = ARGV[5]
local want, budget = tonumber(ARGV[8]), tonumber(ARGV[9])

--#include lib_dlq_order

local function matches(item)
  local ok, decoded = pcall(cjson.decode, item)
  if not ok then return false end
  local s = decoded['last_status']
  if type(s) ~= 'number' then return status == 'none' end
  if string.sub(status, 1, 3) == 'eq:' then return s == tonumber(string.sub(status, 4)) end
  if string.sub(status, 1, 6) == 'class:' then return math.floor(s / 100) == tonumber(string.sub(status, 7)) end
  return false
end

local function after_cursor(score, id)
  if ARGV[6] == '' then return true end
  local s, c = tonumber(score), tonumber(ARGV[6])
  if s ~= c then return s > c end
  return not le(id, ARGV[7])
end

local start = 0
if ARGV[3] ~= '-inf' then start = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[3]) end
if ARGV[1] ~= '' then start = math.max(start, rank_after(key, ARGV[1], ARGV[2])) end
local stop = redis.call('ZCOUNT', key, '-inf', ARGV[4])  -- exclusive end rank
local last = math.min(start + budget, stop) - 1

local out = {0, '', ''}
if last < start then return out end
local chunk = redis.call('ZRANGE', key, start, last, 'WITHSCORES')
local taken = 0
for i = 1, #chunk, 2 do
  local item = redis.call('HGET', data, chunk[i])
  if item and matches(item) then
    out[1] = out[1] + 1
    if taken < want and after_cursor(chunk[i + 1], chunk[i]) then
      taken = taken + 1
      table.insert(out, chunk[i])
      table.insert(out, chunk[i + 1])
      table.insert(out, item)
    end
  end
end
if last + 1 < stop then
  out[2] = chunk[#chunk]
  out[3] = chunk[#chunk - 1]
end
return out
