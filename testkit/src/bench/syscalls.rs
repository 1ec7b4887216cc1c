//! Counting a running process's system calls with `perf stat` on the
//! kernel's syscall tracepoints: a counter per syscall in the kernel, no
//! stop per call as with `strace`, so the server runs at nearly its usual
//! speed while it is counted.
//!
//! [`SyscallCount::attach`] starts `perf stat -x, -p <pid>` on
//! `raw_syscalls:sys_enter` (every syscall), one tracepoint for each of
//! the [`COUNTED`] syscalls a WebSocket server's fan-out is made of, and
//! `context-switches`; [`SyscallCount::finish`] stops it with SIGINT and
//! parses what it wrote. Not `syscalls:sys_enter_*`: its ~360 counters per
//! thread take perf many seconds to open and close on a small machine. perf
//! counts the threads the process has when it attaches and every thread
//! they start afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The syscalls counted one by one; the rest show only in the total.
pub const COUNTED: [&str; 22] = [
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_ctl",
    "io_uring_enter",
    "futex",
    "sched_yield",
    "mmap",
    "munmap",
    "madvise",
    "mprotect",
    "brk",
    "accept4",
    "close",
];
/// How long perf gets to open its counters before the counted work starts
/// (a fraction of a second for [`COUNTED`], even on a busy machine).
pub const ATTACH_SETTLE: Duration = Duration::from_secs(2);
/// How long perf gets to write its figures after SIGINT.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// What perf counted: `total` syscalls, `context_switches`, and each
/// syscall that was made (name without the `sys_enter_` prefix, count),
/// most frequent first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyscallFigures {
    /// Every syscall entry (`raw_syscalls:sys_enter`).
    pub total: u64,
    /// `context-switches` (the software event).
    pub context_switches: u64,
    /// Per syscall, most frequent first; syscalls never made are left out.
    pub by_name: Vec<(String, u64)>,
}

/// A `perf stat` attached to a process.
pub struct SyscallCount {
    perf: Child,
    output: PathBuf,
}

impl SyscallCount {
    /// Attaches perf to `pid`, writing its figures to `output`. Wait
    /// [`ATTACH_SETTLE`] before starting the work to be counted.
    pub fn attach(pid: u32, output: &Path) -> Result<SyscallCount, String> {
        let mut events = vec![
            "raw_syscalls:sys_enter".to_owned(),
            "context-switches".to_owned(),
        ];
        events.extend(
            COUNTED
                .iter()
                .map(|name| format!("syscalls:sys_enter_{name}")),
        );
        // perf's complaints go to a file beside its figures, so that a
        // full pipe never blocks it.
        let errors = std::fs::File::create(output.with_extension("err"))
            .map_err(|e| format!("{}: {e}", output.display()))?;
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(output)
            .args(["-e", &events.join(","), "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            .spawn()
            .map_err(|e| format!("cannot start perf (apt-get install linux-perf): {e}"))?;
        Ok(SyscallCount {
            perf,
            output: output.to_owned(),
        })
    }

    /// Stops perf and returns what it counted.
    pub fn finish(mut self) -> Result<SyscallFigures, String> {
        let errors = self.output.with_extension("err");
        if let Ok(Some(status)) = self.perf.try_wait() {
            let err = std::fs::read_to_string(&errors).unwrap_or_default();
            return Err(format!("perf exited early ({status}): {}", err.trim()));
        }
        // perf prints its counts when interrupted; `kill` spares a libc
        // dependency for one signal.
        let pid = self.perf.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + FINISH_TIMEOUT;
        loop {
            match self.perf.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.perf.kill();
                    let _ = self.perf.wait();
                    return Err("perf did not stop after SIGINT".into());
                }
            }
        }
        let _ = std::fs::remove_file(&errors);
        let text = std::fs::read_to_string(&self.output)
            .map_err(|e| format!("{}: {e}", self.output.display()))?;
        Ok(parse_perf_csv(&text))
    }
}

impl Drop for SyscallCount {
    fn drop(&mut self) {
        if let Ok(None) = self.perf.try_wait() {
            let _ = self.perf.kill();
            let _ = self.perf.wait();
        }
    }
}

/// Parses `perf stat -x,` output: `count,unit,event,...` per line; comment
/// lines and counters perf could not read (`<not counted>`) are skipped.
pub fn parse_perf_csv(text: &str) -> SyscallFigures {
    let mut figures = SyscallFigures::default();
    for line in text.lines() {
        let mut fields = line.split(',');
        let (Some(count), Some(_unit), Some(event)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        match event.trim() {
            "raw_syscalls:sys_enter" => figures.total += count,
            "context-switches" | "cs" => figures.context_switches += count,
            other => {
                if let Some(name) = other.strip_prefix("syscalls:sys_enter_") {
                    if count > 0 {
                        figures.by_name.push((name.to_owned(), count));
                    }
                }
            }
        }
    }
    figures
        .by_name
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_gives_totals_and_the_syscalls_made_most_first() {
        let text = "# started on Fri Dec  4 19:53:37 2026\n\n\
            6773,,raw_syscalls:sys_enter,254144870,100.00,,\n\
            51,,syscalls:sys_enter_rt_sigreturn,254101405,100.00,,\n\
            1050,,syscalls:sys_enter_mmap,254162565,100.00,,\n\
            0,,syscalls:sys_enter_write,254162565,100.00,,\n\
            <not counted>,,syscalls:sys_enter_read,0,0.00,,\n\
            153,,syscalls:sys_enter_brk,256467749,100.00,,\n\
            77,,context-switches,256467749,100.00,,\n";
        assert_eq!(
            parse_perf_csv(text),
            SyscallFigures {
                total: 6773,
                context_switches: 77,
                by_name: vec![
                    ("mmap".into(), 1050),
                    ("brk".into(), 153),
                    ("rt_sigreturn".into(), 51)
                ],
            }
        );
    }
}
