#!/usr/bin/env bash
# tollgate vs nginx, doing the same job on the same machine.
#
#   needs:  apt-get install nginx wrk      (and a Rust toolchain)
#   run:    benches/compare.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 10 s each)
#   quotas: QUOTA_TOML='quota = { per_day = 1000000000, per_minute = 100000000 }' benches/compare.sh
#           adds a third contender, tollgate with that quota, and prints its throughput
#           against tollgate without (target >= 0.95)
#   Redis:  STORE=redis QUOTA_TOML='quota = { per_day = 1000000000, per_minute = 100000000 }' \
#             benches/compare.sh
#           adds tollgate with the same quota on a Redis state store (a redis-server the script
#           starts), prints its throughput against the quota on the file store (target >= 0.95)
#           and the Redis commands it sent per 1,000 requests (INFO commandstats)
#   A/B:    BASELINE_BIN=/path/to/an/older/tollgate benches/compare.sh
#           adds that binary as a contender, with the same config as tollgate, and prints
#           tollgate's throughput and p99 against it (a change's cost, beside nginx's)
#
# One fast upstream (nginx, 1 worker, `return 200`), and two reverse proxies in front of it,
# each with upstream keep-alive and an Authorization header on every request:
#   - nginx: proxy_set_header Authorization "Bearer <static>"
#   - tollgate: the token it got from the simulated identity server, from its cache
# wrk -t2 -c50 hits each proxy in alternating rounds. Prints req/s, p50 and p99 per round,
# non-2xx counts, tollgate's peak RSS under load, and the median ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
SECONDS_PER_ROUND=${2:-10}
CONNECTIONS=${CONNECTIONS:-50}
UPSTREAM_PORT=${UPSTREAM_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
TOLLGATE_PORT=${TOLLGATE_PORT:-18082}
IDENTITY_PORT=${IDENTITY_PORT:-18083}
QUOTA_PORT=${QUOTA_PORT:-18084}
EXTRA_UPSTREAM_TOML=${EXTRA_UPSTREAM_TOML:-}
QUOTA_TOML=${QUOTA_TOML:-}
BASELINE_BIN=${BASELINE_BIN:-}
BASELINE_PORT=${BASELINE_PORT:-18085}
STORE=${STORE:-file}
REDIS_PORT=${REDIS_PORT:-18086}
REDIS_TOLLGATE_PORT=${REDIS_TOLLGATE_PORT:-18087}
if [ "$STORE" = redis ]; then
  [ -n "$QUOTA_TOML" ] || { echo "STORE=redis compares quotas: set QUOTA_TOML too" >&2; exit 1; }
  command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install redis-server" >&2; exit 1; }
fi

for tool in nginx wrk; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install nginx wrk" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/upstream.pid" ] && kill "$(cat "$work/upstream.pid")" 2>/dev/null || true
  [ -f "$work/proxy.pid" ] && kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
  [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
  sleep 0.2
  rm -rf "$work"
}
trap cleanup EXIT

echo "building tollgate (release)..." >&2
cargo build --release --quiet --bin tollgate --example sim

# The upstream: answers every request at once, keeps connections open.
cat > "$work/upstream.conf" <<CONF
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT reuseport;
    keepalive_requests 1000000;
    location / { return 200 '{"ok":true}\n'; }
  }
}
CONF

# nginx as the reverse proxy: static bearer header, pooled upstream connections.
cat > "$work/proxy.conf" <<CONF
worker_processes 2;
pid $work/proxy.pid;
error_log $work/proxy-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream api { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$UPSTREAM_PORT;
      proxy_set_header Authorization "Bearer static-token-of-similar-length-aaaaaaaaaaaaaaa";
      proxy_buffering on;
    }
  }
}
CONF

nginx -c "$work/upstream.conf" -e "$work/upstream-error.log"
nginx -c "$work/proxy.conf" -e "$work/proxy-error.log"

./target/release/examples/sim --identity "127.0.0.1:$IDENTITY_PORT" > "$work/sim.out" &
pids+=($!)
for _ in $(seq 50); do grep -q '^seed ' "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
client_id=$(awk '/^client_id /{print $2}' "$work/sim.out")
client_secret=$(awk '/^client_secret /{print $2}' "$work/sim.out")

tollgate_pids=()
start_tollgate() { # name port extra-upstream-toml [binary]
  cat > "$work/$1.toml" <<CONF
[state]
store = "${STORE_URL:-file:$work/state-$1}"

[[upstream]]
name = "bench"
listen = "127.0.0.1:$2"
url = "http://127.0.0.1:$UPSTREAM_PORT"
$3

[upstream.auth]
grant = "client_credentials"
token_url = "http://127.0.0.1:$IDENTITY_PORT/token"
client_id = "$client_id"
client_secret = "$client_secret"
CONF
  RUST_LOG=warn "${4:-./target/release/tollgate}" serve -c "$work/$1.toml" 2> "$work/$1.log" &
  pids+=($!)
  tollgate_pids+=($!)
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$2/" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$2/" >/dev/null || { echo "$1 did not come up:" >&2; cat "$work/$1.log" >&2; exit 1; }
}
start_tollgate tollgate "$TOLLGATE_PORT" "$EXTRA_UPSTREAM_TOML"
tollgate_pid=${tollgate_pids[0]}
contenders="nginx tollgate"
if [ -n "$QUOTA_TOML" ]; then
  start_tollgate quota "$QUOTA_PORT" "$EXTRA_UPSTREAM_TOML
$QUOTA_TOML"
  contenders="$contenders quota"
fi
if [ -n "$BASELINE_BIN" ]; then
  start_tollgate baseline "$BASELINE_PORT" "$EXTRA_UPSTREAM_TOML" "$BASELINE_BIN"
  contenders="$contenders baseline"
fi
if [ "$STORE" = redis ]; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$work" --appendonly yes \
    --appendfsync everysec --save "" --daemonize yes --pidfile "$work/redis.pid" \
    --logfile "$work/redis.log"
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  STORE_URL="redis://127.0.0.1:$REDIS_PORT/0" start_tollgate redis "$REDIS_TOLLGATE_PORT" "$EXTRA_UPSTREAM_TOML
$QUOTA_TOML"
  contenders="$contenders redis"
fi
curl -fs "http://127.0.0.1:$NGINX_PORT/" >/dev/null

# Latency in wrk's units (us, ms, s) to milliseconds.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 } printf "%.3f", v }'; }

peak_rss_kib=0
run() { # name port -> "rps p50 p99 non2xx"
  local port=$2 out
  if [ "$1" = tollgate ]; then
    ( while kill -0 "$tollgate_pid" 2>/dev/null; do
        awk '/^VmRSS:/{print $2}' "/proc/$tollgate_pid/status" >> "$work/rss"; sleep 0.5; done ) &
    local sampler=$!
  fi
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_ROUND}s" --latency "http://127.0.0.1:$port/api/items?id=1")
  [ "$1" = tollgate ] && kill "$sampler" 2>/dev/null
  local rps p50 p99 bad
  rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)
  p99=$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)
  bad=$(awk '/Non-2xx or 3xx responses:/{print $5}' <<<"$out")
  errors=$(awk '/Socket errors:/{print}' <<<"$out")
  [ -n "$errors" ] && echo "  $1: $errors" >&2
  echo "$rps $p50 $p99 ${bad:-0}"
}

median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

echo "warm-up..." >&2
wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$NGINX_PORT/" >/dev/null
wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$TOLLGATE_PORT/" >/dev/null
[ -n "$QUOTA_TOML" ] && wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$QUOTA_PORT/" >/dev/null
[ -n "$BASELINE_BIN" ] && wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$BASELINE_PORT/" >/dev/null
[ "$STORE" = redis ] && wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$REDIS_TOLLGATE_PORT/" >/dev/null
# Redis commands from here on: the rounds' (and the replica's heartbeats, every 5 s).
redis_calls() { redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,]' '/^cmdstat_/{s+=$2} END {print s+0}'; }
[ "$STORE" = redis ] && redis_before=$(redis_calls)

printf '\nwrk -t2 -c%s -d%ss, %s rounds, %s cores\n\n' "$CONNECTIONS" "$SECONDS_PER_ROUND" "$ROUNDS" "$(nproc)"
printf '%-6s %-9s %12s %10s %10s %8s\n' round proxy req/s p50_ms p99_ms non2xx
: > "$work/nginx.txt"; : > "$work/tollgate.txt"; : > "$work/quota.txt"; : > "$work/baseline.txt"; : > "$work/redis.txt"
port_of() { case $1 in nginx) echo "$NGINX_PORT";; tollgate) echo "$TOLLGATE_PORT";; quota) echo "$QUOTA_PORT";; baseline) echo "$BASELINE_PORT";; redis) echo "$REDIS_TOLLGATE_PORT";; esac; }
for r in $(seq "$ROUNDS"); do
  # Rotate who goes first, so no one always runs on a warmer machine.
  order=$(tr ' ' '\n' <<<"$contenders" | awk -v r="$r" '{a[NR]=$0} END {for (i=0;i<NR;i++) print a[(i+r)%NR+1]}')
  for who in $order; do
    read -r rps p50 p99 bad < <(run "$who" "$(port_of "$who")")
    echo "$rps $p50 $p99 $bad" >> "$work/$who.txt"
    printf '%-6s %-9s %12s %10s %10s %8s\n' "$r" "$who" "$rps" "$p50" "$p99" "$bad"
  done
done

col() { awk -v c="$1" '{print $c}' "$work/$2.txt" | median; }
n_rps=$(col 1 nginx); t_rps=$(col 1 tollgate)
n_p50=$(col 2 nginx); t_p50=$(col 2 tollgate)
n_p99=$(col 3 nginx); t_p99=$(col 3 tollgate)
bad_total=$(awk '{s+=$4} END {print s+0}' "$work/nginx.txt" "$work/tollgate.txt")
peak_rss_kib=$(sort -n "$work/rss" | tail -1)

printf '\nmedians      nginx %10s req/s  p50 %s ms  p99 %s ms\n' "$n_rps" "$n_p50" "$n_p99"
printf '             tollgate %7s req/s  p50 %s ms  p99 %s ms\n' "$t_rps" "$t_p50" "$t_p99"
awk -v a="$t_rps" -v b="$n_rps" 'BEGIN { printf "throughput   tollgate / nginx = %.3f  (target >= 1.0)\n", a/b }'
awk -v a="$t_p99" -v b="$n_p99" 'BEGIN { printf "p99 latency  tollgate / nginx = %.3f  (target <= 1.0)\n", a/b }'
awk -v a="$t_p50" -v b="$n_p50" 'BEGIN { printf "p50 latency  tollgate / nginx = %.3f\n", a/b }'
awk -v k="$peak_rss_kib" 'BEGIN { printf "tollgate peak RSS under load: %.1f MiB  (target <= 30)\n", k/1024 }'
echo "non-2xx responses, all rounds: $bad_total  (target 0)"
if [ -n "$QUOTA_TOML" ]; then
  q_rps=$(col 1 quota); q_p99=$(col 3 quota)
  q_bad=$(awk '{s+=$4} END {print s+0}' "$work/quota.txt")
  printf '\nwith quota   %s\n' "$QUOTA_TOML"
  printf '             tollgate+quota %7s req/s  p99 %s ms  non-2xx %s\n' "$q_rps" "$q_p99" "$q_bad"
  awk -v a="$q_rps" -v b="$t_rps" 'BEGIN { printf "throughput   with quota / without = %.3f  (target >= 0.95)\n", a/b }'
fi
if [ "$STORE" = redis ]; then
  r_rps=$(col 1 redis); r_p99=$(col 3 redis)
  r_bad=$(awk '{s+=$4} END {print s+0}' "$work/redis.txt")
  r_requests=$(awk -v s="$SECONDS_PER_ROUND" '{n+=$1*s} END {printf "%d", n}' "$work/redis.txt")
  r_calls=$(( $(redis_calls) - redis_before ))
  printf '\non Redis     %s, state store redis://127.0.0.1:%s/0\n' "$QUOTA_TOML" "$REDIS_PORT"
  printf '             tollgate+quota on Redis %7s req/s  p99 %s ms  non-2xx %s\n' "$r_rps" "$r_p99" "$r_bad"
  awk -v a="$r_rps" -v b="$(col 1 quota)" 'BEGIN { printf "throughput   Redis / file store = %.3f  (target >= 0.95)\n", a/b }'
  awk -v c="$r_calls" -v n="$r_requests" 'BEGIN { printf "Redis commands per 1,000 requests: %.3f  (%d commands, about %d requests)\n", c*1000/n, c, n }'
fi
if [ -n "$BASELINE_BIN" ]; then
  b_rps=$(col 1 baseline); b_p99=$(col 3 baseline)
  b_bad=$(awk '{s+=$4} END {print s+0}' "$work/baseline.txt")
  printf '\nbaseline     %s\n' "$BASELINE_BIN"
  printf '             baseline %7s req/s  p99 %s ms  non-2xx %s\n' "$b_rps" "$b_p99" "$b_bad"
  awk -v a="$t_rps" -v b="$b_rps" 'BEGIN { printf "throughput   tollgate / baseline = %.3f\n", a/b }'
  awk -v a="$t_p99" -v b="$b_p99" 'BEGIN { printf "p99 latency  tollgate / baseline = %.3f\n", a/b }'
  # Per-round ratios: the two ran back to back in each round.
  paste "$work/tollgate.txt" "$work/baseline.txt" | awk '{ printf "%.3f\n", $1/$5 }' | median |
    awk '{ printf "median of the per-round ratios = %s\n", $1 }'
fi
