#!/usr/bin/env bash
# Connection-setup cost with and without token verification: the connect-storm scenario against
# Plexus (builtin echo) with no key, with an HS256 secret and with an RS256 public key, each
# client presenting a valid token in `?token=` (loadgen's --path). Server and generator are pinned
# to separate CPUs like bench/run.sh; every case starts a fresh server.
#
#   bash bench/auth-storm.sh [--rounds N] [--target N] [--concurrency N]
#
# Binaries come from $CARGO_TARGET_DIR (default target/)/release: build them first with
# `cargo build --release -p plexus -p plexus-bench`. Tokens are made here with openssl, signed
# with the test keys of tests/fixtures/auth/ (never use those keys anywhere else).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
ROUNDS=3; TARGET=2000; CONC=200; SERVER_CPU=1; GEN_CPU=0; PORT=9350
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --target) TARGET="$2"; shift ;;
        --concurrency) CONC="$2"; shift ;;
        *) echo "auth-storm.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
for b in plexus loadgen; do
    [ -x "$BIN/$b" ] || { echo "auth-storm.sh: $BIN/$b is missing (build it first)" >&2; exit 1; }
done
OUT="$(mktemp -d /tmp/plexus-auth-storm.XXXXXX)"
FIX="$ROOT/tests/fixtures/auth"
SECRET="storm secret of at least thirty-two bytes"
printf '%s' "$SECRET" >"$OUT/secret"

b64url() { openssl base64 -e -A | tr '+/' '-_' | tr -d '='; }
token() { # token ALG: a JWT for sub `storm`, valid for a day
    local alg=$1 head body input sig
    head=$(printf '{"alg":"%s","typ":"JWT"}' "$alg" | b64url)
    body=$(printf '{"sub":"storm","exp":%d}' "$(($(date +%s) + 86400))" | b64url)
    input="$head.$body"
    case "$alg" in
        HS256) sig=$(printf '%s' "$input" | openssl dgst -sha256 -hmac "$SECRET" -binary | b64url) ;;
        RS256) sig=$(printf '%s' "$input" | openssl dgst -sha256 -sign "$FIX/rs256-private.pem" | b64url) ;;
    esac
    printf '%s.%s' "$input" "$sig"
}

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

# run CASE ROUND FLAGS...: one storm against a fresh server started with FLAGS.
run() {
    local case=$1 round=$2 path=$3
    shift 3
    PORT=$((PORT + 1))
    taskset -c "$SERVER_CPU" "$BIN/plexus" serve --listen "127.0.0.1:$PORT" --no-build \
        --manifests "$HERE/manifests/native" --max-connections-per-ip 1000000 "$@" \
        >"$OUT/$case-$round.log" 2>&1 &
    SERVER_PID=$!
    local i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.05
    done
    taskset -c "$GEN_CPU" "$BIN/loadgen" connect-storm --addr "127.0.0.1:$PORT" --dialect plexus \
        --label "$case" --path "$path" --server-pid "$SERVER_PID" --target "$TARGET" \
        --concurrency "$CONC" --json "$OUT/$case-$round.json" >/dev/null
    stop_server
}

HS=$(token HS256)
RS=$(token RS256)
for round in $(seq 1 "$ROUNDS"); do
    run none "$round" "/ws"
    run hs256 "$round" "/ws?token=$HS" --jwt-secret-file "$OUT/secret"
    run rs256 "$round" "/ws?token=$RS" --jwt-public-key "$FIX/rs256-public.pem"
done

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
print("| verification | connections/s | connect p50 µs | connect p99 µs | failed | server CPU µs/connection |")
print("| --- | --- | --- | --- | --- | --- |")
for case, name in [("none", "none (guests)"), ("hs256", "HS256"), ("rs256", "RS256")]:
    runs = [json.load(open(f"{out}/{case}-{r}.json")) for r in range(1, rounds + 1)]
    def med(f):
        return statistics.median(f(r) for r in runs)
    print(f"| {name} | {med(lambda r: r['throughput_per_sec']):,.0f} "
          f"| {med(lambda r: r['latency']['p50_us']):,.0f} | {med(lambda r: r['latency']['p99_us']):,.0f} "
          f"| {sum(r['counts'].get('failed', 0) for r in runs)} "
          f"| {med(lambda r: r['server_cpu']['us_per_op']):.0f} |")
print(f"(median of {rounds} rounds; raw reports in {out})")
EOF
