-- renew: extend the leases of one student's connections still open on the
-- calling instance. Mirrors MemoryStore.renew: a live lease gets a new expiry
-- and counts as activity now; a lapsed one is not revived.
--
-- KEYS[1] clock hash   KEYS[2] conns zset
-- ARGV    now ('' = Redis TIME), lease_seconds, conn_id...
-- Returns the number of leases renewed.

local now_s = store_now(ARGV[1])  -- _clock.lua
local now = tonumber(now_s)
local expires = now + tonumber(ARGV[2])
local expires_s = string.format('%.17g', expires)

local renewed = 0
for i = 3, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[2], expires_s, ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 then
  local last = redis.call('HGET', KEYS[1], 'last')
  if last and now > tonumber(last) then  -- last = max(last, now)
    redis.call('HSET', KEYS[1], 'last', now_s)
  end
  -- relative expiry, as in advance.lua: a bit after the last lease
  local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[2],
             string.format('%d', math.ceil((tonumber(top[2]) - now + 60) * 1000)))
end
return renewed
