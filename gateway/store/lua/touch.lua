-- touch: activity in a lesson this instance already knows is in progress
-- (the fast path of RedisStore.advance: the request was allowed without
-- waiting for Redis, and this write follows without a reply being awaited).
-- last = max(last, now), and only while the lesson on record is the one the
-- instance knew (same start): a lesson that ended meanwhile is left alone.
--
-- KEYS[1] clock hash   KEYS[2] conns zset (unused; every script takes both)
-- ARGV    start (as stored), now (the instance's estimate of Redis time, in
--         whole microseconds: an integer is far cheaper for the gateway to
--         print than a float); in this order so the command up to `now` is
--         packed once per lesson
-- Returns 1 if the lesson was touched, else 0.

local h = redis.call('HMGET', KEYS[1], 'start', 'last')
if h[1] ~= ARGV[1] then return 0 end
local now = tonumber(ARGV[2]) / 1000000
if now > tonumber(h[2] or '0') then
  redis.call('HSET', KEYS[1], 'last', string.format('%.6f', now))
end
return 1
