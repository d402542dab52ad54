//! CPU time per customer, from `/proc`: what a leg costs, whatever share of the cores it got.
//!
//! On a machine shared with other work, calls per second say how much CPU a run was given as
//! much as what each call costs: a run with more busy threads gets a larger share of contended
//! cores. CPU time per call does not depend on that share, so it is what attributes the
//! microseconds. Each service process is read as a whole (`/proc/<pid>/stat`, exited threads
//! included); this process also by thread name (`/proc/self/task/*/stat`), which separates the
//! load generator (`bench-load`) from in-process services (`platform`, `sqlite-writer-*`,
//! `noop-server`). Times are in clock ticks (10 ms on Linux), so a figure over N calls is good
//! to 10 ms / N.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

/// User plus system CPU time of process `pid` (every thread, exited ones included).
pub fn process_cpu(pid: u32, tick: Duration) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat =
        std::fs::read_to_string(&path).with_context(|| format!("read {path} (Linux only)"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("no CPU times in {path}: {stat:?}"))?;
    Ok(tick * u32::try_from(ticks).context("CPU time out of range")?)
}

/// `utime + stime` from a `/proc/<pid>/stat` line, in clock ticks. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from
/// the last `)`: state is field 3, utime 14, stime 15.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The command (thread) name of a `/proc/.../stat` line.
fn comm(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

/// The unit of /proc's CPU times (`getconf CLK_TCK`; 100 per second on Linux when that cannot
/// be run).
pub fn clock_tick() -> Duration {
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    Duration::from_secs(1) / per_second
}

/// CPU time of this process's live threads, added up by thread name.
fn own_threads(tick: Duration) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let (Some(name), Some(ticks)) = (comm(&stat), cpu_ticks(&stat)) {
            *by_name.entry(name.to_owned()).or_default() += tick * ticks as u32;
        }
    }
    by_name
}

/// A reading of every process and thread group of interest.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Per process (`mip-bench` is this one), then per thread name of this process (`thread
    /// NAME`).
    times: BTreeMap<String, Duration>,
}

/// Reads the CPU time of this process and of `processes` (name and pid).
#[derive(Debug, Clone)]
pub struct Meter {
    /// The service processes.
    processes: Vec<(String, u32)>,
    /// The /proc tick.
    tick: Duration,
}

impl Meter {
    /// A meter over this process and `processes`.
    pub fn new(processes: Vec<(String, u32)>) -> Self {
        Self {
            processes,
            tick: clock_tick(),
        }
    }

    /// Reads them all now. A process that cannot be read (gone) is left out.
    pub fn read(&self) -> Reading {
        let mut times = BTreeMap::new();
        if let Ok(own) = process_cpu(std::process::id(), self.tick) {
            times.insert("mip-bench".to_owned(), own);
        }
        for (name, pid) in &self.processes {
            if let Ok(time) = process_cpu(*pid, self.tick) {
                times.insert(name.clone(), time);
            }
        }
        for (name, time) in own_threads(self.tick) {
            times.insert(format!("thread {name}"), time);
        }
        Reading { times }
    }

    /// Microseconds of CPU per customer between two readings, by process and thread group,
    /// plus `total` (every process); groups that used no measurable CPU are left out.
    pub fn per_customer(
        &self,
        before: &Reading,
        after: &Reading,
        customers: usize,
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if customers == 0 {
            return out;
        }
        let per = |d: Duration| (d.as_secs_f64() * 1e6 / customers as f64 * 10.0).round() / 10.0;
        let mut total = Duration::ZERO;
        for (name, end) in &after.times {
            // A thread that started during the run counts from zero.
            let start = before.times.get(name).copied().unwrap_or_default();
            let used = end.saturating_sub(start);
            if !name.starts_with("thread ") {
                total += used;
            }
            if !used.is_zero() {
                out.insert(name.clone(), per(used));
            }
        }
        out.insert("total".to_owned(), per(total));
        out
    }
}

/// `crm 61.2 · inventory 20.1 · … · total 150.3 µs`, for a table row: processes first, then
/// this process's thread groups in brackets.
pub fn summary(per_customer: &BTreeMap<String, f64>) -> String {
    let processes: Vec<String> = per_customer
        .iter()
        .filter(|(name, _)| !name.starts_with("thread ") && name.as_str() != "total")
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    let threads: Vec<String> = per_customer
        .iter()
        .filter_map(|(name, us)| Some(format!("{} {us:.1}", name.strip_prefix("thread ")?)))
        .collect();
    let total = per_customer.get("total").copied().unwrap_or_default();
    format!(
        "total {total:.1} µs: {} [threads of mip-bench: {}]",
        processes.join(" · "),
        threads.join(" · ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (mip (crm) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 1000000 2000 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(comm(stat), Some("mip (crm) x"));
        assert_eq!(cpu_ticks("4242 (mip) S 1 2"), None, "a truncated line");
    }

    #[test]
    fn per_customer_divides_what_each_used_and_totals_processes_only() {
        let meter = Meter::new(Vec::new());
        let reading = |pairs: &[(&str, u64)]| Reading {
            times: pairs
                .iter()
                .map(|(n, ms)| ((*n).to_owned(), Duration::from_millis(*ms)))
                .collect(),
        };
        let before = reading(&[("mip-bench", 100), ("crm", 50), ("thread bench-load", 40)]);
        let after = reading(&[
            ("mip-bench", 300),
            ("crm", 150),
            ("thread bench-load", 140),
            ("thread platform", 10),
        ]);
        let per = meter.per_customer(&before, &after, 1000);
        assert_eq!(per["mip-bench"], 200.0);
        assert_eq!(per["crm"], 100.0);
        assert_eq!(per["thread bench-load"], 100.0);
        assert_eq!(per["thread platform"], 10.0);
        assert_eq!(per["total"], 300.0);
    }
}
