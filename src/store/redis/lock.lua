-- Take the refresh lock of one upstream, fenced. Returns the new fence number, or 0 when
-- another holder has the lock. The fence only ever grows: it is also kept above the fence of
-- the saved record, should the counter alone be lost (evicted, deleted).
-- KEYS[1] lock   KEYS[2] fence counter   KEYS[3] token record (hash)
-- ARGV[1] the value to set: the holder's id and a nonce of this attempt
-- ARGV[2] how long the lock lives, in ms
-- ARGV[3] a value this process left set although none of its flights holds it (an attempt
--         whose answer was lost, a release that failed), or '': taken back, not waited out
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] then
  return 0
end
local fence = redis.call('INCR', KEYS[2])
local saved = tonumber(redis.call('HGET', KEYS[3], 'fence') or '0')
if fence <= saved then
  fence = saved + 1
  redis.call('SET', KEYS[2], fence)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return fence
