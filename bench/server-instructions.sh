#!/usr/bin/env bash
# User-space instructions per echo message in a live Plexus server, counted by callgrind:
# repeatable where the server's CPU time per message is not (it moves by ±5% between runs on a
# shared machine, more than most single changes to the host path).
#
#   bench/server-instructions.sh                       # target/release/plexus, bench/manifests/wasm
#   bench/server-instructions.sh --manifests bench/manifests/native
#   bench/server-instructions.sh --plexus /path/to/another/plexus --manifests DIR
#   bench/server-instructions.sh --floor                # the tokio-tungstenite floor, for reference
#
# Starts the server under `valgrind --tool=callgrind`, warms it up with the load generator, zeroes
# the counters, runs `loadgen echo -n 20 -k 1 --size 64` for 10 seconds, dumps the counters and
# prints every instruction the server's threads ran in that window divided by the messages
# answered. The kernel's work (system calls, loopback TCP) is not counted. Under valgrind the
# server is about 50 times slower, so the batching differs from a real run: compare builds with
# this script, not with a real run. Needs valgrind and a release build (`cargo build --release
# -p plexus -p plexus-bench`). With KEEP=DIR set, the callgrind files stay in DIR for
# `callgrind_annotate`.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/bench/lib.sh"
PLEXUS="$ROOT/target/release/plexus"
MANIFESTS="$ROOT/bench/manifests/wasm"
LOADGEN="$ROOT/target/release/loadgen"
FLOOR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --plexus) PLEXUS="$2"; shift ;;
        --manifests) MANIFESTS="$2"; shift ;;
        --floor) FLOOR="$ROOT/target/release/floor" ;;
        *) echo "server-instructions.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
command -v valgrind >/dev/null || { echo "server-instructions.sh: valgrind is required" >&2; exit 1; }
[ -x "$PLEXUS" ] && [ -x "$LOADGEN" ] || { echo "server-instructions.sh: build first (cargo build --release -p plexus -p plexus-bench)" >&2; exit 1; }

OUT="$(mktemp -d)"
PORT=$(free_port)
if [ -n "$FLOOR" ]; then
    SERVER=("$FLOOR" --listen "127.0.0.1:$PORT")
    DIALECT=(--dialect raw)
    LABEL=floor
else
    read -ra LIMITS <<< "$(rate_flags "$PLEXUS")"
    SERVER=("$PLEXUS" serve --listen "127.0.0.1:$PORT" --manifests "$MANIFESTS" "${LIMITS[@]}")
    DIALECT=()
    LABEL=$(basename "$MANIFESTS")
fi
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "${SERVER[@]}" >"$OUT/server.log" 2>&1 &
VG=$!
trap 'kill "$VG" 2>/dev/null; wait "$VG" 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then rm -rf "$KEEP"; mv "$OUT" "$KEEP"; else rm -rf "$OUT"; fi' EXIT
wait_port "$PORT" "$VG" "$OUT/server.log" || exit 1
"$LOADGEN" echo --addr "127.0.0.1:$PORT" "${DIALECT[@]}" -n 20 -k 1 --size 64 --duration 2 --warmup 1 >/dev/null
callgrind_control --zero "$VG" >/dev/null 2>&1
"$LOADGEN" echo --addr "127.0.0.1:$PORT" "${DIALECT[@]}" -n 20 -k 1 --size 64 --duration 10 --warmup 0 \
    --json "$OUT/run.json" >/dev/null
callgrind_control --dump "$VG" >/dev/null 2>&1
OPS=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['ops'])" "$OUT/run.json")
TOTAL=0
for f in "$OUT"/cg.out.*; do
    n=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
    TOTAL=$((TOTAL + ${n:-0}))
done
echo "$((TOTAL / OPS)) instructions per message ($OPS messages, $LABEL)"
