-- Take the refresh lock of one upstream, fenced. Returns the new fence number (it only ever
-- grows, and outlives the lock), or 0 when another holder has the lock.
-- KEYS[1] lock   KEYS[2] fence counter
-- ARGV[1] holder id   ARGV[2] how long the lock lives, in ms
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return fence
