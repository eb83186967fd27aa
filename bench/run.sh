#!/usr/bin/env bash
# Plexus benchmark runner: the same scenarios against every peer, in alternating rounds.
#
#   bench/run.sh                 quick mode: one round, short windows (a few minutes in all)
#   bench/run.sh --full          three rounds, longer windows, a connection-count sweep
#   bench/run.sh --peers "floor ws socketio" --rounds 2 --out /tmp/results
#   bench/run.sh --scenarios hotswap --peers plexus-wasm     one scenario only
#
# Peers: floor (tokio-tungstenite, bench/src/bin/floor.rs), ws and socketio (bench/peers/),
# plexus-native (builtin echo) and plexus-wasm (the echo plugin). Each server runs pinned with
# `taskset -c 1`, the generator with `taskset -c 0`; every server is started afresh for each
# scenario, on a new port. Results: bench/results/<timestamp>/ (JSON per run, charts, summary.md).
# Binaries come from $CARGO_TARGET_DIR (default target/), the plugins from plugins/target/.
# Benchmarks, not tests: nothing here passes or fails on a timing.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

MODE=quick
ROUNDS=""
PEERS="floor ws socketio plexus-native plexus-wasm"
SCENARIOS="echo fanout storm idle hotswap"
OUT=""
BUILD=1
CHARTS=1
SERVER_CPU=1
GEN_CPU=0
BASE_PORT=${BENCH_BASE_PORT:-19000}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --quick | --full      run length (default --quick)
  --rounds N            rounds (default: 1 quick, 3 full)
  --peers "LIST"        peers to run (default: floor ws socketio plexus-native plexus-wasm)
  --scenarios "LIST"    scenarios to run (default: echo fanout storm idle hotswap; hotswap
                        runs against plexus-wasm only)
  --out DIR             results directory (default: bench/results/<timestamp>)
  --no-build            use the binaries and node_modules already there
  --no-charts           skip the Python charts and summary
  --server-cpu N        CPU the servers are pinned to (default 1)
  --generator-cpu N     CPU the generator is pinned to (default 0)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --rounds) ROUNDS="$2"; shift ;;
        --peers) PEERS="$2"; shift ;;
        --scenarios) SCENARIOS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --no-charts) CHARTS=0 ;;
        --server-cpu) SERVER_CPU="$2"; shift ;;
        --generator-cpu) GEN_CPU="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# Echo runs request/response (1 in flight per connection) and pipelined (8) in both modes.
ECHO_INFLIGHT="1 8"
if [ "$MODE" = quick ]; then
    : "${ROUNDS:=1}"
    DUR=3; WARMUP=1
    ECHO_CONNS="100"
    FANOUT_MEMBERS="1000"; FANOUT_RATES="100 1000"
    STORM_TARGET=2000; STORM_CONC=200
    IDLE_CONNS=10000; IDLE_DUR=1
    HOTSWAP_DUR=10; HOTSWAP_EVERY=2000
else
    : "${ROUNDS:=3}"
    DUR=10; WARMUP=2
    ECHO_CONNS="10 100 1000 5000"
    FANOUT_MEMBERS="100 1000"; FANOUT_RATES="100 1000"
    STORM_TARGET=10000; STORM_CONC=200
    IDLE_CONNS=10000; IDLE_DUR=5
    HOTSWAP_DUR=30; HOTSWAP_EVERY=3000
fi

command -v taskset >/dev/null || { echo "run.sh: taskset (util-linux) is required" >&2; exit 1; }
if [ "$(nproc)" -lt 2 ] && [ "$SERVER_CPU" = 1 ]; then
    echo "run.sh: one CPU only: server and generator share CPU 0" >&2
    SERVER_CPU=0
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-$HERE/results/$STAMP}"
mkdir -p "$OUT/raw" "$OUT/logs"
LOG="$OUT/run.log"

say() { echo "[run.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- processes we start
PIDS=()
cleanup() {
    local pid
    [ "${#PIDS[@]}" -gt 0 ] || return 0
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one process we started (TERM, then KILL after 5 s) and forgets its PID, so that the EXIT
# trap never signals a PID the system has since given to someone else.
stop_pid() {
    local pid=$1 i keep=()
    if kill "$pid" 2>/dev/null; then
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
    for i in "${PIDS[@]}"; do
        [ "$i" = "$pid" ] || keep+=("$i")
    done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- build
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PLUGINS="$ROOT/plugins/target/wasm32-wasip2/release"
WASM="$PLUGINS/echo.wasm"
SWAP_A="$PLUGINS/swap_a.wasm"
SWAP_B="$PLUGINS/swap_b.wasm"
PLEXUS="$TARGET_DIR/release/plexus"
LOADGEN="$TARGET_DIR/release/loadgen"
FLOOR="$TARGET_DIR/release/floor"

has_peer() { case " $PEERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
drop_peer() { PEERS="$(echo " $PEERS " | sed "s/ $1 / /" | xargs)"; }
has_scenario() { case " $SCENARIOS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for sc in $SCENARIOS; do
    case "$sc" in
        echo|fanout|storm|idle|hotswap) ;;
        *) echo "run.sh: unknown scenario $sc (echo fanout storm idle hotswap)" >&2; exit 2 ;;
    esac
done
HOTSWAP=0
if has_scenario hotswap && has_peer plexus-wasm; then HOTSWAP=1; fi

if [ "$BUILD" = 1 ]; then
    say "building plexus-bench (release)"
    (cd "$ROOT" && cargo build --release -p plexus-bench) 2>&1 | tail -3 | tee -a "$LOG" >&2
    if has_peer ws || has_peer socketio; then
        say "installing the Node peers (npm ci)"
        (cd "$HERE/peers" && npm ci --no-audit --no-fund --loglevel=error) 2>&1 | tail -3 | tee -a "$LOG" >&2
    fi
    if has_peer plexus-native || has_peer plexus-wasm; then
        say "building plexus (release)"
        if ! (cd "$ROOT" && cargo build --release -p plexus) >"$OUT/logs/build-plexus.log" 2>&1; then
            say "plexus does not build (see logs/build-plexus.log): skipping the plexus peers"
            drop_peer plexus-native; drop_peer plexus-wasm
        fi
    fi
    if has_peer plexus-wasm; then
        # The plugins' own workspace and target directory, whatever CARGO_TARGET_DIR says.
        say "building the echo plugin and the swap-a and swap-b builds (wasm32-wasip2, release)"
        if ! (cd "$ROOT/plugins" && env -u CARGO_TARGET_DIR cargo build --release \
            --target wasm32-wasip2 -p echo -p swap-a -p swap-b) >"$OUT/logs/build-plugins.log" 2>&1; then
            say "the plugins do not build (see logs/build-plugins.log): skipping plexus-wasm"
            drop_peer plexus-wasm
        fi
    fi
fi
for bin in "$LOADGEN" "$FLOOR"; do
    [ -x "$bin" ] || { echo "run.sh: $bin is missing (run without --no-build)" >&2; exit 1; }
done
if { has_peer plexus-native || has_peer plexus-wasm; } && [ ! -x "$PLEXUS" ]; then
    say "no $PLEXUS: skipping the plexus peers"
    drop_peer plexus-native; drop_peer plexus-wasm
fi
if has_peer plexus-wasm && [ ! -f "$WASM" ]; then
    say "no $WASM: skipping plexus-wasm"
    drop_peer plexus-wasm
fi
if [ "$HOTSWAP" = 1 ] && { ! has_peer plexus-wasm || [ ! -f "$SWAP_A" ] || [ ! -f "$SWAP_B" ]; }; then
    say "no plexus-wasm peer or no $SWAP_A and $SWAP_B: skipping hotswap"
    HOTSWAP=0
fi
read -r -a PEER_LIST <<<"$PEERS"
[ "${#PEER_LIST[@]}" -gt 0 ] || { echo "run.sh: no peer to run" >&2; exit 1; }

{
    echo "mode=$MODE rounds=$ROUNDS peers=$PEERS scenarios=$SCENARIOS"
    if COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+uncommitted"
    else
        COMMIT="unknown (not a git checkout)"
    fi
    echo "commit=$COMMIT"
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(uname -srm) cpus=$(nproc)"
    echo "rustc=$(rustc --version 2>/dev/null) node=$(node --version 2>/dev/null)"
    echo "server_cpu=$SERVER_CPU generator_cpu=$GEN_CPU"
} >"$OUT/meta.txt"
say "results in $OUT ($(tr '\n' ' ' <"$OUT/meta.txt"))"

# ---------------------------------------------------------------- peers
PORT_SEQ=0
SERVER_PID=""
SERVER_PORT=""

dialect_of() {
    case "$1" in
        floor|ws) echo raw ;;
        socketio) echo socketio ;;
        plexus-*) echo plexus ;;
    esac
}

# start_peer PEER TAG [MANIFEST_DIR]: starts the server, waits for its port, sets SERVER_PID.
# The connect storm and the idle scenario open thousands of connections from one address.
PLEXUS_LIMITS=(--max-messages-per-second 100000000 --message-burst 100000000
    --max-connections-per-ip 1000000)

start_peer() {
    local peer=$1 tag=$2 manifests=${3:-}
    PORT_SEQ=$((PORT_SEQ + 1))
    SERVER_PORT=$((BASE_PORT + PORT_SEQ))
    local log="$OUT/logs/$peer-$tag.log"
    local addr="127.0.0.1:$SERVER_PORT"
    case "$peer" in
        floor) taskset -c "$SERVER_CPU" "$FLOOR" --listen "$addr" >"$log" 2>&1 & ;;
        ws) taskset -c "$SERVER_CPU" node "$HERE/peers/ws-server.js" "$SERVER_PORT" >"$log" 2>&1 & ;;
        socketio) taskset -c "$SERVER_CPU" node "$HERE/peers/socketio-server.js" "$SERVER_PORT" >"$log" 2>&1 & ;;
        # The message rate limiter runs on every message, and never refuses a benchmark's load.
        plexus-native)
            taskset -c "$SERVER_CPU" "$PLEXUS" serve --listen "$addr" "${PLEXUS_LIMITS[@]}" \
                --manifests "${manifests:-$HERE/manifests/native}" >"$log" 2>&1 & ;;
        plexus-wasm)
            taskset -c "$SERVER_CPU" "$PLEXUS" serve --listen "$addr" "${PLEXUS_LIMITS[@]}" \
                --manifests "${manifests:-$HERE/manifests/wasm}" >"$log" 2>&1 & ;;
        *) echo "run.sh: unknown peer $peer" >&2; return 1 ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    local i
    for i in $(seq 1 1200); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            say "$peer exited during start-up (see logs/$peer-$tag.log)"
            stop_pid "$SERVER_PID"
            SERVER_PID=""
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$SERVER_PORT") 2>/dev/null; then
            sleep 0.3 # let the server finish start-up work after bind
            return 0
        fi
        sleep 0.1
    done
    say "$peer did not listen on $addr within 120 s"
    stop_pid "$SERVER_PID"
    SERVER_PID=""
    return 1
}

stop_peer() {
    [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID"
    SERVER_PID=""
}

# run_case ROUND PEER TAG SCENARIO ARGS...: one generator run against a fresh server.
run_case() {
    local round=$1 peer=$2 tag=$3 scenario=$4
    shift 4
    local json="$OUT/raw/$peer/$tag-r$round.json"
    mkdir -p "$OUT/raw/$peer"
    if ! start_peer "$peer" "$tag-r$round"; then
        echo "$peer $tag round $round: server did not start" >>"$OUT/failures.txt"
        return 0
    fi
    say "round $round: $peer $tag"
    if ! taskset -c "$GEN_CPU" "$LOADGEN" "$scenario" --addr "127.0.0.1:$SERVER_PORT" \
        --dialect "$(dialect_of "$peer")" --label "$peer" --server-pid "$SERVER_PID" \
        --warmup "$WARMUP" --json "$json" "$@" 2>>"$OUT/logs/loadgen.err" | tee -a "$OUT/report.txt"; then
        echo "$peer $tag round $round: loadgen failed (logs/loadgen.err)" >>"$OUT/failures.txt"
    fi
    stop_peer
}

# Rotates the peer list by the round number, so that no peer always runs first or last.
peers_for_round() {
    local r=$1 n=${#PEER_LIST[@]} i
    for ((i = 0; i < n; i++)); do
        echo "${PEER_LIST[$(((i + r) % n))]}"
    done
}

# ---------------------------------------------------------------- rounds
for ((round = 1; round <= ROUNDS; round++)); do
    mapfile -t ORDER < <(peers_for_round "$round")
    say "round $round of $ROUNDS: ${ORDER[*]}"
    has_scenario echo && for n in $ECHO_CONNS; do
        # One message in flight per connection (request/response), then 8 (pipelined).
        for k in $ECHO_INFLIGHT; do
            for peer in "${ORDER[@]}"; do
                run_case "$round" "$peer" "echo-n$n-k$k" echo -n "$n" -k "$k" --size 64 \
                    --duration "$DUR"
            done
        done
    done
    # 100 publications/s: a syscall per delivery; 1,000/s: frames queue per member and are
    # written in batches (1,000,000 deliveries/s offered into a 1,000-member room).
    has_scenario fanout && for m in $FANOUT_MEMBERS; do
        for rate in $FANOUT_RATES; do
            for peer in "${ORDER[@]}"; do
                run_case "$round" "$peer" "fanout-m$m-r$rate" fanout -m "$m" --rate "$rate" \
                    --size 64 --duration "$DUR" --drain 5
            done
        done
    done
    has_scenario storm && for peer in "${ORDER[@]}"; do
        run_case "$round" "$peer" "storm-$STORM_TARGET" connect-storm --target "$STORM_TARGET" \
            --concurrency "$STORM_CONC"
    done
    has_scenario idle && for peer in "${ORDER[@]}"; do
        run_case "$round" "$peer" "idle-$IDLE_CONNS" idle-memory -n "$IDLE_CONNS" --settle 2 \
            --duration "$IDLE_DUR"
    done
done

# ---------------------------------------------------------------- hot swap (plexus-wasm)
# Two builds that answer differently (`answer` -> {"n", "version": "a" | "b"}), swapped in turn
# over the artifact that a manifest in the results directory serves; the generator reads
# /healthz and the answers to see each swap taken.
if [ "$HOTSWAP" = 1 ]; then
    HS="$OUT/hotswap"
    mkdir -p "$HS/manifests"
    cat >"$HS/manifests/answer.toml" <<'EOF'
# Written by bench/run.sh: the swap-a and swap-b builds, served from a copy that the hotswap
# scenario replaces.
manifest_version = 1

[plugin]
id = "answer"
description = "Hot-swap benchmark: swap-a and swap-b in turn"

[source]
wasm = "../answer.wasm"

[[route]]
type = "answer"
handler = "answer"

[capabilities]
host = ["messaging", "rooms", "kv", "logging", "config"]
EOF
    for ((round = 1; round <= ROUNDS; round++)); do
        cp "$SWAP_A" "$HS/answer.wasm"
        if start_peer plexus-wasm "hotswap-r$round" "$HS/manifests"; then
            say "round $round: plexus-wasm hotswap"
            mkdir -p "$OUT/raw/plexus-wasm"
            if ! taskset -c "$GEN_CPU" "$LOADGEN" hotswap --addr "127.0.0.1:$SERVER_PORT" \
                --dialect plexus --label plexus-wasm --server-pid "$SERVER_PID" \
                -n 50 -k 1 --warmup "$WARMUP" --duration "$HOTSWAP_DUR" \
                --swap-files "$SWAP_A,$SWAP_B" --swap-target "$HS/answer.wasm" --plugin answer \
                --swap-every-ms "$HOTSWAP_EVERY" --spike-window-ms 100 \
                --json "$OUT/raw/plexus-wasm/hotswap-r$round.json" \
                2>>"$OUT/logs/loadgen.err" | tee -a "$OUT/report.txt"; then
                echo "plexus-wasm hotswap round $round: loadgen failed" >>"$OUT/failures.txt"
            fi
            stop_peer
        else
            echo "plexus-wasm hotswap round $round: server did not start" >>"$OUT/failures.txt"
        fi
    done
fi

# ---------------------------------------------------------------- charts and summary
if [ "$CHARTS" = 1 ]; then
    if [ ! -x "$HERE/.venv/bin/python" ]; then
        say "creating bench/.venv with matplotlib"
        python3 -m venv "$HERE/.venv"
        "$HERE/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
    fi
    "$HERE/.venv/bin/python" "$HERE/charts.py" "$OUT" | tee -a "$LOG"
fi
if [ -s "$OUT/failures.txt" ]; then
    say "some runs failed:"
    cat "$OUT/failures.txt" >&2
fi
say "done: $OUT"
