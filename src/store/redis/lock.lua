-- Take the refresh lock of one upstream, fenced. The fence only ever grows: it is also kept
-- above the fence of the saved record, should the counter alone be lost (evicted, deleted).
-- KEYS[1] lock   KEYS[2] fence counter   KEYS[3] token record (hash)   KEYS[4] the store's epoch
-- KEYS[5] the locks' recovery window   KEYS[6] the store's clock (see epoch.lua)
-- ARGV[1] the value to set: the holder's id and a nonce of this attempt
-- ARGV[2] how long the lock lives, in ms
-- ARGV[3] a value this process left set although none of its flights holds it (an attempt
--         whose answer was lost, a release that failed), or '': taken back, not waited out
-- ARGV[4] the epoch the caller knows
-- -> {the new fence, the clock}; {0, 0} another holder has the lock; {-1, 0} the epoch is not the
--    caller's (look at it first: the store may have lost its data); {-2, ms left} the store
--    lost its data a moment ago and grants no lock until every lock that may have been held
--    has run out or been set again by its holder
if redis.call('GET', KEYS[4]) ~= ARGV[4] then
  return {-1, 0}
end
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] then
  return {0, 0}
end
local recovering = redis.call('PTTL', KEYS[5])
if recovering > 0 then
  return {-2, recovering}
end
local fence = redis.call('INCR', KEYS[2])
local saved = tonumber(redis.call('HGET', KEYS[3], 'fence') or '0')
if fence <= saved then
  fence = saved + 1
  redis.call('SET', KEYS[2], fence)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
-- Moved on, so that a store that comes back from before this lock (an older snapshot) shows
-- it to the holder at its next look.
return {fence, redis.call('INCR', KEYS[6])}
