-- One page of dead letters in (dead_at, id) order, positioned by the last item of the previous page (not by an
-- offset), so a cursor stays valid while items are added or removed. Read-only; one script so that locating the
-- cursor and reading the page see the same index.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - the index zset: all dead letters, or one route's (score = dead_at ms, member = id)
-- KEYS[2] - item data hash (id -> JSON)
-- ARGV[1] - cursor dead_at (ms), or '' to start at the beginning
-- ARGV[2] - cursor id (ids are compared bytewise, as the zset orders equal scores)
-- ARGV[3] - lowest dead_at to include (ms, or '-inf')
-- ARGV[4] - highest dead_at to include (ms, or '+inf')
-- ARGV[5] - page size (>= 1)
-- ARGV[6] - last_status filter: '' (none), 'eq:<code>', 'class:<digit>' (e.g. 5 for 5xx) or 'none' (no status)
-- returns {total, more, id, dead_at, item JSON, id, dead_at, item JSON, ...}: `total` counts every item matching
-- the filters (not only those after the cursor); `more` is 1 when items follow the page.
local key, data = KEYS[1], KEYS[2]
local limit = tonumber(ARGV[5])
local status = ARGV[6]

-- Bytewise less-or-equal (Lua's `<=` on strings follows the server's locale; the zset does not).
local function le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end

-- First rank whose (score, member) sorts after (score, id): binary search among the members with that score.
local function rank_after(score, id)
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. score)
  local hi = redis.call('ZCOUNT', key, '-inf', score)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local m = redis.call('ZRANGE', key, mid, mid)[1]
    if le(m, id) then lo = mid + 1 else hi = mid end
  end
  return lo
end

local first = 0
if ARGV[3] ~= '-inf' then first = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[3]) end
local stop = redis.call('ZCOUNT', key, '-inf', ARGV[4])  -- exclusive end rank
local start = first
if ARGV[1] ~= '' then start = math.max(first, rank_after(ARGV[1], ARGV[2])) end

local function matches(item)
  if status == '' then return true end
  local ok, decoded = pcall(cjson.decode, item)
  if not ok then return false end
  local s = decoded['last_status']
  if type(s) ~= 'number' then return status == 'none' end
  if string.sub(status, 1, 3) == 'eq:' then return s == tonumber(string.sub(status, 4)) end
  if string.sub(status, 1, 6) == 'class:' then return math.floor(s / 100) == tonumber(string.sub(status, 7)) end
  return false
end

local out = {0, 0}
if status == '' then
  out[1] = math.max(stop - first, 0)
  local last = math.min(start + limit, stop) - 1
  if last >= start then
    local page = redis.call('ZRANGE', key, start, last, 'WITHSCORES')
    for i = 1, #page, 2 do
      table.insert(out, page[i])
      table.insert(out, page[i + 1])
      table.insert(out, redis.call('HGET', data, page[i]) or '')
    end
  end
  if start + limit < stop then out[2] = 1 end
  return out
end

-- With a status filter every item in the dead_at window is looked at (the total needs them all); the DLQ is
-- capped by dlq.max_length, which bounds this scan.
local total, taken = 0, 0
local rank = first
while rank < stop do
  local last = math.min(rank + 200, stop) - 1
  local chunk = redis.call('ZRANGE', key, rank, last, 'WITHSCORES')
  for i = 1, #chunk, 2 do
    local item = redis.call('HGET', data, chunk[i])
    if item and matches(item) then
      total = total + 1
      if rank + (i - 1) / 2 >= start then
        if taken < limit then
          taken = taken + 1
          table.insert(out, chunk[i])
          table.insert(out, chunk[i + 1])
          table.insert(out, item)
        else
          out[2] = 1
        end
      end
    end
  end
  rank = last + 1
end
out[1] = total
return out
