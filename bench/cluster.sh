#!/usr/bin/env bash
# Cross-node broadcast latency and throughput, against one node in the same run.
#
#   bench/cluster.sh [--rate 1000] [--receivers 10] [--seconds 10] [--no-build]
#
# Starts a redis-server on a free port and, for each case, fresh `plexus serve` processes
# (release build, the demo manifests): (1) one node without a cluster, (2) a cluster of two
# nodes with sender and receivers on the same node, (3) the same cluster with the sender on one
# node and the receivers on the other. `cluster-bench` broadcasts `--rate` messages per second to
# `--receivers` clients (so rate x receivers deliveries per second). Reported per case: latency
# percentiles, deliveries per second, the nodes' CPU time per delivery (from /proc), and Redis
# commands per delivery (INFO stats). Benchmarks, not tests: nothing here passes or fails.

set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
source "$HERE/lib.sh"
RATE=1000; RECEIVERS=10; SECONDS_RUN=10; BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE="$2"; shift ;;
        --receivers) RECEIVERS="$2"; shift ;;
        --seconds) SECONDS_RUN="$2"; shift ;;
        --no-build) BUILD=0 ;;
        *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p plexus -p plexus-bench)
    (cd "$ROOT/plugins" && cargo build --release --target wasm32-wasip2 -p echo)
fi
PLEXUS="$TARGET/release/plexus"
BENCH="$TARGET/release/cluster-bench"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
PIDS+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

# start_node PORT [--cluster URL]: starts a node, prints its pid.
start_node() {
    local port=$1; shift
    (cd "$ROOT" && exec "$PLEXUS" serve --listen "127.0.0.1:$port" --manifests manifests --no-build \
        --max-messages-per-second 0 --max-connections-per-ip 100000 "$@" >/dev/null 2>&1) &
    local pid=$!
    PIDS+=("$pid")
    until curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.05; done
    echo "$pid"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_commands() { redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ {print $2+0}'; }

# run_case NAME FROM_PORT TO_PORT PIDS...: the sender's node first.
run_case() {
    local name=$1 from=$2 to=$3; shift 3
    local before=() after=() p
    for p in "$@"; do before+=("$(cpu_ticks "$p")"); done
    local before_cmds; before_cmds=$(redis_commands)
    local out
    out=$("$BENCH" --from "ws://127.0.0.1:$from/ws" --to "ws://127.0.0.1:$to/ws" \
        --receivers "$RECEIVERS" --rate "$RATE" --seconds "$SECONDS_RUN" --room "bench-$name")
    for p in "$@"; do after+=("$(cpu_ticks "$p")"); done
    local after_cmds; after_cmds=$(redis_commands)
    local ticks="" i
    for i in "${!before[@]}"; do ticks+="$((after[i] - before[i])) "; done
    python3 - "$name" "$out" "$ticks" "$(getconf CLK_TCK)" "$((after_cmds - before_cmds))" <<'PY'
import json, sys
name, out, ticks, hz, cmds = sys.argv[1], json.loads(sys.argv[2]), [int(t) for t in sys.argv[3].split()], int(sys.argv[4]), int(sys.argv[5])
d = max(out["delivered"], 1)
per_node = " + ".join(f"{t / hz * 1e6 / d:.2f}" for t in ticks)
total = sum(ticks) / hz * 1e6 / d
print(f"| {name} | {out['delivered']} | {out['missing']} | {out['outOfOrder']} | {out['deliveriesPerSecond']:.0f} | {out['p50us']} | {out['p99us']} | {out['p999us']} | {per_node} = {total:.2f} | {cmds / d:.3f} |")
PY
}

echo "rate $RATE/s x $RECEIVERS receivers for ${SECONDS_RUN}s; $(nproc) CPUs"
echo
echo "| case | delivered | missing | out of order | deliveries/s | p50 µs | p99 µs | p99.9 µs | node CPU µs per delivery (the sender's node + the other) | Redis commands per delivery |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
P1=$(free_port); N1=$(start_node "$P1")
run_case single "$P1" "$P1" "$N1"
kill "$N1"
URL="redis://127.0.0.1:$REDIS_PORT"
PA=$(free_port); NA=$(start_node "$PA" --cluster "$URL")
PB=$(free_port); NB=$(start_node "$PB" --cluster "$URL")
run_case cluster-same-node "$PA" "$PA" "$NA" "$NB"
run_case cluster-cross-node "$PA" "$PB" "$NA" "$NB"
kill "$NA" "$NB"
