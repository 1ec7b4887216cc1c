//! What the kernel says about a process, read from `/proc`: CPU time,
//! resident memory, the open-files limit and the machine's load.
//!
//! The benchmark reads these for its server child, so the figures are the
//! server's alone and not mixed with the load generator's.

use std::fs;
use std::io;

/// CPU time a process has used so far, from two sources.
#[derive(Debug, Clone, Copy)]
pub struct CpuTime {
    /// The sum of the first field of `/proc/<pid>/task/*/schedstat`: time on
    /// a CPU in nanoseconds, per thread. Nanosecond resolution, but a thread
    /// that has exited no longer counts (the servers' threads live for the
    /// whole run). `None` when the kernel does not provide it.
    pub sched_ns: Option<u64>,
    /// `utime + stime` from `/proc/<pid>/stat`, converted to nanoseconds.
    /// Includes exited threads, but its resolution is one clock tick
    /// (usually 10 ms).
    pub stat_ns: u64,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads both CPU clocks of `pid`; `ticks_per_sec` is `CLK_TCK`.
pub fn cpu_time(pid: u32, ticks_per_sec: u64) -> io::Result<CpuTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces; the
    // fields after the last ')' start at field 3 (state). utime and stime
    // are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| invalid(format!("/proc/{pid}/stat: no command name")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| invalid(format!("/proc/{pid}/stat: field {} missing", i + 3)))
    };
    let ticks = field(11)? + field(12)?;
    Ok(CpuTime {
        sched_ns: sched_ns(pid).ok(),
        stat_ns: ticks * 1_000_000_000 / ticks_per_sec.max(1),
    })
}

fn sched_ns(pid: u32) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| invalid(format!("{}: unexpected format", path.display())))?;
    }
    Ok(total)
}

fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| invalid(format!("/proc/{pid}/status: no {key}")))
}

/// Resident memory now (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory ever (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmHWM:")
}

/// This process's soft limit on open files (children inherit it).
pub fn open_files_soft_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// `CLK_TCK`, from `getconf`; 100 (the Linux default) if that fails.
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The 1, 5 and 15 minute load averages, as the kernel prints them.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// How many CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One thread's CPU time so far.
#[derive(Debug, Clone)]
pub struct ThreadCpu {
    /// The thread id.
    pub tid: u32,
    /// Its name (`/proc/<pid>/task/<tid>/comm`).
    pub name: String,
    /// Time on a CPU, nanoseconds (schedstat, first field).
    pub ns: u64,
    /// Time runnable but waiting for a CPU, nanoseconds (schedstat, second
    /// field): how much the machine's other load held this thread back.
    pub wait_ns: u64,
}

/// Every live thread of `pid` with its CPU time (empty without schedstat).
pub fn thread_cpu(pid: u32) -> Vec<ThreadCpu> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let path = entry.ok()?.path();
        let tid = path.file_name()?.to_str()?.parse().ok()?;
        let schedstat = fs::read_to_string(path.join("schedstat")).ok()?;
        let mut fields = schedstat.split_whitespace().map(|f| f.parse::<u64>().ok());
        let ns = fields.next()??;
        let wait_ns = fields.next()??;
        let name = fs::read_to_string(path.join("comm"))
            .ok()?
            .trim()
            .to_owned();
        Some(ThreadCpu {
            tid,
            name,
            ns,
            wait_ns,
        })
    })
    .collect()
}

/// What each thread used between two samples, busiest first, as
/// `(name, nanoseconds)`; threads below 1% of `wall_ns` are left out.
pub fn thread_cpu_delta(
    before: &[ThreadCpu],
    after: &[ThreadCpu],
    wall_ns: u64,
) -> Vec<(String, u64)> {
    let mut used: Vec<(String, u64)> = after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.tid == a.tid).map_or(0, |b| b.ns);
            (a.name.clone(), a.ns.saturating_sub(b))
        })
        .filter(|(_, ns)| *ns * 100 >= wall_ns)
        .collect();
    used.sort_by_key(|u| std::cmp::Reverse(u.1));
    used
}

/// Total runqueue wait of all threads between two samples, nanoseconds.
pub fn wait_delta(before: &[ThreadCpu], after: &[ThreadCpu]) -> u64 {
    after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.tid == a.tid)
                .map_or(0, |b| b.wait_ns);
            a.wait_ns.saturating_sub(b)
        })
        .sum()
}
