-- advance: one lesson request of one student, read and written atomically.
--
-- An exact mirror of gateway/clock.py `advance` (same branches, same
-- arithmetic in the same order: Lua numbers are IEEE doubles like Python
-- floats), plus the connection lease when the step allows. tests/test_store.py
-- runs one suite on this and on the memory store (which calls clock.advance),
-- and compares the two on random histories: change both together.
--
-- Numbers cross the wire as strings that round-trip exactly. A value read or
-- received is passed on as the string it came as; only computed values are
-- formatted (%.17g), because that formatting is most of this script's cost.
--
-- KEYS[1] clock hash {start, last, day, used}
-- KEYS[2] conns zset conn_id -> lease expiry (live while expiry > now)
-- ARGV    now ('' = Redis TIME), max_duration, min_break, daily_max ('' = none),
--         enforce_break ('1'/'0'), enforce_daily ('1'/'0'), day, seconds_to_day_end,
--         lease_seconds, hold conn_id ('' = none)
-- Returns {outcome, now, start, remaining, retry_after, started (0/1),
--          ended_duration, break_taken, shadowed ('a,b' in checking order),
--          ended_start (only when a lesson was closed)};
--         false (nil) for None.

local function fmt(x)
  if x == nil then return false end
  return string.format('%.17g', x)
end

local now_s = store_now(ARGV[1])  -- _clock.lua
local now = tonumber(now_s)
local max_duration = tonumber(ARGV[2])
local min_break = tonumber(ARGV[3])
local daily_max = tonumber(ARGV[4])
local enforce_break = ARGV[5] == '1'
local enforce_daily = ARGV[6] == '1'
local day = tonumber(ARGV[7])
local to_day_end = tonumber(ARGV[8])
local lease = tonumber(ARGV[9])
local hold = ARGV[10] or ''

local h = redis.call('HMGET', KEYS[1], 'start', 'last', 'day', 'used')
local start_s, last_s, used_s = h[1] or '0', h[2] or '0', h[4] or '0'
local start, last = tonumber(start_s), tonumber(last_s)
local state_day = tonumber(h[3]) or 0
local conns = redis.call('ZCOUNT', KEYS[2], '(' .. now_s, '+inf')  -- live leases

-- clock.in_lesson
local current = false
if start ~= 0 and now < start + max_duration then
  current = conns > 0 or now - last < min_break
end

-- clock.lesson_end (wanted only when no lesson is in progress)
local ended, break_end
if not current and start ~= 0 then
  local limit_end = start + max_duration
  if conns == 0 and last + min_break <= limit_end then
    ended, break_end = last, last + min_break
  else
    ended, break_end = limit_end, limit_end + min_break
  end
end

-- clock._remaining
local function remaining(lesson_start, used)
  local rem = lesson_start + max_duration - now
  if daily_max and enforce_daily then
    rem = math.min(rem, daily_max - used - (now - lesson_start))
  end
  return math.max(rem, 0)
end

-- Written only when the step allows: denials never extend a break or count
-- as lesson time. Expiries are relative (PEXPIRE deadline - now), so an
-- injected `now` cannot expire a key at once; on Redis TIME it is the same
-- as PEXPIREAT deadline.
local function keep(lesson_start)
  if hold ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_s)  -- lapsed leases go here
    redis.call('ZADD', KEYS[2], fmt(now + lease), hold)
    local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[2],
               string.format('%d', math.ceil((tonumber(top[2]) - now + 60) * 1000)))
  end
  local expires = math.max(lesson_start + max_duration + min_break, now + to_day_end) + 60
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((expires - now) * 1000)))
end

local used = 0
if state_day == day then used = tonumber(used_s) else used_s = '0' end
local shadowed = false

if daily_max then
  local spent = used
  if current then
    spent = used + (now - start)
  elseif ended and state_day == day then
    spent = used + (ended - start)
  end
  if spent >= daily_max then
    if enforce_daily then
      local s = '0'
      if current then s = start_s end
      return {'daily_limit', now_s, s, false, fmt(math.max(to_day_end, 0)),
              0, false, false, false}
    end
    shadowed = 'daily_limit'
  end
end

if current then
  if now > last then last_s = now_s end  -- max(last, now)
  redis.call('HSET', KEYS[1], 'last', last_s, 'day', ARGV[7], 'used', used_s)
  -- The clock's expiry depends on the lesson start and the day only: set when
  -- the lesson started, it needs no refresh while both stay the same.
  if hold ~= '' or state_day ~= day then keep(start) end
  return {'allow', now_s, start_s, fmt(remaining(start, used)), false,
          0, false, false, shadowed}
end

local duration, gap
if ended then
  if now < break_end then
    if enforce_break then
      return {'break_required', now_s, '0', false, fmt(break_end - now),
              0, false, false, false}
    end
    -- several shadowed rules travel comma-separated (clock.Step.shadowed is a tuple)
    if shadowed then shadowed = shadowed .. ',break_required' else shadowed = 'break_required' end
  end
  duration = ended - start
  gap = now - ended
  if state_day == day then
    used = used + duration
    used_s = fmt(used)
  end
end
redis.call('HSET', KEYS[1], 'start', now_s, 'last', now_s, 'day', ARGV[7], 'used', used_s)
keep(now)
local ended_start = false
if ended then ended_start = start_s end
return {'allow', now_s, now_s, fmt(remaining(now, used)), false,
        1, fmt(duration), fmt(gap), shadowed, ended_start}
