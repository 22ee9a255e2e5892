#!/usr/bin/env bash
# Soak: tollgate under steady load for SECONDS while the identity server and the API inject
# faults on a timer; prints totals, non-2xx by status, refreshes, reuse/revocation counts and
# RSS after warm-up and at the end. Exits 1 when a target is missed. Not run in CI.
#
#   run:  benches/soak.sh [SECONDS] [CLIENTS]      (defaults: 600 s, 16 clients)
#
# Everything (simulators, proxy, clients) runs in one process; see examples/soak.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example soak -- "$@"
