-- Replace the token record of one upstream: a compare-and-set on the fence and on the place in
-- the lineage (login, then generation), so a replica that was paused past its lock can never
-- write over what a later holder wrote, and a lineage never goes back. Announces the new
-- generation on success.
-- With no fence, a write-back after the store lost its data (no lock is held: none is granted
-- while the store recovers): only over nothing, or over an earlier record of the same lineage,
-- so that a record saved since the loss, or a new login, is never overwritten; a stored fence
-- stays as it is.
-- KEYS[1] token record (hash)
-- ARGV[1] fence, or '' for a write-back   ARGV[2] generation   ARGV[3] seed hash
-- ARGV[4] record (JSON)   ARGV[5] channel to announce the generation on
-- ARGV[6] login time (ms, 0 for the seed's)
-- -> 'ok'; 'fence' a later holder saved; 'generation' the store holds this place in the
--    lineage or a later one; 'lineage' (write-back only) the store holds another lineage
local stored = redis.call('HMGET', KEYS[1], 'fence', 'generation', 'seed_hash', 'login_at')
local write_back = ARGV[1] == ''
if write_back then
  if stored[2] and stored[3] ~= ARGV[3] then
    return 'lineage'
  end
else
  -- A retry of a save that landed but whose answer was lost: it is done.
  if stored[1] == ARGV[1] and stored[2] == ARGV[2] and stored[3] == ARGV[3] then
    return 'ok'
  end
  if stored[1] and tonumber(stored[1]) > tonumber(ARGV[1]) then
    return 'fence'
  end
end
if stored[3] == ARGV[3] and stored[2] then
  local stored_login, login = tonumber(stored[4] or '0'), tonumber(ARGV[6])
  if stored_login > login or (stored_login == login and tonumber(stored[2]) >= tonumber(ARGV[2])) then
    return 'generation'
  end
end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'seed_hash', ARGV[3], 'record', ARGV[4],
  'login_at', ARGV[6])
if not write_back then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 'ok'
