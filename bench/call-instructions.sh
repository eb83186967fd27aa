#!/usr/bin/env bash
# Instructions per message on the plugin path, counted by callgrind: repeatable where timings
# are not.
#
#   bench/call-instructions.sh            # builds the criterion bench and the plugins first
#   bench/call-instructions.sh --no-build
#
# Runs three benches of the criterion bench (host/benches/dispatch.rs) under
# `valgrind --tool=callgrind` and prints the instructions per call of each:
#
# * `call`: `plugin_call/wasm_reused_instance`, counting only inside `WasmPlugin::call_once`
#   (lowering the message, the guest's code, host functions, lifting): the plugin boundary;
# * `route, wasm` and `route, native`: `dispatch/wasm` and `dispatch/native`, counting inside
#   tokio's `Runtime::block_on` around `router::handle_text` (decode, route, the call or the
#   native echo, effects, encode; the compiler inlines `handle_text` into `block_on`): the whole
#   host path of a message but the socket, plus `block_on`'s own few hundred instructions.
#
# The message is the echo plugin's, with a 92-byte payload, on a warm instance. Needs valgrind
# (Debian package `valgrind`).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v valgrind >/dev/null || { echo "call-instructions.sh: valgrind is required" >&2; exit 1; }
if [ "${1:-}" != --no-build ]; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
    (cd "$ROOT/plugins" && cargo build --release --target wasm32-wasip2 -p echo) >&2
fi
BIN=$(cd "$ROOT" && cargo bench -p plexus --bench dispatch --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$BIN" ] || { echo "call-instructions.sh: no bench executable" >&2; exit 1; }
OUT="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$OUT"' EXIT

# count LABEL BENCH SYMBOL: instructions per call of SYMBOL (a callgrind toggle pattern) while
# the bench runs.
count() {
    local label="$1" bench="$2" symbol="$3" out="$OUT/${2//\//_}.cg"
    # criterion writes its reports under the working directory's target/: keep them out of the
    # tree.
    (cd "$OUT" && valgrind --tool=callgrind --callgrind-out-file="$out" \
        --toggle-collect="*$symbol*" "$BIN" --bench "^$bench\$" \
        --profile-time 3 >/dev/null 2>"$out.log")
    # The call arc with the most calls (set-up calls the same function a few times).
    callgrind_annotate --inclusive=yes --tree=calling "$out" 2>/dev/null | tr -d , \
        | awk -v label="$label" -v sym="$symbol" '
            $3 == ">" && index($0, sym) && match($0, /\(([0-9]+)x\)/) {
                c = substr($0, RSTART + 1, RLENGTH - 3) + 0
                if (c > best) { best = c; n = $1 } }
            END { printf "%-14s %6d instructions per call (%d calls)\n", label, n / best, best }'
}

count "call" plugin_call/wasm_reused_instance "WasmPlugin::call_once"
count "route, wasm" dispatch/wasm "Runtime::block_on"
count "route, native" dispatch/native "Runtime::block_on"
