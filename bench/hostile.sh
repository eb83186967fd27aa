#!/usr/bin/env bash
# A well-behaved client's echo latency while ten clients flood a hostile plugin (an endless
# loop, a memory hog, a panic), against the echo alone, each on a fresh release `plexus serve`
# with its default limits (bench/manifests/hostile). Benchmarks, not tests.
#
#   bench/hostile.sh [--seconds 10] [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/bench/lib.sh"
SECONDS_RUN=10; BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_RUN="$2"; shift ;;
        --no-build) BUILD=0 ;;
        *) echo "hostile.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p plexus -p plexus-bench)
    (cd "$ROOT/plugins" && cargo build --release --target wasm32-wasip2 -p echo -p faulty)
fi
for route in none faulty.spin faulty.hog faulty.trap; do
    PORT=$(free_port)
    (cd "$ROOT" && exec "$TARGET/release/plexus" serve --listen "127.0.0.1:$PORT" \
        --manifests bench/manifests/hostile --no-build >/dev/null 2>&1) &
    PID=$!
    until curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; do sleep 0.05; done
    "$TARGET/release/hostile-bench" --url "ws://127.0.0.1:$PORT/ws" --route "$route" --seconds "$SECONDS_RUN"
    kill "$PID"; wait "$PID" 2>/dev/null || true
done
