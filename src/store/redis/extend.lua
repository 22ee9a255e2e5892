-- Keep the refresh lock alive while its holder still works under it (a slow token request, a
-- save the store keeps refusing): only the holder's own.
-- KEYS[1] lock   ARGV[1] the value the holder set   ARGV[2] how long it lives from now, in ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
