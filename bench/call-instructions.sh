#!/usr/bin/env bash
# Instructions per WASM plugin call, counted by callgrind: repeatable where timings are not.
#
#   bench/call-instructions.sh            # builds the criterion bench and the plugins first
#   bench/call-instructions.sh --no-build
#
# Runs the criterion bench `plugin_call/wasm_reused_instance` (host/benches/dispatch.rs: the echo
# plugin, a 92-byte payload, a warm instance) under `valgrind --tool=callgrind`, counting only
# inside `WasmPlugin::call_once` (lowering, the guest's code, host functions, lifting), and
# prints the instructions per call. Needs valgrind (Debian package `valgrind`).

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
# criterion writes its reports under the working directory's target/: keep them out of the tree.
(cd "$OUT" && valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" \
    --toggle-collect='*WasmPlugin::call_once*' "$BIN" --bench plugin_call/wasm_reused_instance \
    --profile-time 3 >/dev/null 2>"$OUT/valgrind.log")
callgrind_annotate --inclusive=yes "$OUT/cg.out" 2>/dev/null | tr -d , \
    | awk '!done && /=> .*WasmPlugin::call_once \(/ { n = $1; c = $NF; gsub(/[()x]/, "", c);
           printf "%d instructions per call (%d calls)\n", n / c, c; done = 1 }'
