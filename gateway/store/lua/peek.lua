-- peek: a student's clock and live lease count, read-only, with the now it
-- was read at (one consistent snapshot).
--
-- KEYS[1] clock hash   KEYS[2] conns zset
-- ARGV    now ('' = Redis TIME)
-- Returns {now, start, last, day, used, conns}; false (nil) for a missing field.

local now_s = store_now(ARGV[1])  -- _clock.lua
local h = redis.call('HMGET', KEYS[1], 'start', 'last', 'day', 'used')
local conns = redis.call('ZCOUNT', KEYS[2], '(' .. now_s, '+inf')
return {now_s, h[1], h[2], h[3], h[4], conns}
