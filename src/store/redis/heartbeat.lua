-- One replica's heartbeat: it is seen now; replicas not seen for the window are forgotten.
-- Returns the replicas seen within the window, this one included.
-- KEYS[1] the replicas (sorted set: id -> last seen, Unix ms)
-- ARGV[1] this replica's id   ARGV[2] now (ms)   ARGV[3] the window (ms)
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('PEXPIRE', KEYS[1], 2 * window)
return redis.call('ZRANGE', KEYS[1], 0, -1)
