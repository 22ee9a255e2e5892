-- An upstream answered 429 to one replica: hold every replica back until the given instant
-- (Unix ms), or the later one already set, and announce it.
-- KEYS[1] the hold   ARGV[1] until (ms)   ARGV[2] now (ms)   ARGV[3] channel
local ends = tonumber(ARGV[1])
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held >= ends then
  return held
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', math.max(1, ends - tonumber(ARGV[2])))
redis.call('PUBLISH', ARGV[3], ARGV[1])
return ends
