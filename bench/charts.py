#!/usr/bin/env python3
"""Charts and a markdown summary from a bench/run.sh results directory.

    python bench/charts.py bench/results/<timestamp>

Reads every loadgen JSON report under DIR/raw/, takes the median over rounds of each figure,
and writes into DIR:

  summary.md            tables of absolute figures and ratios (vs the tokio-tungstenite floor
                        and vs Socket.IO), ready to paste into docs/benchmarks.md
  echo-latency.png      round-trip latency distribution, echo at 100 connections, 1 in flight
  echo-latency-k8.png   the same with 8 messages in flight per connection
  fanout-latency.png    publish-to-receive latency distribution, largest fan-out room
  echo-throughput.png   messages/s and server CPU per message against connection count
  cpu-per-op.png        server CPU per message / delivery / connection
  idle-memory.png       server memory per idle connection
  hotswap.png           latency around plugin swaps vs baseline (when a hotswap run exists)
"""

import glob
import json
import os
import statistics
import sys
from collections import defaultdict

PEER_ORDER = ["floor", "ws", "socketio", "plexus-native", "plexus-wasm"]
PEER_NAMES = {
    "floor": "tokio-tungstenite (floor)",
    "ws": "ws (Node)",
    "socketio": "Socket.IO (Node)",
    "plexus-native": "Plexus, builtin echo",
    "plexus-wasm": "Plexus, WASM echo",
}
FLOOR = "floor"
SOCKETIO = "socketio"


def load(directory):
    reports = []
    for path in sorted(glob.glob(os.path.join(directory, "raw", "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            print(f"charts.py: skipping {path}: {e}", file=sys.stderr)
            continue
        r["_path"] = path
        reports.append(r)
    return reports


def case_key(r):
    """The scenario with the parameters that define a comparable case."""
    p = r.get("params", {})
    s = r["scenario"]
    if s == "echo":
        return (s, p.get("connections"), p.get("in_flight"), p.get("size"))
    if s == "fanout":
        return (s, p.get("members"), p.get("rate"), p.get("size"))
    if s == "connect-storm":
        return (s, p.get("target"), p.get("concurrency"))
    if s == "idle-memory":
        return (s, p.get("connections"))
    return (s,)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(r, *path):
    cur = r
    for k in path:
        if cur is None:
            return None
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur


class Case:
    """All rounds of one peer in one case."""

    def __init__(self, reports):
        self.reports = reports

    def m(self, *path):
        return median([get(r, *path) for r in self.reports])

    @property
    def rounds(self):
        return len(self.reports)

    @property
    def generator_bound(self):
        return any(r.get("generator_bound") for r in self.reports)

    def curve(self, field="latency"):
        """Median latency per percentile over rounds."""
        curves = [get(r, field, "percentiles") for r in self.reports]
        curves = [c for c in curves if c]
        if not curves:
            return None
        points = defaultdict(list)
        for c in curves:
            for p, v in c:
                points[p].append(v)
        return sorted((p, statistics.median(v)) for p, v in points.items())


def group(reports):
    cases = defaultdict(lambda: defaultdict(list))
    for r in reports:
        cases[case_key(r)][r.get("label", r.get("dialect"))].append(r)
    return {k: {peer: Case(rs) for peer, rs in v.items()} for k, v in cases.items()}


def peers_in(case):
    known = [p for p in PEER_ORDER if p in case]
    return known + sorted(p for p in case if p not in PEER_ORDER)


def fmt(v, digits=1):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def ratio(v, ref):
    if v is None or ref is None or ref == 0:
        return "–"
    return f"{v / ref:.2f}×"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def name(peer):
    return PEER_NAMES.get(peer, peer)


def summary(cases, meta):
    lines = ["# Plexus benchmark results", ""]
    if meta:
        lines += ["```", meta.strip(), "```", ""]
    lines += [
        "Figures are medians over rounds. *Server CPU per op* is the server's user+system CPU time "
        "over the measured window divided by the operations completed in it: on a 2-core machine "
        "where the load generator competes with the server, it is the fair comparison. Ratios "
        "compare server CPU per op (lower is better) and memory; `×` > 1 means the peer costs more "
        "than the reference. Runs marked † had a generator using over 90% of its core, so their "
        "throughput is a lower bound on the server's.",
        "",
    ]

    def ratios(case, peer, path):
        v = case[peer].m(*path)
        f = case.get(FLOOR)
        s = case.get(SOCKETIO)
        return ratio(v, f.m(*path) if f else None), ratio(v, s.m(*path) if s else None)

    def mark(c):
        return " †" if c.generator_bound else ""

    echo_keys = sorted(k for k in cases if k[0] == "echo")
    for key in echo_keys:
        case = cases[key]
        _, n, k, size = key
        lines += [f"## Echo: {n} connections, {k} in flight, {size}-byte payload", ""]
        rows = []
        for peer in peers_in(case):
            c = case[peer]
            vf, vs = ratios(case, peer, ("server_cpu", "us_per_op"))
            rows.append([
                name(peer) + mark(c),
                fmt(c.m("throughput_per_sec")),
                fmt(c.m("latency", "p50_us")),
                fmt(c.m("latency", "p90_us")),
                fmt(c.m("latency", "p99_us")),
                fmt(c.m("latency", "p999_us")),
                fmt(c.m("latency", "max_us")),
                fmt(c.m("server_cpu", "us_per_op"), 2),
                vf,
                vs,
                c.rounds,
            ])
        lines += [table(["server", "msgs/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs",
                         "server CPU µs/msg", "CPU vs floor", "CPU vs Socket.IO", "rounds"], rows), ""]

    for key in sorted(k for k in cases if k[0] == "fanout"):
        case = cases[key]
        _, m, rate, size = key
        lines += [f"## Fan-out: {m}-member room, {fmt(rate, 0)} publications/s, {size}-byte payload", ""]
        rows = []
        for peer in peers_in(case):
            c = case[peer]
            vf, vs = ratios(case, peer, ("server_cpu", "us_per_op"))
            rows.append([
                name(peer) + mark(c),
                fmt(c.m("throughput_per_sec")),
                f"{(c.m('extra', 'delivered_ratio') or 0) * 100:.2f}%",
                fmt(c.m("latency", "p50_us")),
                fmt(c.m("latency", "p99_us")),
                fmt(c.m("latency", "p999_us")),
                fmt(c.m("latency", "max_us")),
                fmt(c.m("server_cpu", "us_per_op"), 2),
                vf,
                vs,
            ])
        lines += [table(["server", "deliveries/s", "delivered", "p50 µs", "p99 µs", "p99.9 µs",
                         "max µs", "server CPU µs/delivery", "CPU vs floor", "CPU vs Socket.IO"],
                        rows), ""]

    for key in sorted(k for k in cases if k[0] == "connect-storm"):
        case = cases[key]
        _, target, conc = key
        lines += [f"## Connect storm: {target} connections, {conc} at a time", ""]
        rows = []
        for peer in peers_in(case):
            c = case[peer]
            vf, vs = ratios(case, peer, ("server_cpu", "us_per_op"))
            rows.append([
                name(peer) + mark(c),
                fmt(c.m("throughput_per_sec")),
                fmt(c.m("latency", "p50_us")),
                fmt(c.m("latency", "p99_us")),
                fmt(c.m("counts", "failed"), 0),
                fmt(c.m("server_cpu", "us_per_op"), 2),
                vf,
                vs,
            ])
        lines += [table(["server", "connections/s", "connect p50 µs", "connect p99 µs", "failed",
                         "server CPU µs/connection", "CPU vs floor", "CPU vs Socket.IO"], rows), ""]

    for key in sorted(k for k in cases if k[0] == "idle-memory"):
        case = cases[key]
        _, n = key
        lines += [f"## Idle memory: {n} connections", ""]
        rows = []
        for peer in peers_in(case):
            c = case[peer]
            vf, vs = ratios(case, peer, ("extra", "bytes_per_connection"))
            before = c.m("server_memory_before", "vm_rss")
            after = c.m("server_memory_after", "vm_rss")
            rows.append([
                name(peer),
                fmt(c.m("extra", "bytes_per_connection"), 0),
                fmt(before / 1048576 if before else None),
                fmt(after / 1048576 if after else None),
                fmt(c.m("server_cpu", "cores_used") * 100 if c.m("server_cpu", "cores_used") is not None else None),
                vf,
                vs,
            ])
        lines += [table(["server", "bytes/connection", "RSS before MiB", "RSS after MiB",
                         "idle CPU % of a core", "vs floor", "vs Socket.IO"], rows), ""]

    for key in sorted(k for k in cases if k[0] == "hotswap"):
        for peer, c in cases[key].items():
            lines += [f"## Hot swap: {name(peer)}", ""]
            rows = []
            for r in c.reports:
                cnt = r.get("counts", {})
                steady = get(r, "extra", "steady_state") or {}
                rows.append([
                    os.path.basename(r["_path"]),
                    f"{cnt.get('swaps_taken', 0)} of {cnt.get('swaps', 0)}",
                    f"{cnt.get('sent', 0):,}",
                    cnt.get("lost", 0),
                    cnt.get("duplicated", 0),
                    cnt.get("failed", 0),
                    cnt.get("old_after_new", 0),
                    cnt.get("disconnects", 0),
                    fmt(steady.get("p99_us")),
                ])
            lines += [table(["run", "swaps taken", "messages", "lost", "duplicated", "failed",
                             "old after new", "disconnects", "steady p99 µs"], rows), ""]
            for r in c.reports:
                t = get(r, "tables", "swaps")
                if not t or not t.get("rows"):
                    continue
                lines += [f"Per swap, {os.path.basename(r['_path'])}:", ""]
                cells = [["–" if v is None else (fmt(v) if isinstance(v, float) else v)
                          for v in row] for row in t["rows"]]
                lines += [table(t["columns"], cells), ""]
    return "\n".join(lines) + "\n"


def echo_near_100(echo_keys):
    """(messages in flight, the echo case at the connection count nearest 100), per K."""
    for k_in_flight in sorted({k[2] for k in echo_keys}):
        keys = [k for k in echo_keys if k[2] == k_in_flight]
        yield k_in_flight, min(keys, key=lambda k: (abs((k[1] or 0) - 100), k))


def charts(cases, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    written = []

    def save(fig, fname):
        path = os.path.join(out, fname)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    def latency_chart(case, title, fname, field="latency", labels=None):
        fig, ax = plt.subplots(figsize=(8, 5))
        drew = False
        for peer in peers_in(case) if labels is None else labels:
            curve = case[peer].curve(field) if labels is None else labels[peer]
            if not curve:
                continue
            pts = [(p, v) for p, v in curve if p < 100.0]
            xs = [1.0 / (1.0 - p / 100.0) for p, _ in pts]
            ys = [v for _, v in pts]
            ax.plot(xs, ys, marker=".", label=name(peer) if labels is None else peer)
            drew = True
        if not drew:
            plt.close(fig)
            return
        ticks = [1, 2, 10, 100, 1000, 10000, 100000]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda x, _: {1: "0", 2: "50", 10: "90", 100: "99", 1000: "99.9",
                          10000: "99.99", 100000: "99.999"}.get(int(round(x)), "")))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (µs, log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, fname)

    echo_keys = sorted(k for k in cases if k[0] == "echo")
    if echo_keys:
        # One chart per number of messages in flight, at the connection count nearest 100.
        for k_in_flight, key in echo_near_100(echo_keys):
            fname = "echo-latency.png" if k_in_flight == 1 else f"echo-latency-k{k_in_flight}.png"
            latency_chart(cases[key], f"Echo round-trip latency ({key[1]} connections, "
                          f"K={key[2]})", fname)

    fan_keys = sorted(k for k in cases if k[0] == "fanout")
    if fan_keys:
        key = max(fan_keys, key=lambda k: (k[1] or 0, k))
        latency_chart(cases[key], f"Fan-out publish-to-receive latency ({key[1]} members, "
                      f"{fmt(key[2], 0)} msgs/s)", "fanout-latency.png")

    # Throughput and CPU per message against connection count.
    by_k = defaultdict(list)
    for k in echo_keys:
        by_k[(k[2], k[3])].append(k)
    for (k_in_flight, size), keys in by_k.items():
        keys.sort(key=lambda k: k[1])
        if len(keys) < 2:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
        peers = [p for p in PEER_ORDER if any(p in cases[k] for k in keys)]
        for peer in peers:
            xs, tp, cpu = [], [], []
            for k in keys:
                if peer in cases[k]:
                    xs.append(k[1])
                    tp.append(cases[k][peer].m("throughput_per_sec"))
                    cpu.append(cases[k][peer].m("server_cpu", "us_per_op"))
            ax1.plot(xs, tp, marker="o", label=name(peer))
            ax2.plot(xs, cpu, marker="o", label=name(peer))
        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.set_xlabel("connections")
            ax.grid(True, which="both", alpha=0.3)
        ax1.set_ylabel("messages/s")
        ax1.set_title(f"Echo throughput (K={k_in_flight}, {size} B)")
        ax2.set_ylabel("server CPU µs per message")
        ax2.set_title("Server CPU per message")
        ax2.set_ylim(bottom=0)
        ax1.set_ylim(bottom=0)
        ax1.legend()
        save(fig, f"echo-throughput-k{k_in_flight}.png" if len(by_k) > 1 else "echo-throughput.png")

    # CPU per operation, one group of bars per case.
    bar_cases = []
    for k_in_flight, key in echo_near_100(echo_keys):
        bar_cases.append((f"echo, {key[1]} conns, K={k_in_flight}\n(µs/message)", cases[key]))
    if fan_keys:
        key = max(fan_keys, key=lambda k: (k[1] or 0, k))
        bar_cases.append((f"fan-out, {key[1]} members\n(µs/delivery)", cases[key]))
    storm_keys = sorted(k for k in cases if k[0] == "connect-storm")
    if storm_keys:
        bar_cases.append((f"connect storm, {storm_keys[-1][1]}\n(µs/connection ÷ 10)",
                          cases[storm_keys[-1]]))
    if bar_cases:
        fig, ax = plt.subplots(figsize=(10, 5))
        peers = [p for p in PEER_ORDER if any(p in c for _, c in bar_cases)]
        width = 0.8 / max(len(peers), 1)
        for i, peer in enumerate(peers):
            vals = []
            for label, c in bar_cases:
                v = c[peer].m("server_cpu", "us_per_op") if peer in c else None
                if v is not None and "÷ 10" in label:
                    v /= 10
                vals.append(v or 0)
            xs = [j + i * width for j in range(len(bar_cases))]
            ax.bar(xs, vals, width, label=name(peer))
        ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(bar_cases))])
        ax.set_xticklabels([label for label, _ in bar_cases])
        ax.set_ylabel("server CPU µs per operation")
        ax.set_title("Server CPU per operation (lower is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        save(fig, "cpu-per-op.png")

    idle_keys = sorted(k for k in cases if k[0] == "idle-memory")
    if idle_keys:
        case = cases[idle_keys[-1]]
        peers = peers_in(case)
        vals = [case[p].m("extra", "bytes_per_connection") or 0 for p in peers]
        fig, ax = plt.subplots(figsize=(8, 5))
        bars = ax.bar([name(p) for p in peers], [v / 1024 for v in vals])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v / 1024:.1f} KiB", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom")
        ax.set_ylabel("server resident memory per connection (KiB)")
        ax.set_title(f"Idle memory per connection ({idle_keys[-1][1]} connections)")
        ax.tick_params(axis="x", rotation=15)
        ax.grid(True, axis="y", alpha=0.3)
        save(fig, "idle-memory.png")

    for key in (k for k in cases if k[0] == "hotswap"):
        for peer, c in cases[key].items():
            r = c.reports[-1]
            steady = get(r, "extra", "steady_state")
            around = get(r, "extra", "around_swaps")
            curves = {}
            if steady:
                curves["steady state"] = steady["percentiles"]
            if around:
                curves["100 ms around each swap"] = around["percentiles"]
            if curves:
                latency_chart(None, f"Hot swap: latency around swaps ({name(peer)})",
                              "hotswap.png", labels=curves)
    return written


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out = sys.argv[1]
    reports = load(out)
    if not reports:
        print(f"charts.py: no reports under {out}/raw", file=sys.stderr)
        sys.exit(1)
    cases = group(reports)
    meta = ""
    meta_path = os.path.join(out, "meta.txt")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = f.read()
    md = summary(cases, meta)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    written = charts(cases, out)
    print(md)
    print(f"wrote {os.path.join(out, 'summary.md')}")
    for w in written:
        print(f"wrote {w}")


if __name__ == "__main__":
    main()
