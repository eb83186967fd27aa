//! Reading a process's CPU time and resident memory from `/proc`.

use std::fs;
use std::io;
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second used by `/proc/PID/stat` (`getconf CLK_TCK`, 100 on Linux).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// A process to read: another one by PID, or this one.
#[derive(Clone, Copy, Debug)]
pub enum Proc {
    Pid(u32),
    Current,
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Pid(p) => format!("/proc/{p}"),
            Proc::Current => "/proc/self".to_string(),
        }
    }

    /// User plus system CPU time of every thread of the process, in microseconds
    /// (`utime + stime` from `/proc/PID/stat`, which has a resolution of one clock tick).
    pub fn cpu_time_us(self) -> io::Result<u64> {
        let stat = fs::read_to_string(format!("{}/stat", self.dir()))?;
        // The command name (field 2) may contain spaces and parentheses: fields after the last ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime is field 14, stime field 15.
        let num = |i: usize| -> io::Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))
        };
        let ticks = num(11)? + num(12)?;
        Ok(ticks * 1_000_000 / clk_tck())
    }

    /// Resident memory: `VmRSS` from `/proc/PID/status` and `Rss` from `smaps_rollup` when the
    /// kernel has it, both in bytes.
    pub fn memory(self) -> io::Result<Memory> {
        let status = fs::read_to_string(format!("{}/status", self.dir()))?;
        let vm_rss = kib_field(&status, "VmRSS:")
            .ok_or_else(|| io::Error::other("no VmRSS in /proc/PID/status"))?;
        let smaps_rss = fs::read_to_string(format!("{}/smaps_rollup", self.dir()))
            .ok()
            .and_then(|s| kib_field(&s, "Rss:"));
        Ok(Memory { vm_rss, smaps_rss })
    }
}

/// Resident memory of a process, in bytes.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Memory {
    pub vm_rss: u64,
    pub smaps_rss: Option<u64>,
}

impl Memory {
    /// The figure used for per-connection arithmetic: smaps_rollup's Rss when present
    /// (exact), VmRSS otherwise (which the kernel updates in batches).
    pub fn best(&self) -> u64 {
        self.smaps_rss.unwrap_or(self.vm_rss)
    }
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A pair of CPU readings, of the server (if any) and of the generator itself.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    pub server_us: Option<u64>,
    pub generator_us: u64,
    pub at: std::time::Instant,
}

impl CpuMark {
    pub fn take(server: Option<u32>) -> Self {
        CpuMark {
            server_us: server.and_then(|p| Proc::Pid(p).cpu_time_us().ok()),
            generator_us: Proc::Current.cpu_time_us().unwrap_or(0),
            at: std::time::Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_stats() {
        assert!(Proc::Current.cpu_time_us().is_ok());
        let mem = Proc::Current.memory().unwrap();
        assert!(mem.vm_rss > 0);
        assert!(mem.best() > 0);
    }

    #[test]
    fn parses_kib_fields() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nThreads: 1\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(1234 * 1024));
        assert_eq!(kib_field(status, "VmHWM:"), None);
    }
}
