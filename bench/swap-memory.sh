#!/usr/bin/env bash
# What the previous version of a plugin, kept warm after a swap, costs in memory.
#
#   bench/swap-memory.sh                         keep 10 s and the control (keep 0), 3 rounds
#   bench/swap-memory.sh --keep 10 --rounds 2 --out /tmp/swap-memory
#
# Each run starts `plexus serve` (release, pinned like run.sh's servers) on a manifest that routes
# `answer` to the swap-a build, with --keep-previous-secs KEEP; the generator's hotswap scenario
# drives 50 connections (one request in flight each) and swaps once, swap-a -> swap-b, in the
# middle of its load, so that both versions have served and their instance pools are as full as
# the load makes them. Then, the server idle and its connections closed, the server's memory is
# read (VmRSS, RssAnon and RssFile from /proc/PID/status) while /healthz lists the previous
# version ("kept"), and again 2 s after the host let it go (`keptUntil` passed, `previous` null:
# "released"), with /proc/PID/smaps at both moments. The control runs the same sequence, with the
# same waits counted from the swap, with --keep-previous-secs 0 (nothing kept). Two figures:
#  * `gone`: the resident size of the mappings present while the version was kept and gone once it
#    was let go (wasmtime maps each instance's linear memory and each component's code on its
#    own, so these are the kept version's); the control shows what goes by itself (nothing);
#  * kept - released of the whole VmRSS and RssAnon, against the same difference in the control
#    (the allocator's heap included, but noisy: the process's RSS drifts by megabytes while idle).
# rss.tsv in each run's directory samples VmRSS and RssAnon every 0.5 s. Runs alternate KEEP and
# control.
#
# Binaries come from $CARGO_TARGET_DIR (default target/), the plugins from plugins/target/;
# build them first (bench/README.md, "Build"). Benchmarks, not tests: nothing here passes or fails
# on a figure.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

KEEP=10
ROUNDS=3
OUT=""
SERVER_CPU=1
GEN_CPU=0
CONNS=50
BASE_PORT=${BENCH_BASE_PORT:-19500}

usage() {
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --keep SECS           --keep-previous-secs of the runs that keep the previous version (default 10)
  --rounds N            pairs of runs, one keeping and one not (default 3)
  --connections N       generator connections (default 50)
  --out DIR             results directory (default: bench/results/swap-memory-<timestamp>)
  --server-cpu N        CPU the server is pinned to (default 1)
  --generator-cpu N     CPU the generator is pinned to (default 0)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --connections) CONNS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --server-cpu) SERVER_CPU="$2"; shift ;;
        --generator-cpu) GEN_CPU="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "swap-memory.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ "$KEEP" -gt 0 ] 2>/dev/null || { echo "swap-memory.sh: --keep must be at least 1" >&2; exit 2; }

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PLEXUS="$TARGET_DIR/release/plexus"
LOADGEN="$TARGET_DIR/release/loadgen"
PLUGINS="$ROOT/plugins/target/wasm32-wasip2/release"
SWAP_A="$PLUGINS/swap_a.wasm"
SWAP_B="$PLUGINS/swap_b.wasm"
for f in "$PLEXUS" "$LOADGEN" "$SWAP_A" "$SWAP_B"; do
    [ -e "$f" ] || { echo "swap-memory.sh: $f is missing (build it first)" >&2; exit 1; }
done
for tool in taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "swap-memory.sh: $tool is required" >&2; exit 1; }
done
if [ "$(nproc)" -lt 2 ] && [ "$SERVER_CPU" = 1 ]; then SERVER_CPU=0; fi

OUT="${OUT:-$HERE/results/swap-memory-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
TABLE="$OUT/summary.tsv"
say() { echo "[swap-memory $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run.log" >&2; }

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }

# status_kb PID FIELD: a field of /proc/PID/status, in kB.
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# mem PID: "VmRSS RssAnon RssFile" in kB.
mem() { echo "$(status_kb "$1" VmRSS) $(status_kb "$1" RssAnon) $(status_kb "$1" RssFile)"; }

# smaps_diff BEFORE AFTER: "KB N" — the resident kB and the count of the mappings in BEFORE that
# are not in AFTER (same address range and name).
smaps_diff() {
    python3 - "$1" "$2" <<'PY'
import re, sys
def maps(path):
    out, key = {}, None
    for line in open(path):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            f = line.split()
            key = (f[0], f[5] if len(f) > 5 else "")
            out[key] = 0
        elif line.startswith("Rss:") and key:
            out[key] = int(line.split()[1])
    return out
a, b = maps(sys.argv[1]), maps(sys.argv[2])
gone = [k for k in a if k not in b]
print(sum(a[k] for k in gone), len(gone))
PY
}

# previous PORT: "VERSION KEPT_UNTIL_MS" of plugin answer's previous version, or "none".
previous() {
    curl -sf "http://127.0.0.1:$1/healthz" | python3 -c '
import json, sys
p = json.load(sys.stdin)["plugins"]["answer"].get("previous")
print(f"{p['"'"'version'"'"']} {p['"'"'keptUntil'"'"']}" if p else "none")'
}

# json_field FILE EXPR: a value from the generator's JSON report (EXPR indexes `d`).
json_field() { python3 -c "import json; d = json.load(open('$1')); print($2)"; }

{
    echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown (not a git checkout)")"
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(uname -srm) cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "keep=$KEEP rounds=$ROUNDS connections=$CONNS server_cpu=$SERVER_CPU generator_cpu=$GEN_CPU"
} >"$OUT/meta.txt"
say "results in $OUT ($(tr '\n' ' ' <"$OUT/meta.txt"))"
printf 'run\tkeep_s\tswap_taken\tswap_ms\tstart_rss_kb\tkept_rss_kb\tkept_anon_kb\tkept_file_kb\tkept_previous\treleased_rss_kb\treleased_anon_kb\treleased_file_kb\treleased_previous\tkept_minus_released_kb\tgone_kb\tgone_maps\tappeared_kb\tappeared_maps\n' >"$TABLE"

SEQ=0
# one_run KEEP_SECS TAG
one_run() {
    local keep=$1 tag=$2
    SEQ=$((SEQ + 1))
    local port=$((BASE_PORT + SEQ)) dir="$OUT/$tag"
    mkdir -p "$dir/manifests"
    cat >"$dir/manifests/answer.toml" <<'EOF'
# Written by bench/swap-memory.sh: the swap-a build, replaced once by swap-b.
manifest_version = 1

[plugin]
id = "answer"
description = "Memory of a previous version kept warm: swap-a, then swap-b"

[source]
wasm = "../answer.wasm"

[[route]]
type = "answer"
handler = "answer"

[capabilities]
host = ["messaging", "rooms", "kv", "logging", "config"]
EOF
    cp "$SWAP_A" "$dir/answer.wasm"
    taskset -c "$SERVER_CPU" "$PLEXUS" serve --listen "127.0.0.1:$port" \
        --manifests "$dir/manifests" --keep-previous-secs "$keep" \
        --max-messages-per-second 100000000 --message-burst 100000000 >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
    local i
    for i in $(seq 1 600); do
        kill -0 "$SERVER_PID" 2>/dev/null || { say "$tag: the server exited (see $dir/server.log)"; return 1; }
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    sleep 1
    local start
    start=$(mem "$SERVER_PID" | cut -d' ' -f1)
    (
        while kill -0 "$SERVER_PID" 2>/dev/null; do
            echo "$(now_ms) $(mem "$SERVER_PID" 2>/dev/null | cut -d' ' -f1-2)"
            sleep 0.5
        done
    ) >"$dir/rss.tsv" 2>/dev/null &
    local sampler=$!
    # One swap, 3 s into a 6 s measured window: both versions serve under load.
    taskset -c "$GEN_CPU" "$LOADGEN" hotswap --addr "127.0.0.1:$port" --dialect plexus \
        --label "swap-memory-$tag" --server-pid "$SERVER_PID" -n "$CONNS" -k 1 \
        --warmup 2 --duration 6 --drain 0.5 --swap-every-ms 3000 \
        --swap-files "$SWAP_A,$SWAP_B" --swap-target "$dir/answer.wasm" --plugin answer \
        --json "$dir/loadgen.json" >"$dir/loadgen.txt" 2>"$dir/loadgen.err" || {
        say "$tag: the generator failed (see $dir/loadgen.err)"
        return 1
    }
    local taken written swap_ms
    taken=$(json_field "$dir/loadgen.json" 'd["counts"]["swaps_taken"]')
    written=$(json_field "$dir/loadgen.json" 'd["extra"]["swap_detail"][0]["written_unix_ms"]')
    swap_ms=$(json_field "$dir/loadgen.json" 'd["tables"]["swaps"]["rows"][0][6]' 2>/dev/null || echo "?")
    sleep 1 # the generator's connections close
    local kept kept_prev
    kept=$(mem "$SERVER_PID")
    cat "/proc/$SERVER_PID/smaps" >"$dir/smaps-kept"
    kept_prev=$(previous "$port" | cut -d' ' -f1)
    # Released: 2 s after the longer keep of the two kinds of run is up, counted from the swap.
    local until=$((written + KEEP * 1000 + 2000))
    while [ "$(now_ms)" -lt "$until" ]; do sleep 0.2; done
    local released released_prev
    released=$(mem "$SERVER_PID")
    cat "/proc/$SERVER_PID/smaps" >"$dir/smaps-released"
    released_prev=$(previous "$port" | cut -d' ' -f1)
    local gone gone_n new new_n
    read -r gone gone_n <<<"$(smaps_diff "$dir/smaps-kept" "$dir/smaps-released")"
    read -r new new_n <<<"$(smaps_diff "$dir/smaps-released" "$dir/smaps-kept")"
    read -r k_rss k_anon k_file <<<"$kept"
    read -r r_rss r_anon r_file <<<"$released"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$keep" \
        "$taken" "$swap_ms" "$start" "$k_rss" "$k_anon" "$k_file" "$kept_prev" "$r_rss" "$r_anon" \
        "$r_file" "$released_prev" "$((k_rss - r_rss))" "$gone" "$gone_n" "$new" "$new_n" >>"$TABLE"
    say "$tag: keep $keep s, swap taken: $taken; VmRSS start $start kB, kept $k_rss kB (previous: $kept_prev), released $r_rss kB (previous: $released_prev): $((k_rss - r_rss)) kB; mappings gone $gone kB ($gone_n), appeared $new kB ($new_n)"
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    SERVER_PID=""
}

for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then
        one_run "$KEEP" "keep$KEEP-r$round" || true
        one_run 0 "keep0-r$round" || true
    else
        one_run 0 "keep0-r$round" || true
        one_run "$KEEP" "keep$KEEP-r$round" || true
    fi
done

python3 - "$TABLE" "$KEEP" <<'EOF' | tee "$OUT/summary.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
keep = sys.argv[2]
for k in (keep, "0"):
    d = [int(r["kept_rss_kb"]) - int(r["released_rss_kb"]) for r in rows if r["keep_s"] == k]
    a = [int(r["kept_anon_kb"]) - int(r["released_anon_kb"]) for r in rows if r["keep_s"] == k]
    if d:
        print(f"keep {k} s: kept - released VmRSS {d} kB (median {statistics.median(d):.0f}), "
              f"RssAnon {a} kB (median {statistics.median(a):.0f})")
for k in (keep, "0"):
    g = [int(r["gone_kb"]) for r in rows if r["keep_s"] == k]
    n = [int(r["gone_maps"]) for r in rows if r["keep_s"] == k]
    if g:
        print(f"keep {k} s: mappings gone when the previous version was let go: {g} kB "
              f"in {n} mappings (median {statistics.median(g):.0f} kB)")
dk = [int(r["kept_rss_kb"]) - int(r["released_rss_kb"]) for r in rows if r["keep_s"] == keep]
d0 = [int(r["kept_rss_kb"]) - int(r["released_rss_kb"]) for r in rows if r["keep_s"] == "0"]
if dk and d0:
    print(f"previous version kept warm: {statistics.median(dk) - statistics.median(d0):.0f} kB "
          f"(median of keep {keep} s minus median of the control)")
EOF
say "done: $OUT"
