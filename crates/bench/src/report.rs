//! What a run reports: percentiles from HDR histograms, a table for people, and a JSON file for
//! tools.
//!
//! Every histogram holds microseconds; reports show milliseconds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ceiling::CeilingRecord;
use crate::check::Check;
use crate::scenarios::{Results, SettingsRecord};

/// An empty histogram of microseconds, 3 significant digits, growing to whatever is recorded.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid precision")
}

/// Records a duration in microseconds (at least 1, the histogram's lowest value).
pub fn record_duration(histogram: &mut Histogram<u64>, duration: Duration) {
    record_micros(
        histogram,
        duration.as_micros().try_into().unwrap_or(u64::MAX),
    );
}

/// Largest value recorded, in microseconds (an hour): anything longer is a hang, not a
/// latency, and capping it keeps a bad clock reading from growing a histogram without bound.
const MAX_MICROS: u64 = 3_600_000_000;

/// Records microseconds; zero (clock granularity) counts as 1.
pub fn record_micros(histogram: &mut Histogram<u64>, micros: u64) {
    // `record`, not `saturating_record`: only `record` grows an auto-resizing histogram, and
    // with the cap it cannot fail.
    let _ = histogram.record(micros.clamp(1, MAX_MICROS));
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

impl Percentiles {
    /// Reads them from a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| round3(micros as f64 / 1000.0);
        if histogram.is_empty() {
            return Self {
                count: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        Self {
            count: histogram.len(),
            mean_ms: round3(histogram.mean() / 1000.0),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    /// One line for the table.
    pub fn summary(&self) -> String {
        format!(
            "p50 {} · p90 {} · p99 {} · max {} ms",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.max_ms)
        )
    }
}

/// Milliseconds with precision that suits their size.
fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Rounds to three decimals, so the JSON shows what is meaningful.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// A rate per second over `elapsed`.
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (count as f64 / seconds * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// The human-readable side of a report: metric and value, in sections.
#[derive(Debug, Default)]
pub struct Table {
    /// Rows in order; a row with an empty value is a section heading.
    rows: Vec<(String, String)>,
}

impl Table {
    /// Adds a section heading.
    pub fn section(&mut self, title: impl Into<String>) {
        self.rows.push((title.into(), String::new()));
    }

    /// Adds a metric.
    pub fn row(&mut self, metric: impl Into<String>, value: impl Into<String>) {
        self.rows.push((metric.into(), value.into()));
    }

    fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(m, _)| m.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (metric, value) in &self.rows {
            if value.is_empty() {
                let _ = writeln!(out, "  {metric}");
            } else {
                let _ = writeln!(out, "    {metric:<width$}  {value}");
            }
        }
        out
    }
}

/// One scenario's report, as written to JSON (the shape is shown at the top of `main.rs`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Whether every check passed.
    pub passed: bool,
    /// `release` or `debug`: debug figures are not comparable.
    pub build: &'static str,
    /// CPUs the bench saw, since every figure depends on them.
    pub cpus: usize,
    /// When it started, in milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// How long the whole scenario took, start-up and checks included.
    pub elapsed_s: f64,
    /// The settings it ran with.
    pub settings: SettingsRecord,
    /// Its figures; the fields depend on the scenario.
    pub results: Results,
    /// With `--with-ceiling`: the no-op legs around the scenario, and its figures as fractions
    /// of the ceiling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<CeilingRecord>,
    /// The correctness checks and what they found.
    pub checks: Vec<Check>,
    /// The same figures for people.
    #[serde(skip)]
    pub table: Table,
    /// The table's title line: scenario and set-up.
    #[serde(skip)]
    pub title: String,
}

impl Report {
    /// Prints the table, the checks, and what failed.
    pub fn print(&self) {
        println!("{}", self.title);
        print!("{}", self.table.render());
        println!("  checks");
        for check in &self.checks {
            println!(
                "    {} {}",
                if check.passed() { "ok  " } else { "FAIL" },
                check.summary()
            );
        }
        println!(
            "  {} in {:.1} s",
            if self.passed { "passed" } else { "FAILED" },
            self.elapsed_s
        );
    }
}

/// The report of `all`: every scenario's, in order.
#[derive(Debug, Serialize)]
pub struct Combined {
    /// Always `all`.
    scenario: &'static str,
    /// Whether every scenario's checks passed.
    passed: bool,
    /// Each scenario's report.
    runs: Vec<Report>,
}

impl Combined {
    /// Wraps the reports.
    pub fn new(runs: Vec<Report>) -> Self {
        Self {
            scenario: "all",
            passed: runs.iter().all(|r| r.passed),
            runs,
        }
    }
}

/// `target/bench/<name>.json`, in the target directory this binary was built into (so it does
/// not depend on where it is started from); `./target/bench` if that cannot be told.
pub fn default_json_path(name: &str) -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_owned()))
        // Cargo marks its target directories with this file.
        .filter(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("bench").join(format!("{name}.json"))
}

/// Writes `value` as pretty JSON, creating the directory.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
