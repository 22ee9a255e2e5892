-- Keep the refresh lock alive while its holder still works under it (a token request whose
-- answer is awaited, a save the store keeps refusing): only the holder's own. A lock found
-- gone (the store lost its data, or it ran out while its holder was paused and nobody took
-- it) is set again, and the fence counter kept at least at the holder's fence.
-- KEYS[1] lock   KEYS[2] fence counter
-- ARGV[1] the value the holder set   ARGV[2] how long it lives from now, in ms
-- ARGV[3] the holder's fence
-- -> 1 kept alive; 2 set again; 0 another holder has it
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if held then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 2
