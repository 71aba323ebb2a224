//! CPU and memory figures of processes from /proc, for benchmarks that must measure the SFU
//! process alone. Parsers are pure and tested on captured text.

use std::path::Path;

/// Nanoseconds of CPU a process's threads have run, from `/proc/<pid>/task/*/schedstat`
/// (nanosecond resolution, unlike the clock ticks of `/proc/<pid>/stat`).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += parse_schedstat(&text).unwrap_or(0);
        }
    }
    Some(total)
}

/// First field of a schedstat line: time spent on the CPU in ns.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// User and system CPU of a process in clock ticks (`utime`, `stime` of `/proc/<pid>/stat`):
/// coarse, but the only place the kernel's share of a process's time is told.
pub fn user_system_ticks(pid: u32) -> Option<(u64, u64)> {
    parse_user_system(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Fields 14 and 15 of a `/proc/<pid>/stat` line, counted after the command name (which is in
/// parentheses and may hold spaces).
pub fn parse_user_system(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Resident memory in KiB from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vmrss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Busy and total CPU time of the whole machine in clock ticks, from `/proc/stat`.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string(Path::new("/proc/stat")).ok()?)
}

pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// Clock ticks per second for `/proc/stat`.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_texts_parse() {
        assert_eq!(parse_schedstat("123456789 2000 30\n"), Some(123_456_789));
        assert_eq!(
            parse_vmrss("Name:\tmeridian\nVmRSS:\t   20480 kB\nThreads: 4\n"),
            Some(20480)
        );
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(parse_proc_stat(stat), Some((161, 1181)));
        assert_eq!(parse_proc_stat("nothing"), None);
        let pid_stat =
            "4242 (meridian w0) S 1 4242 4242 0 -1 4194560 900 0 0 0 731 1462 0 0 20 0 9";
        assert_eq!(parse_user_system(pid_stat), Some((731, 1462)));
        assert_eq!(parse_user_system("4242 (x"), None);
    }

    #[test]
    fn this_process_is_measurable() {
        let pid = std::process::id();
        assert!(process_cpu_ns(pid).is_some());
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(machine_cpu_ticks().is_some());
        assert!(user_system_ticks(pid).is_some());
    }
}
