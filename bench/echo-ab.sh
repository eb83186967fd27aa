#!/usr/bin/env bash
# Server CPU per echo message of two Plexus builds against the tokio-tungstenite floor, in
# alternating rounds: the fair comparison of a change to the host path on a shared machine,
# where a single run moves by ±15%.
#
#   bench/echo-ab.sh --a target-before/release/plexus --a-manifests DIR \
#                    --b target/release/plexus [--b-manifests DIR] [--rounds 10] [--seconds 5] \
#                    [--rate MSGS_PER_SEC]
#
# Each round starts the floor, build A and build B afresh (the order rotates from round to
# round), pinned with `taskset -c 1`, and runs `loadgen echo -n 100 -k 1 --size 64` against each
# for the window (`taskset -c 0`, after a one-second warm-up), reading the server's CPU time from
# /proc. Prints every round's CPU microseconds per message and, at the end, the median of each
# server and the median over rounds of each build's ratio to the floor of its round. Needs a
# release build of plexus-bench (`cargo build --release -p plexus-bench`); builds A and B are any
# two `plexus` binaries (for example two worktrees' `target/release/plexus`), each with the echo
# plugin's manifests directory it was built with (default bench/manifests/wasm).
#
# Without --rate each connection sends again as soon as its answer comes, and every server
# saturates its core: a slower server then leaves the generator idle more often, and the kernel
# work of waking it for each answer is charged to the server, so the gap between two builds
# shows larger than their own work. With --rate (messages per second across the 100
# connections, paced) every server runs below saturation, in the same regime.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/bench/lib.sh"
A="" B="" A_MANIFESTS="$ROOT/bench/manifests/wasm" B_MANIFESTS="$ROOT/bench/manifests/wasm"
ROUNDS=10 SECONDS_PER_RUN=5 RATE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A="$2"; shift ;;
        --b) B="$2"; shift ;;
        --a-manifests) A_MANIFESTS="$2"; shift ;;
        --b-manifests) B_MANIFESTS="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --seconds) SECONDS_PER_RUN="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        *) echo "echo-ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
LOADGEN="$ROOT/target/release/loadgen"
FLOOR="$ROOT/target/release/floor"
[ -x "$A" ] && [ -x "$B" ] || { echo "echo-ab.sh: --a and --b must name plexus binaries" >&2; exit 2; }
[ -x "$LOADGEN" ] && [ -x "$FLOOR" ] || { echo "echo-ab.sh: build first (cargo build --release -p plexus-bench)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "echo-ab.sh: taskset (util-linux) is required" >&2; exit 1; }

OUT="$(mktemp -d)"
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT

# run NAME: starts server NAME on a free port, runs the echo window, prints its CPU µs/message.
run() {
    local name=$1 port dialect=()
    port=$(free_port)
    case "$name" in
        floor) taskset -c 1 "$FLOOR" --listen "127.0.0.1:$port" >"$OUT/$name.log" 2>&1 &
            dialect=(--dialect raw) ;;
        a|b)
            local bin=$A manifests=$A_MANIFESTS
            [ "$name" = b ] && bin=$B && manifests=$B_MANIFESTS
            local limits
            read -ra limits <<< "$(rate_flags "$bin")"
            taskset -c 1 "$bin" serve --listen "127.0.0.1:$port" --manifests "$manifests" \
                "${limits[@]}" >"$OUT/$name.log" 2>&1 & ;;
    esac
    SERVER=$!
    wait_port "$port" "$SERVER" "$OUT/$name.log" || exit 1
    taskset -c 0 "$LOADGEN" echo --addr "127.0.0.1:$port" "${dialect[@]}" -n 100 -k 1 --size 64 \
        --rate "$RATE" --duration "$SECONDS_PER_RUN" --warmup 1 --server-pid "$SERVER" --json "$OUT/run.json" >/dev/null
    kill "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
    python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['server_cpu']['us_per_op'], 3))" "$OUT/run.json"
}

ORDERS=("floor a b" "a b floor" "b floor a")
echo "round  floor  A  B  (server CPU µs per message)"
for round in $(seq "$ROUNDS"); do
    declare -A cpu=()
    for name in ${ORDERS[$(( (round - 1) % 3 ))]}; do
        cpu[$name]=$(run "$name")
    done
    echo "$round  ${cpu[floor]}  ${cpu[a]}  ${cpu[b]}" | tee -a "$OUT/rounds.txt"
done
python3 - "$OUT/rounds.txt" <<'EOF'
import statistics, sys
rows = [list(map(float, line.split()[1:])) for line in open(sys.argv[1])]
floor, a, b = zip(*rows)
med = statistics.median
print(f"median CPU µs/message: floor {med(floor):.3f}, A {med(a):.3f}, B {med(b):.3f}")
ra = [x / f for x, f in zip(a, floor)]
rb = [x / f for x, f in zip(b, floor)]
print(f"median ratio to the floor of the same round: A {med(ra):.3f}, B {med(rb):.3f}; "
      f"B/A {med([y / x for x, y in zip(a, b)]):.3f}")
EOF
