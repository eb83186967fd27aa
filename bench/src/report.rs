//! The report every scenario produces, as text and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::args::Common;
use crate::proc_stats::{CpuMark, Memory};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// `[percentile, microseconds]` pairs for plotting the distribution.
    pub percentiles: Vec<[f64; 2]>,
}

/// Points of the distribution kept in the JSON report (log-spaced towards the tail).
const CURVE: &[f64] = &[
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 92.5, 95.0, 96.0, 97.0,
    97.5, 98.0, 98.5, 99.0, 99.25, 99.5, 99.6, 99.7, 99.75, 99.8, 99.85, 99.9, 99.925, 99.95,
    99.97, 99.99, 99.995, 99.999, 99.9995, 99.9999, 100.0,
];

impl Latency {
    /// Summarises a histogram of nanoseconds; `None` when it is empty.
    pub fn from_ns(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            min_us: us(h.min()),
            p50_us: us(h.value_at_percentile(50.0)),
            p90_us: us(h.value_at_percentile(90.0)),
            p99_us: us(h.value_at_percentile(99.0)),
            p999_us: us(h.value_at_percentile(99.9)),
            max_us: us(h.max()),
            percentiles: CURVE
                .iter()
                .map(|&p| [p, us(h.value_at_percentile(p))])
                .collect(),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n={})",
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us),
            fmt_us(self.mean_us),
            self.count
        )
    }
}

fn plural(op: &str) -> String {
    match op.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{op}s"),
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// CPU time of a process over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub cpu_ms: f64,
    /// Fraction of one core used over the window (may exceed 1 with several threads).
    pub cores_used: f64,
    /// CPU microseconds per operation (message, delivery or connection).
    pub us_per_op: Option<f64>,
}

impl Cpu {
    fn new(us: u64, secs: f64, ops: u64) -> Self {
        Cpu {
            cpu_ms: us as f64 / 1000.0,
            cores_used: if secs > 0.0 {
                us as f64 / 1e6 / secs
            } else {
                0.0
            },
            us_per_op: (ops > 0).then(|| us as f64 / ops as f64),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub dialect: String,
    pub label: String,
    pub addr: String,
    pub url: String,
    pub unix_time_ms: u128,
    /// Scenario parameters (connections, in-flight, size, rate, ...).
    pub params: Map<String, Value>,
    /// Length of the measured window in seconds.
    pub measured_secs: f64,
    /// What one operation is: `message` (echo round trip), `delivery`, `connection`.
    pub op: String,
    /// Operations completed in the measured window.
    pub ops: u64,
    pub throughput_per_sec: f64,
    /// Round-trip, publish-to-receive or connect latency of the measured operations.
    pub latency: Option<Latency>,
    /// Server CPU over the measured window (with --server-pid).
    pub server_cpu: Option<Cpu>,
    /// Server resident memory before and after (with --server-pid).
    pub server_memory_before: Option<Memory>,
    pub server_memory_after: Option<Memory>,
    /// The generator's own CPU over the window, and how many worker threads it had.
    pub generator_cpu: Cpu,
    pub generator_threads: usize,
    /// True when the generator used over 90% of its cores: its figures then bound the server's
    /// capacity from below, and the server CPU per operation is the figure to compare.
    pub generator_bound: bool,
    /// Scenario-specific counters (failures, lost, duplicated, ...).
    pub counts: BTreeMap<String, u64>,
    /// Error messages with how often they occurred.
    pub errors: BTreeMap<String, u64>,
    /// Scenario-specific results (memory per connection, delivered share, ...).
    pub extra: Map<String, Value>,
    /// Scenario-specific tables (one row per hot swap, ...), printed as tables in the text
    /// report.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, Table>,
}

/// A table of the report: column names and rows of values (numbers, strings, or null for
/// "not measured"), the same in the JSON and in the text report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    pub fn new(columns: &[&str]) -> Self {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one value per column.
    pub fn row(&mut self, values: Vec<Value>) {
        debug_assert_eq!(values.len(), self.columns.len(), "one value per column");
        self.rows.push(values);
    }

    /// The table as aligned text, each line starting with `indent`.
    pub fn text(&self, indent: &str) -> String {
        let cell = |v: &Value| match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(cell).collect())
            .collect();
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|s| s.chars().count())
                    .chain([c.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut s = String::new();
        for line in std::iter::once(&self.columns).chain(&cells) {
            let padded: Vec<String> = line
                .iter()
                .zip(&widths)
                .map(|(c, &w)| format!("{c:>w$}"))
                .collect();
            let _ = writeln!(s, "{indent}{}", padded.join("  "));
        }
        s
    }
}

impl Report {
    pub fn new(scenario: &str, common: &Common, url: String, op: &str) -> Self {
        Report {
            scenario: scenario.to_string(),
            dialect: common.dialect.name().to_string(),
            label: if common.label.is_empty() {
                common.dialect.name().to_string()
            } else {
                common.label.clone()
            },
            addr: common.addr.clone(),
            url,
            unix_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            params: Map::new(),
            measured_secs: 0.0,
            op: op.to_string(),
            ops: 0,
            throughput_per_sec: 0.0,
            latency: None,
            server_cpu: None,
            server_memory_before: None,
            server_memory_after: None,
            generator_cpu: Cpu::new(0, 0.0, 0),
            generator_threads: 1,
            generator_bound: false,
            counts: BTreeMap::new(),
            errors: BTreeMap::new(),
            extra: Map::new(),
            tables: BTreeMap::new(),
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<Value>) {
        self.params.insert(k.to_string(), v.into());
    }

    pub fn count(&mut self, k: &str, v: u64) {
        self.counts.insert(k.to_string(), v);
    }

    /// Fills throughput and CPU figures from the marks taken at the window's edges.
    pub fn window(&mut self, ops: u64, before: &CpuMark, after: &CpuMark, threads: usize) {
        let secs = after.at.duration_since(before.at).as_secs_f64();
        self.measured_secs = secs;
        self.ops = ops;
        self.throughput_per_sec = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
        if let (Some(a), Some(b)) = (after.server_us, before.server_us) {
            self.server_cpu = Some(Cpu::new(a.saturating_sub(b), secs, ops));
        }
        self.generator_cpu = Cpu::new(
            after.generator_us.saturating_sub(before.generator_us),
            secs,
            ops,
        );
        self.generator_threads = threads;
        self.generator_bound = self.generator_cpu.cores_used > 0.9 * threads as f64;
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== {} | {} ({} dialect) | {}",
            self.scenario, self.label, self.dialect, self.url
        );
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "   params      {}", params.join(" "));
        if self.scenario == "idle-memory" {
            let _ = writeln!(
                s,
                "   held        {} connections for {:.2} s",
                self.ops, self.measured_secs
            );
        } else {
            let _ = writeln!(
                s,
                "   throughput  {:.0} {}/s ({} in {:.2} s)",
                self.throughput_per_sec,
                plural(&self.op),
                self.ops,
                self.measured_secs
            );
        }
        if let Some(l) = &self.latency {
            let _ = writeln!(s, "   latency     {}", l.line());
        }
        if let Some(c) = &self.server_cpu {
            let _ = writeln!(
                s,
                "   server CPU  {:.0} ms = {:.0}% of a core; {} per {}",
                c.cpu_ms,
                c.cores_used * 100.0,
                c.us_per_op
                    .map(|u| format!("{u:.2} µs"))
                    .unwrap_or_else(|| "-".into()),
                self.op
            );
        }
        if let (Some(b), Some(a)) = (&self.server_memory_before, &self.server_memory_after) {
            let _ = writeln!(
                s,
                "   server RSS  {:.1} MiB -> {:.1} MiB",
                b.best() as f64 / 1048576.0,
                a.best() as f64 / 1048576.0
            );
        }
        let _ = writeln!(
            s,
            "   generator   {:.0}% of {} thread(s){}",
            self.generator_cpu.cores_used * 100.0,
            self.generator_threads,
            if self.generator_bound {
                "  [generator-bound: compare server CPU per op]"
            } else {
                ""
            }
        );
        if !self.counts.is_empty() {
            let c: Vec<String> = self
                .counts
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "   counts      {}", c.join(" "));
        }
        for (k, v) in &self.extra {
            let v = match v {
                Value::Number(n) => n.to_string(),
                Value::String(t) => t.clone(),
                // A latency distribution reads as the main latency line does.
                Value::Object(o) if o.contains_key("p99_us") && o.contains_key("percentiles") => {
                    match Latency::deserialize(v) {
                        Ok(l) => l.line(),
                        Err(_) => v.to_string(),
                    }
                }
                other => {
                    let t = other.to_string();
                    if t.len() > 300 {
                        format!("{}...", &t[..t.floor_char_boundary(300)])
                    } else {
                        t
                    }
                }
            };
            let _ = writeln!(s, "   {k:<11} {v}");
        }
        for (name, t) in &self.tables {
            let _ = writeln!(s, "   {name}:");
            s.push_str(&t.text("     "));
        }
        for (e, n) in &self.errors {
            let _ = writeln!(s, "   error x{n}: {e}");
        }
        s
    }

    pub fn table(&mut self, name: &str, table: Table) {
        self.tables.insert(name.to_string(), table);
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_text_aligns_columns_and_shows_missing_values() {
        let mut t = Table::new(&["swap", "taken", "first_new_ms"]);
        t.row(vec![json!(1), json!("yes"), json!(212.5)]);
        t.row(vec![json!(2), json!("no"), Value::Null]);
        assert_eq!(
            t.text("  "),
            "  swap  taken  first_new_ms\n     1    yes         212.5\n     2     no             -\n"
        );
    }
}
