#!/usr/bin/env bash
# What the per-message limits and sandbox checks cost the WASM echo: today's host (HEAD) against
# the same host with them taken out (bench/patches/without-limits.patch: the rate buckets, the
# decoder's shape limits, the circuit breaker and slow lane with the timing of each call, the
# byte bound on a call's effects), everything else equal.
#
#   bench/limits-cost.sh [--rounds 9] [--seconds 5] [--rate 30000]
#
# Builds the patched host from a worktree of HEAD into target-limits/ (seeded once from target/,
# so that only Plexus compiles again), then prints, for both builds: user-space instructions per
# message (server-instructions.sh, callgrind), and server CPU per message against the floor
# (echo-ab.sh, A = without the limits, B = with them), once with every connection sending again
# at once (the servers saturate their core) and once paced at --rate messages per second (all
# below saturation). Needs valgrind and a release build of HEAD: `cargo build --release -p plexus
# -p plexus-bench` and the echo plugin (`cd plugins && cargo build --release --target
# wasm32-wasip2 -p echo`). Uncommitted changes are in target/ but not in the worktree: commit
# first, or the comparison is not of one change.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS=9 SECONDS_PER_RUN=5 RATE=30000
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --seconds) SECONDS_PER_RUN="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        *) echo "limits-cost.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
WITH="$ROOT/target/release/plexus"
WITHOUT="$ROOT/target-limits/release/plexus"
[ -x "$WITH" ] || { echo "limits-cost.sh: build first (cargo build --release -p plexus -p plexus-bench)" >&2; exit 1; }

WT="$(mktemp -d)/plexus"
trap 'git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || true; rm -rf "$(dirname "$WT")"' EXIT
git -C "$ROOT" worktree add --detach "$WT" HEAD >/dev/null
git -C "$WT" apply "$ROOT/bench/patches/without-limits.patch"
[ -d "$ROOT/target-limits" ] || cp -a "$ROOT/target" "$ROOT/target-limits"
(cd "$WT" && CARGO_TARGET_DIR="$ROOT/target-limits" cargo build --release -p plexus)

echo "== user-space instructions per message (callgrind)"
echo "without the limits: $(bash "$ROOT/bench/server-instructions.sh" --plexus "$WITHOUT")"
echo "with the limits:    $(bash "$ROOT/bench/server-instructions.sh" --plexus "$WITH")"
echo "== server CPU per message, saturated (A: without the limits, B: with them)"
bash "$ROOT/bench/echo-ab.sh" --a "$WITHOUT" --b "$WITH" --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN"
echo "== server CPU per message, paced at $RATE messages/s"
bash "$ROOT/bench/echo-ab.sh" --a "$WITHOUT" --b "$WITH" --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN" \
    --rate "$RATE"
