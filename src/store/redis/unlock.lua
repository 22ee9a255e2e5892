-- Release the refresh lock, but only the holder's own: a lock that expired and was taken by
-- another replica stays theirs.
-- KEYS[1] lock   ARGV[1] the value this holder set
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
