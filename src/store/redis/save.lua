-- Replace the token record of one upstream: a compare-and-set on the fence and on the place in
-- the lineage (login, then generation), so a replica that was paused past its lock can never
-- write over what a later holder wrote, and a lineage never goes back. Announces the new
-- generation on success.
-- A write-back after the store lost its data (no lock is held: none is granted while the
-- store recovers) checks no fence: it writes only over nothing, or over an earlier record of
-- the same lineage, so that a record saved since the loss, or a new login, is never
-- overwritten; and it keeps the record's fence, and the fence counter, at least at the fence
-- the record was saved under, so that fences still only grow.
-- KEYS[1] token record (hash)   KEYS[2] fence counter
-- ARGV[1] fence   ARGV[2] generation   ARGV[3] seed hash   ARGV[4] record (JSON)
-- ARGV[5] channel to announce the generation on   ARGV[6] login time (ms, 0 for the seed's)
-- ARGV[7] 'save', 'restore' for a write-back, or 'reseal' for the same record sealed again
--         (`tollgate rekey`): under the lock, and only over the same place in the lineage
-- -> 'ok'; 'fence' a later holder saved; 'generation' the store holds this place in the
--    lineage or a later one; 'lineage' (write-back only) the store holds another lineage
local stored = redis.call('HMGET', KEYS[1], 'fence', 'generation', 'seed_hash', 'login_at')
local fence = tonumber(ARGV[1])
local restore = ARGV[7] == 'restore'
if ARGV[7] == 'reseal' then
  if not stored[1] or tonumber(stored[1]) > fence then
    return 'fence'
  end
  if stored[2] ~= ARGV[2] or stored[3] ~= ARGV[3] or (stored[4] or '0') ~= ARGV[6] then
    return 'generation'
  end
  redis.call('HSET', KEYS[1], 'record', ARGV[4])
  return 'ok'
end
if restore then
  if stored[2] and stored[3] ~= ARGV[3] then
    return 'lineage'
  end
else
  -- A retry of a save that landed but whose answer was lost: it is done.
  if stored[1] == ARGV[1] and stored[2] == ARGV[2] and stored[3] == ARGV[3] then
    return 'ok'
  end
  if stored[1] and tonumber(stored[1]) > fence then
    return 'fence'
  end
end
if stored[3] == ARGV[3] and stored[2] then
  local stored_login, login = tonumber(stored[4] or '0'), tonumber(ARGV[6])
  if stored_login > login or (stored_login == login and tonumber(stored[2]) >= tonumber(ARGV[2])) then
    return 'generation'
  end
end
if restore then
  fence = math.max(fence, tonumber(stored[1] or '0'))
  if tonumber(redis.call('GET', KEYS[2]) or '0') < fence then
    redis.call('SET', KEYS[2], fence)
  end
end
redis.call('HSET', KEYS[1], 'fence', fence, 'generation', ARGV[2], 'seed_hash', ARGV[3],
  'record', ARGV[4], 'login_at', ARGV[6])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 'ok'
