//! The yardstick every closed-loop figure is read against: the same load generator,
//! connections, concurrency and call count against a no-op CRM on bare tonic (the ceiling),
//! the no-op behind the project's server stack, the real CreateCustomer, and CreateCustomer end
//! to end, alternated in one run.
//!
//! This machine's speed changes by a factor of two from hour to hour, so only ratios within one
//! run compare: each leg is reported as a fraction of the bare-tonic leg of the same round.
//! Rounds alternate their order (forwards, then backwards), so a drift in the machine's speed
//! during a round does not always favour the same leg.

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::Serialize;

use crate::check::Check;
use crate::cpu::{self, Meter};
use crate::load::{self, CrmClients};
use crate::noop::{NoopServer, Stack};
use crate::platform::PlatformConfig;
use crate::report::{Percentiles, Table, per_second, round3};
use crate::scenarios::{self, Results};
use crate::{Settings, value_name};

/// One thing the closed loop is run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Leg {
    /// The no-op CRM on bare tonic: the ceiling.
    Tonic,
    /// The no-op CRM behind `mip_runtime::server::serve`: prices the project's layers.
    Runtime,
    /// The no-op behind bare tonic plus the metrics layer alone.
    Metrics,
    /// The no-op behind bare tonic plus the admission layer alone.
    Admission,
    /// The no-op behind bare tonic plus the request timeout alone.
    Timeout,
    /// The real CreateCustomer, CRM and Inventory running, the integration service started
    /// after the measurement (the unary scenario).
    Create,
    /// The real CreateCustomer with the integration service following: customers per second
    /// until each has its package (the throughput scenario).
    EndToEnd,
}

/// The legs of `ceiling` unless `--legs` says otherwise.
pub const DEFAULT_LEGS: [Leg; 4] = [Leg::Tonic, Leg::Runtime, Leg::Create, Leg::EndToEnd];

impl Leg {
    /// The no-op stack it serves, for the no-op legs.
    fn stack(self) -> Option<Stack> {
        match self {
            Leg::Tonic => Some(Stack::Tonic),
            Leg::Runtime => Some(Stack::Runtime),
            Leg::Metrics => Some(Stack::Metrics),
            Leg::Admission => Some(Stack::Admission),
            Leg::Timeout => Some(Stack::Timeout),
            Leg::Create | Leg::EndToEnd => None,
        }
    }

    /// Its name, as on the command line.
    pub fn name(self) -> String {
        value_name(&self)
    }

    /// What it measures, for the table.
    fn describe(self) -> &'static str {
        match self {
            Leg::Tonic => "no-op, bare tonic",
            Leg::Runtime => "no-op, runtime::server stack",
            Leg::Metrics => "no-op, tonic + metrics layer",
            Leg::Admission => "no-op, tonic + admission layer",
            Leg::Timeout => "no-op, tonic + request timeout",
            Leg::Create => "CreateCustomer alone",
            Leg::EndToEnd => "CreateCustomer end to end",
        }
    }
}

/// One leg's run.
#[derive(Debug, Clone, Serialize)]
pub struct LegRun {
    /// Which leg (`tonic`, `runtime`, `create`, `end-to-end`, ...).
    pub leg: String,
    /// Customers per second: replies for the no-op legs and `create`, packaged customers for
    /// `end-to-end`.
    pub per_s: f64,
    /// `per_s` over the bare-tonic leg of the same round (or of the same scenario run).
    pub fraction_of_ceiling: Option<f64>,
    /// The bare-tonic leg's total CPU per customer over this leg's: the fraction of the
    /// ceiling this leg would reach if both had the cores to themselves (CPU-bound), which
    /// other work on the machine does not move the way it moves `per_s`.
    pub cpu_fraction_of_ceiling: Option<f64>,
    /// Customers created (or pretended to be).
    pub customers: usize,
    /// How long the leg's figure took.
    pub elapsed_s: f64,
    /// Latency of each call as the callers saw it.
    pub latency: Percentiles,
    /// `end-to-end` only: creation alone, customers per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_per_s: Option<f64>,
    /// CPU time per customer over the leg, in microseconds, by process and by thread group of
    /// this process (see `cpu`): unlike `per_s`, independent of the share of the cores the
    /// leg was given.
    pub cpu_us_per_customer: BTreeMap<String, f64>,
}

/// Runs one leg on a fresh server; the real legs also run their package check.
async fn run_leg(
    leg: Leg,
    settings: &Settings,
    config: &PlatformConfig,
) -> anyhow::Result<(LegRun, Vec<Check>)> {
    let (run, checks) = match leg.stack() {
        Some(stack) => {
            let server = NoopServer::start(stack, config.processes, &config.service_log).await?;
            let crm = CrmClients::connect(&[server.addr], settings).await?;
            let meter = Meter::new(
                server
                    .pid()
                    .map(|pid| ("noop".to_owned(), pid))
                    .into_iter()
                    .collect(),
            );
            let cpu_before = meter.read();
            let run = load::closed_loop(&crm, settings.customers, settings.concurrency).await?;
            let cpu = meter.per_customer(&cpu_before, &meter.read(), run.created.len());
            drop(crm);
            server.stop().await?;
            let run = LegRun {
                leg: leg.name(),
                per_s: per_second(run.created.len(), run.elapsed),
                fraction_of_ceiling: None,
                cpu_fraction_of_ceiling: None,
                customers: run.created.len(),
                elapsed_s: round3(run.elapsed.as_secs_f64()),
                latency: Percentiles::of(&run.latency),
                create_per_s: None,
                cpu_us_per_customer: cpu,
            };
            (run, Vec::new())
        }
        None if leg == Leg::Create => {
            let (results, packages) = scenarios::measure_unary(settings, config).await?;
            let run = LegRun {
                leg: leg.name(),
                per_s: results.requests_per_s,
                fraction_of_ceiling: None,
                cpu_fraction_of_ceiling: None,
                customers: results.requests,
                elapsed_s: results.elapsed_s,
                latency: results.latency,
                create_per_s: None,
                cpu_us_per_customer: results.cpu_us_per_customer,
            };
            (run, vec![Check::OneWelcomePackageEach(packages)])
        }
        None => {
            let (results, packages) = scenarios::measure_throughput(settings, config).await?;
            let run = LegRun {
                leg: leg.name(),
                per_s: results.end_to_end_per_s,
                fraction_of_ceiling: None,
                cpu_fraction_of_ceiling: None,
                customers: results.customers,
                elapsed_s: results.end_to_end_s,
                latency: results.create_latency,
                create_per_s: Some(results.create_per_s),
                cpu_us_per_customer: results.cpu_us_per_customer,
            };
            (run, vec![Check::OneWelcomePackageEach(packages)])
        }
    };
    Ok((run, checks))
}

/// Runs `legs` once each in that order and fills in their fractions of the tonic leg.
async fn run_round(
    legs: &[Leg],
    settings: &Settings,
    config: &PlatformConfig,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Vec<LegRun>> {
    let mut runs = Vec::with_capacity(legs.len());
    for &leg in legs {
        let (run, leg_checks) = run_leg(leg, settings, config)
            .await
            .map_err(|e| e.context(format!("the {} leg", leg.name())))?;
        checks.extend(leg_checks);
        runs.push(run);
    }
    set_fractions(&mut runs);
    Ok(runs)
}

/// Each run's `per_s` over the tonic run's, and the tonic run's CPU per customer over its
/// own, when there is a tonic run.
fn set_fractions(runs: &mut [LegRun]) {
    let tonic = runs.iter().find(|r| r.leg == Leg::Tonic.name());
    let ceiling = tonic.map(|r| r.per_s).filter(|c| *c > 0.0);
    let ceiling_cpu = tonic.and_then(total_cpu);
    for run in runs {
        run.fraction_of_ceiling = ceiling.map(|c| round3(run.per_s / c));
        run.cpu_fraction_of_ceiling = ceiling_cpu
            .zip(total_cpu(run))
            .map(|(c, own)| round3(c / own));
    }
}

/// A run's CPU per customer over every process, if any was measured.
fn total_cpu(run: &LegRun) -> Option<f64> {
    run.cpu_us_per_customer
        .get("total")
        .copied()
        .filter(|t| *t > 0.0)
}

/// Median, smallest and largest of some figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median: round3(median),
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// One leg over every round.
#[derive(Debug, Serialize)]
pub struct LegSummary {
    /// Which leg.
    pub leg: String,
    /// Its customers per second over the rounds.
    pub per_s: Spread,
    /// Its fraction of the same round's ceiling, over the rounds.
    pub fraction_of_ceiling: Option<Spread>,
    /// Its CPU per customer, every process, in microseconds, over the rounds.
    pub cpu_us_per_customer: Option<Spread>,
    /// Its CPU-bound fraction of the same round's ceiling (see [`LegRun`]), over the rounds.
    pub cpu_fraction_of_ceiling: Option<Spread>,
}

/// Figures of the ceiling scenario.
#[derive(Debug, Serialize)]
pub struct CeilingResults {
    /// Calls (customers) per leg.
    pub customers: usize,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Customers per call (1: CreateCustomer).
    pub batch: usize,
    /// Each round's legs, in the order they ran.
    pub rounds: Vec<Vec<LegRun>>,
    /// Each leg over the rounds.
    pub summary: Vec<LegSummary>,
    /// End to end over CreateCustomer alone, round by round, when both legs ran: what delivery
    /// costs the unary path.
    pub end_to_end_fraction_of_create: Option<Spread>,
    /// The same, CPU-bound: CreateCustomer's CPU per customer over end to end's.
    pub end_to_end_cpu_fraction_of_create: Option<Spread>,
    /// The run's median bare-tonic figure against the day's best for the same set-up.
    pub against_best: Option<AgainstBest>,
}

/// The ceiling scenario: `--rounds` rounds of `--legs`, forwards then backwards.
pub async fn ceiling(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<(CeilingResults, Vec<Check>)> {
    anyhow::ensure!(
        settings.legs.contains(&Leg::Tonic),
        "--legs must include tonic, the ceiling the other legs are measured against"
    );
    let mut checks = Vec::new();
    let mut rounds = Vec::with_capacity(settings.rounds);
    for round in 0..settings.rounds {
        let mut legs = settings.legs.clone();
        if round % 2 == 1 {
            legs.reverse();
        }
        rounds.push(run_round(&legs, settings, config, &mut checks).await?);
    }
    let summary: Vec<LegSummary> = settings
        .legs
        .iter()
        .filter_map(|leg| {
            let runs: Vec<&LegRun> = rounds
                .iter()
                .flatten()
                .filter(|r| r.leg == leg.name())
                .collect();
            let per_s: Vec<f64> = runs.iter().map(|r| r.per_s).collect();
            let fractions: Vec<f64> = runs.iter().filter_map(|r| r.fraction_of_ceiling).collect();
            let cpu: Vec<f64> = runs.iter().filter_map(|r| total_cpu(r)).collect();
            let cpu_fractions: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.cpu_fraction_of_ceiling)
                .collect();
            Some(LegSummary {
                leg: leg.name(),
                per_s: Spread::of(&per_s)?,
                fraction_of_ceiling: Spread::of(&fractions),
                cpu_us_per_customer: Spread::of(&cpu),
                cpu_fraction_of_ceiling: Spread::of(&cpu_fractions),
            })
        })
        .collect();
    let find = |round: &'_ [LegRun], leg: Leg| -> Option<LegRun> {
        round.iter().find(|r| r.leg == leg.name()).cloned()
    };
    let end_to_end_fraction_of_create = Spread::of(
        &rounds
            .iter()
            .filter_map(|round| {
                let (e2e, create) = (find(round, Leg::EndToEnd)?, find(round, Leg::Create)?);
                Some(round3(e2e.per_s / create.per_s))
            })
            .collect::<Vec<_>>(),
    );
    let end_to_end_cpu_fraction_of_create = Spread::of(
        &rounds
            .iter()
            .filter_map(|round| {
                let (e2e, create) = (find(round, Leg::EndToEnd)?, find(round, Leg::Create)?);
                Some(round3(total_cpu(&create)? / total_cpu(&e2e)?))
            })
            .collect::<Vec<_>>(),
    );
    let tonic_median = summary_median(&summary, Leg::Tonic);
    let results = CeilingResults {
        against_best: tonic_median.and_then(|m| against_best(m, settings, config.processes)),
        customers: settings.customers,
        concurrency: settings.concurrency,
        batch: settings.batch,
        rounds,
        summary,
        end_to_end_fraction_of_create,
        end_to_end_cpu_fraction_of_create,
    };
    ceiling_table(&results, settings, table);
    Ok((results, checks))
}

/// The median figure of `leg` over the rounds.
fn summary_median(summary: &[LegSummary], leg: Leg) -> Option<f64> {
    summary
        .iter()
        .find(|s| s.leg == leg.name())
        .map(|s| s.per_s.median)
}

/// `0.381` as `38%`.
fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

/// A leg's figure and its fractions, for one cell.
fn cell(run: &LegRun) -> String {
    let mut cell = match run.fraction_of_ceiling {
        Some(f) => format!("{:.0}/s ({})", run.per_s, percent(f)),
        None => format!("{:.0}/s", run.per_s),
    };
    if let Some(f) = run.cpu_fraction_of_ceiling {
        cell.push_str(&format!(", CPU-bound {}", percent(f)));
    }
    cell
}

/// `median (min–max)` of fractions, as percentages.
fn percents(spread: &Spread) -> String {
    format!(
        "{} ({}–{})",
        percent(spread.median),
        percent(spread.min),
        percent(spread.max)
    )
}

/// How each leg's calls are made, for the table.
fn each_leg(settings: &Settings) -> String {
    let call = if settings.batch > 1 {
        format!("BatchCreateCustomers calls of {}", settings.batch)
    } else {
        "CreateCustomer calls".to_owned()
    };
    format!(
        "{} customers by {call}, {} at once over {} connections",
        settings.customers, settings.concurrency, settings.connections
    )
}

fn ceiling_table(results: &CeilingResults, settings: &Settings, table: &mut Table) {
    table.row("each leg", each_leg(settings));
    table.row(
        "rounds",
        format!(
            "{}, legs alternated (every other round backwards); % of the same round's bare tonic",
            results.rounds.len()
        ),
    );
    for (i, round) in results.rounds.iter().enumerate() {
        table.section(format!("round {}", i + 1));
        for run in round {
            let mut value = cell(run);
            if let Some(create) = run.create_per_s {
                value.push_str(&format!(", creation {create:.0}/s"));
            }
            value.push_str(&format!(" · p50 {} ms", run.latency.p50_ms));
            table.row(describe(&run.leg), value);
            table.row("  CPU per customer", cpu::summary(&run.cpu_us_per_customer));
        }
    }
    table.section(
        "over the rounds: median (min–max); CPU-bound: ceiling's CPU per customer over the leg's",
    );
    for leg in &results.summary {
        let mut value = format!(
            "{:.0}/s ({:.0}–{:.0})",
            leg.per_s.median, leg.per_s.min, leg.per_s.max
        );
        if let Some(f) = &leg.fraction_of_ceiling {
            value.push_str(&format!(" · {} of the ceiling", percents(f)));
        }
        if let Some(cpu) = &leg.cpu_us_per_customer {
            value.push_str(&format!(
                " · CPU {:.1} µs ({:.1}–{:.1})",
                cpu.median, cpu.min, cpu.max
            ));
        }
        if let Some(f) = &leg.cpu_fraction_of_ceiling {
            value.push_str(&format!(", CPU-bound {}", percents(f)));
        }
        table.row(describe(&leg.leg), value);
    }
    if let Some(f) = &results.end_to_end_fraction_of_create {
        let mut value = percents(f);
        if let Some(cpu) = &results.end_to_end_cpu_fraction_of_create {
            value.push_str(&format!(", CPU-bound {}", percents(cpu)));
        }
        table.row("end to end / CreateCustomer alone", value);
    }
    if let Some(against) = &results.against_best {
        best_row(against, table);
    }
}

/// A leg's description, from its name as recorded.
fn describe(name: &str) -> String {
    Leg::from_str(name, false).map_or_else(|_| name.to_owned(), |leg| leg.describe().to_owned())
}

/// `--with-ceiling`: the no-op legs of `--legs`, run right before and right after a
/// closed-loop scenario, and the scenario's figures over their mean.
#[derive(Debug, Serialize)]
pub struct CeilingRecord {
    /// The no-op legs before the scenario.
    pub before: Vec<LegRun>,
    /// The same legs after it.
    pub after: Vec<LegRun>,
    /// The ceiling: the mean of the two bare-tonic legs, customers per second.
    pub ceiling_per_s: f64,
    /// The scenario's figures, each with its fraction of the ceiling.
    pub figures: Vec<Figure>,
    /// The ceiling against the day's best for the same set-up.
    pub against_best: Option<AgainstBest>,
}

/// One figure of a scenario beside the ceiling.
#[derive(Debug, Serialize)]
pub struct Figure {
    /// What it is (`creation`, `end to end`, `CreateCustomer`, or a no-op leg's name).
    pub figure: String,
    /// Customers per second.
    pub per_s: f64,
    /// `per_s` over `ceiling_per_s`.
    pub fraction_of_ceiling: f64,
}

/// The no-op legs `--with-ceiling` runs: those of `--legs`, or tonic and runtime if it names
/// none; tonic always first.
fn noop_legs(settings: &Settings) -> Vec<Leg> {
    let mut legs: Vec<Leg> = settings
        .legs
        .iter()
        .copied()
        .filter(|l| l.stack().is_some() && *l != Leg::Tonic)
        .collect();
    legs.insert(0, Leg::Tonic);
    legs
}

/// Runs the no-op legs for `--with-ceiling` (before or after the scenario).
pub async fn noop_round(
    settings: &Settings,
    config: &PlatformConfig,
) -> anyhow::Result<Vec<LegRun>> {
    let mut checks = Vec::new();
    run_round(&noop_legs(settings), settings, config, &mut checks).await
}

/// Puts a scenario's figures beside the ceiling measured around it, and adds the rows.
pub fn record(
    before: Vec<LegRun>,
    after: Vec<LegRun>,
    results: &Results,
    settings: &Settings,
    processes: bool,
    table: &mut Table,
) -> CeilingRecord {
    let tonic = |runs: &[LegRun]| {
        runs.iter()
            .find(|r| r.leg == Leg::Tonic.name())
            .map_or(0.0, |r| r.per_s)
    };
    let ceiling_per_s = round3((tonic(&before) + tonic(&after)) / 2.0);
    let mut figures: Vec<(String, f64)> = Vec::new();
    for leg in noop_legs_of(&before) {
        let mean = before
            .iter()
            .chain(&after)
            .filter(|r| r.leg == leg)
            .map(|r| r.per_s)
            .sum::<f64>()
            / 2.0;
        if leg != Leg::Tonic.name() {
            figures.push((format!("no-op, {leg}"), round3(mean)));
        }
    }
    match results {
        Results::Throughput(r) => {
            figures.push(("creation".to_owned(), r.create_per_s));
            figures.push(("end to end".to_owned(), r.end_to_end_per_s));
        }
        Results::Unary(r) => figures.push(("CreateCustomer".to_owned(), r.requests_per_s)),
        _ => {}
    }
    let figures: Vec<Figure> = figures
        .into_iter()
        .map(|(figure, per_s)| Figure {
            figure,
            per_s,
            fraction_of_ceiling: if ceiling_per_s > 0.0 {
                round3(per_s / ceiling_per_s)
            } else {
                0.0
            },
        })
        .collect();
    table.section("beside the ceiling (no-op CRM on bare tonic, same load, before and after)");
    table.row(
        "ceiling",
        format!(
            "{ceiling_per_s:.0}/s (before {:.0}/s, after {:.0}/s)",
            tonic(&before),
            tonic(&after)
        ),
    );
    for figure in &figures {
        table.row(
            figure.figure.clone(),
            format!(
                "{:.0}/s = {} of the ceiling",
                figure.per_s,
                percent(figure.fraction_of_ceiling)
            ),
        );
    }
    let against_best = against_best(ceiling_per_s, settings, processes);
    if let Some(against) = &against_best {
        best_row(against, table);
    }
    CeilingRecord {
        before,
        after,
        ceiling_per_s,
        figures,
        against_best,
    }
}

/// The leg names of a round, in order.
fn noop_legs_of(runs: &[LegRun]) -> Vec<String> {
    runs.iter().map(|r| r.leg.clone()).collect()
}

/// The day's best bare-tonic figure for one set-up, kept across runs so that a report can say
/// how fast the machine was in its run against the fastest run that day (fan-out's target
/// holds in a run whose ceiling is within 20% of that best).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Best {
    /// Customers per second.
    pub per_s: f64,
    /// When it was measured, in milliseconds since the epoch.
    pub at_unix_ms: u64,
}

/// This run's ceiling against the day's best.
#[derive(Debug, Clone, Serialize)]
pub struct AgainstBest {
    /// Which set-up the best is for: deployment, concurrency, connections, batch.
    pub setup: String,
    /// The best bare-tonic figure of the day (UTC) for that set-up, this run included.
    pub best_today: Best,
    /// This run's ceiling over it.
    pub fraction_of_best: f64,
}

/// What `target/bench/ceiling-best.json` holds.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct BestFile {
    /// The UTC day (`YYYY-MM-DD`) the figures are from; another day's are dropped.
    day: String,
    /// The best per set-up.
    best: BTreeMap<String, Best>,
}

/// The set-up a ceiling figure depends on.
fn setup(settings: &Settings, processes: bool) -> String {
    format!(
        "{}, -c {}, --connections {}, --batch {}",
        if processes { "processes" } else { "in-process" },
        settings.concurrency,
        settings.connections,
        settings.batch
    )
}

/// A UTC date from days since the epoch (the civil-from-days algorithm).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Records `per_s` as the day's best for this set-up if it is, and compares it with the best.
/// Smoke runs and debug builds neither record nor compare: their figures mean nothing. A file
/// that cannot be read or written only costs the comparison.
fn against_best(per_s: f64, settings: &Settings, processes: bool) -> Option<AgainstBest> {
    if settings.smoke || cfg!(debug_assertions) || per_s <= 0.0 {
        return None;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    let day = civil_date((now_ms / 86_400_000) as i64);
    let path = crate::report::default_json_path("ceiling-best");
    let mut file: BestFile = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .filter(|f: &BestFile| f.day == day)
        .unwrap_or_else(|| BestFile {
            day,
            best: BTreeMap::new(),
        });
    let setup = setup(settings, processes);
    let best = file
        .best
        .entry(setup.clone())
        .and_modify(|b| {
            if per_s > b.per_s {
                *b = Best {
                    per_s,
                    at_unix_ms: now_ms,
                };
            }
        })
        .or_insert(Best {
            per_s,
            at_unix_ms: now_ms,
        });
    let against = AgainstBest {
        setup,
        best_today: *best,
        fraction_of_best: round3(per_s / best.per_s),
    };
    if let Err(e) = crate::report::write_json(&path, &file) {
        eprintln!("mip-bench: cannot keep the day's best ceiling: {e:#}");
    }
    Some(against)
}

/// A table row for [`AgainstBest`].
fn best_row(against: &AgainstBest, table: &mut Table) {
    let at = against.best_today.at_unix_ms / 1000 % 86_400;
    table.row(
        "ceiling vs the day's best",
        format!(
            "{} of {:.0}/s ({:02}:{:02} UTC; {})",
            percent(against.fraction_of_best),
            against.best_today.per_s,
            at / 3600,
            at / 60 % 60,
            against.setup
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(leg: Leg, per_s: f64) -> LegRun {
        LegRun {
            leg: leg.name(),
            per_s,
            fraction_of_ceiling: None,
            cpu_fraction_of_ceiling: None,
            customers: 100,
            elapsed_s: 1.0,
            latency: Percentiles::of(&crate::report::histogram()),
            create_per_s: None,
            cpu_us_per_customer: BTreeMap::new(),
        }
    }

    #[test]
    fn every_leg_is_a_fraction_of_the_same_rounds_bare_tonic() {
        let mut round = vec![
            run(Leg::Create, 10_000.0),
            run(Leg::Tonic, 25_000.0),
            run(Leg::Runtime, 20_000.0),
        ];
        for (run, cpu) in round.iter_mut().zip([80.0, 20.0, 25.0]) {
            run.cpu_us_per_customer.insert("total".to_owned(), cpu);
        }
        set_fractions(&mut round);
        let fractions: Vec<_> = round.iter().map(|r| r.fraction_of_ceiling).collect();
        assert_eq!(fractions, [Some(0.4), Some(1.0), Some(0.8)]);
        let cpu_bound: Vec<_> = round.iter().map(|r| r.cpu_fraction_of_ceiling).collect();
        assert_eq!(cpu_bound, [Some(0.25), Some(1.0), Some(0.8)]);
    }

    #[test]
    fn days_since_the_epoch_become_utc_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_425), "2025-12-03");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    #[test]
    fn spreads_give_the_median_and_the_range() {
        let spread = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((spread.median, spread.min, spread.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0]).unwrap().median, 1.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn a_scenario_figure_is_read_against_the_mean_of_the_ceilings_around_it() {
        let before = vec![run(Leg::Tonic, 30_000.0), run(Leg::Runtime, 27_000.0)];
        let after = vec![run(Leg::Tonic, 20_000.0), run(Leg::Runtime, 18_000.0)];
        let results = Results::Unary(scenarios::UnaryResults {
            requests: 100,
            concurrency: 4,
            elapsed_s: 0.01,
            requests_per_s: 10_000.0,
            latency: Percentiles::of(&crate::report::histogram()),
            retries: 0,
            cpu_us_per_customer: BTreeMap::new(),
        });
        let settings = crate::tests::parse(&["mip-bench", "unary", "--smoke"]);
        let record = record(
            before,
            after,
            &results,
            &settings,
            false,
            &mut Table::default(),
        );
        assert_eq!(record.ceiling_per_s, 25_000.0);
        let figures: Vec<_> = record
            .figures
            .iter()
            .map(|f| (f.figure.as_str(), f.per_s, f.fraction_of_ceiling))
            .collect();
        assert_eq!(
            figures,
            [
                ("no-op, runtime", 22_500.0, 0.9),
                ("CreateCustomer", 10_000.0, 0.4)
            ]
        );
    }

    #[test]
    fn with_ceiling_runs_bare_tonic_first_and_only_no_op_legs() {
        let cli = crate::tests::parse(&["mip-bench", "unary", "--with-ceiling"]);
        assert_eq!(noop_legs(&cli), [Leg::Tonic, Leg::Runtime]);
        let cli = crate::tests::parse(&[
            "mip-bench",
            "unary",
            "--with-ceiling",
            "--legs",
            "metrics,create,tonic",
        ]);
        assert_eq!(noop_legs(&cli), [Leg::Tonic, Leg::Metrics]);
    }
}
