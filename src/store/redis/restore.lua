-- Write back a token record after the store lost its data: only where the store holds no
-- record, or an earlier one of the same lineage (login, then generation), so a lineage never
-- goes back and a record saved since the loss, or a new login, is never overwritten. No fence
-- is checked (no lock is held: none is granted while the store recovers); a stored fence
-- stays as it is.
-- Announces the generation, so a replica that knows a newer record writes that back in turn.
-- KEYS[1] token record (hash)
-- ARGV[1] generation   ARGV[2] seed hash   ARGV[3] record (JSON)   ARGV[4] channel
-- ARGV[5] login time (ms, 0 for the seed's)
-- -> 'ok' written back; 'kept' the store's own is as new or newer
local stored = redis.call('HMGET', KEYS[1], 'generation', 'seed_hash', 'login_at')
if stored[1] then
  if stored[2] ~= ARGV[2] then
    return 'kept'
  end
  local stored_login, login = tonumber(stored[3] or '0'), tonumber(ARGV[5])
  if stored_login > login or (stored_login == login and tonumber(stored[1]) >= tonumber(ARGV[1])) then
    return 'kept'
  end
end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'seed_hash', ARGV[2], 'record', ARGV[3],
  'login_at', ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 'ok'
