//! The scenarios: each starts a fresh platform (so no run inherits another's data), drives
//! load through gRPC, checks that every customer got exactly one welcome package, and returns
//! a [`Report`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use mip_integration::Mode;
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use serde::Serialize;
use tokio::time::Instant;

use crate::ceiling::{self, CeilingResults};
use crate::check::{self, Check, FanoutCheck, PollCheck};
use crate::cpu::{self, Meter};
use crate::load::{self, Clients};
use crate::platform::{Platform, PlatformConfig};
use crate::poll_cost::{BatchPlan, PAGE_SIZE, Poller};
use crate::report::{Percentiles, Report, Table, histogram, per_second, record_micros, round3};
use crate::watch::Fanout;
use crate::{Settings, value_name};

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The no-op servers beside the real CreateCustomer.
    Ceiling,
    /// Customers/s, creation and end to end.
    Throughput,
    /// End-to-end latency under an open-loop rate.
    Latency,
    /// CreateCustomer alone.
    Unary,
    /// Many watchers.
    Fanout,
    /// Throughput and latency with the integration service polling.
    Poll,
    /// Peak RSS per service process.
    Memory,
    /// What a ListCustomerEvents poll costs CRM, by customers and new events.
    PollCost,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 8] = [
        Scenario::Ceiling,
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Unary,
        Scenario::Fanout,
        Scenario::Poll,
        Scenario::Memory,
        Scenario::PollCost,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Unary => "unary",
            Scenario::Fanout => "fanout",
            Scenario::Poll => "poll",
            Scenario::Memory => "memory",
            Scenario::PollCost => "poll-cost",
        }
    }
}

/// What a scenario part hands back: its figures and its checks (its rows go to the table).
struct Part<R> {
    /// Figures, for the JSON `results`.
    results: R,
    /// Checks run.
    checks: Vec<Check>,
}

impl<R> Part<R> {
    fn map(self, f: impl FnOnce(R) -> Results) -> Part<Results> {
        Part {
            results: f(self.results),
            checks: self.checks,
        }
    }
}

/// A scenario's figures: the JSON `results` object, its fields in declaration order.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Results {
    /// `ceiling`.
    Ceiling(CeilingResults),
    /// `throughput`.
    Throughput(ThroughputResults),
    /// `latency`.
    Latency(LatencyResults),
    /// `unary`.
    Unary(UnaryResults),
    /// `fanout`.
    Fanout(FanoutResults),
    /// `poll`: the other two, measured with the integration service polling.
    Poll {
        /// As in `throughput`.
        throughput: ThroughputResults,
        /// As in `latency`.
        latency: LatencyResults,
    },
    /// `memory`.
    Memory {
        /// Customers created.
        customers: usize,
        /// Each process's memory.
        processes: Vec<ProcessMemory>,
    },
    /// `poll-cost`.
    PollCost(PollCostResults),
}

/// The settings a report records.
#[derive(Debug, Serialize)]
pub struct SettingsRecord {
    /// `in-process` or `processes`.
    deployment: &'static str,
    /// The integration service's feed mode.
    mode: String,
    /// Its poll interval.
    poll_interval_ms: u64,
    /// Its deliveries at once.
    max_in_flight: usize,
    /// Every service's durability (SQLite only).
    durability: String,
    /// `sqlite` or `postgres`.
    backend: &'static str,
    /// `--cluster`: CRM replicas, Inventory replicas, integration workers.
    cluster: Option<[usize; 3]>,
    /// `-n`.
    customers: usize,
    /// `-c`.
    concurrency: usize,
    /// `-r`.
    rate_per_s: f64,
    /// `--duration`.
    duration_s: f64,
    /// `-w`.
    watchers: usize,
    /// `--polls`.
    polls: usize,
    /// `--connections`.
    connections: usize,
    /// `--request-ids`.
    request_ids: String,
    /// `--batch`.
    batch: usize,
    /// `--with-ceiling`.
    with_ceiling: bool,
    /// `--rounds` (the ceiling's).
    rounds: usize,
    /// `--legs` (the ceiling's).
    legs: Vec<String>,
    /// `--smoke`.
    smoke: bool,
}

/// Runs one scenario on a fresh platform and reports it. An error means it could not run to
/// the end; a failed check is a report with `passed: false`.
pub async fn run(scenario: Scenario, settings: &Settings) -> anyhow::Result<Report> {
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let started = Instant::now();
    let mut table = Table::default();
    // Memory reads each service process's RSS and poll-cost CRM's CPU time, so they always run
    // the services as processes.
    let processes = settings.processes
        || settings.cluster.is_some()
        || matches!(scenario, Scenario::Memory | Scenario::PollCost);
    let mode = if scenario == Scenario::Poll {
        Mode::Poll
    } else {
        settings.mode
    };
    let config = PlatformConfig {
        processes,
        mode,
        poll_interval: settings.poll_interval,
        max_in_flight: settings.max_in_flight,
        durability: settings.durability,
        database_url: settings.database_url.clone(),
        cluster: settings.cluster,
        service_log: settings.service_log.clone(),
    };
    // The ceiling's no-op legs just before a closed-loop scenario, and again just after.
    // Around the open-loop scenarios it does not divide their figures, but tells how fast the
    // machine was in that run (fan-out's target holds only within 20% of the day's best).
    let with_ceiling = settings.with_ceiling
        && matches!(
            scenario,
            Scenario::Throughput | Scenario::Unary | Scenario::Fanout | Scenario::Latency
        );
    let before = if with_ceiling {
        Some(ceiling::noop_round(settings, &config).await?)
    } else {
        None
    };
    let part = match scenario {
        Scenario::Ceiling => {
            let (results, checks) = ceiling::ceiling(settings, &config, &mut table).await?;
            Part {
                results: Results::Ceiling(results),
                checks,
            }
        }
        Scenario::Throughput => throughput(settings, &config, &mut table)
            .await?
            .map(Results::Throughput),
        Scenario::Latency => latency(settings, &config, &mut table)
            .await?
            .map(Results::Latency),
        Scenario::Unary => unary(settings, &config, &mut table)
            .await?
            .map(Results::Unary),
        Scenario::Fanout => fanout(settings, &config, &mut table)
            .await?
            .map(Results::Fanout),
        Scenario::Poll => {
            table.section("throughput, integration service polling");
            let throughput = throughput(settings, &config, &mut table).await?;
            table.section("latency, integration service polling");
            let latency = latency(settings, &config, &mut table).await?;
            Part {
                checks: [throughput.checks, latency.checks].concat(),
                results: Results::Poll {
                    throughput: throughput.results,
                    latency: latency.results,
                },
            }
        }
        Scenario::Memory => memory(settings, &config, &mut table).await?,
        Scenario::PollCost => poll_cost(settings, &config, &mut table)
            .await?
            .map(Results::PollCost),
    };
    let ceiling = match before {
        Some(before) => {
            let after = ceiling::noop_round(settings, &config).await?;
            Some(ceiling::record(
                before,
                after,
                &part.results,
                settings,
                config.processes,
                &mut table,
            ))
        }
        None => None,
    };
    let deployment = match settings.cluster {
        Some(c) => format!(
            "cluster: {} CRM, {} Inventory, {} workers",
            c.crm, c.inventory, c.workers
        ),
        None if processes => "separate processes".to_owned(),
        None => "in-process".to_owned(),
    };
    let title = format!(
        "{} ({deployment}, mode {}, {}{})",
        scenario.name(),
        value_name(&mode),
        match settings.database_url {
            Some(_) => "PostgreSQL".to_owned(),
            None => format!("SQLite, durability {}", value_name(&settings.durability)),
        },
        if settings.smoke { ", smoke" } else { "" }
    );
    Ok(Report {
        scenario: scenario.name(),
        passed: part.checks.iter().all(Check::passed),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        started_unix_ms,
        elapsed_s: round3(started.elapsed().as_secs_f64()),
        settings: SettingsRecord {
            deployment: match (settings.cluster, processes) {
                (Some(_), _) => "cluster",
                (None, true) => "processes",
                (None, false) => "in-process",
            },
            cluster: settings.cluster.map(|c| [c.crm, c.inventory, c.workers]),
            mode: value_name(&mode),
            poll_interval_ms: settings.poll_interval.as_millis() as u64,
            max_in_flight: settings.max_in_flight,
            durability: value_name(&settings.durability),
            backend: if settings.database_url.is_some() {
                "postgres"
            } else {
                "sqlite"
            },
            customers: settings.customers,
            concurrency: settings.concurrency,
            rate_per_s: settings.rate,
            duration_s: settings.duration.as_secs_f64(),
            watchers: settings.watchers,
            polls: settings.polls,
            connections: settings.connections,
            request_ids: value_name(&settings.request_ids),
            batch: settings.batch,
            with_ceiling: settings.with_ceiling,
            rounds: settings.rounds,
            legs: settings.legs.iter().map(|l| l.name()).collect(),
            smoke: settings.smoke,
        },
        results: part.results,
        ceiling,
        checks: part.checks,
        table,
        title,
    })
}

/// Starts the platform and connects the load's clients.
async fn start(
    settings: &Settings,
    config: &PlatformConfig,
) -> anyhow::Result<(Platform, Clients)> {
    let platform = Platform::start(config).await?;
    let clients = Clients::connect(&platform.crm_replicas, platform.inventory, settings).await?;
    Ok((platform, clients))
}

/// A CPU meter over the platform's service processes (none when in-process: then this
/// process's thread groups tell the services apart). Replicas of one service are numbered.
fn meter(platform: &Platform) -> Meter {
    let pids = platform.pids();
    let processes = pids
        .iter()
        .enumerate()
        .map(|(i, (name, pid))| {
            let same = pids.iter().filter(|(n, _)| n == name).count();
            let nth = pids[..i].iter().filter(|(n, _)| n == name).count();
            let label = if same > 1 {
                format!("{name}-{nth}")
            } else {
                (*name).to_owned()
            };
            (label, *pid)
        })
        .collect();
    Meter::new(processes)
}

/// Admin clients of every integration worker (one, outside a cluster).
async fn workers(platform: &Platform) -> anyhow::Result<Vec<load::IntegrationClient>> {
    let mut clients = Vec::new();
    for addr in platform.integration_addrs() {
        clients.push(load::integration_client(addr).await?);
    }
    anyhow::ensure!(
        !clients.is_empty(),
        "the integration service is not running"
    );
    Ok(clients)
}

/// Waits until the integration service has handled every created customer, then runs the
/// package check.
async fn deliver_and_verify(
    platform: &Platform,
    clients: &Clients,
    created: &[load::Created],
    settings: &Settings,
) -> anyhow::Result<(
    check::PackageCheck,
    std::collections::HashMap<uuid::Uuid, check::Packages>,
)> {
    let mut workers = workers(platform).await?;
    check::wait_delivered(&mut workers, created.len(), settings.stall_timeout).await?;
    check::verify_packages(&clients.inventory, created).await
}

/// Figures of the throughput scenario.
#[derive(Debug, Serialize)]
pub struct ThroughputResults {
    /// Customers created.
    pub customers: usize,
    /// Concurrent creates.
    pub concurrency: usize,
    /// From the first create to the last reply.
    pub create_s: f64,
    /// Customers created per second.
    pub create_per_s: f64,
    /// From the first create until the integration service had handled every customer.
    pub end_to_end_s: f64,
    /// Customers per second, created and given their package.
    pub end_to_end_per_s: f64,
    /// Latency of each create call (CreateCustomer, or BatchCreateCustomers with --batch) as the callers saw it.
    pub create_latency: Percentiles,
    /// Transient CreateCustomer failures retried.
    pub create_retries: u64,
    /// CPU time per customer from the first create until every one was handled, in
    /// microseconds, by process (and by thread group of this process; see `cpu`).
    pub cpu_us_per_customer: BTreeMap<String, f64>,
}

/// N customers at concurrency C: how fast they are created, and how fast they all have
/// their package.
async fn throughput(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<ThroughputResults>> {
    let (results, packages) = measure_throughput(settings, config).await?;
    throughput_table(&results, settings, table);
    Ok(Part {
        results,
        checks: vec![Check::OneWelcomePackageEach(packages)],
    })
}

/// The throughput scenario's measurement, without its table: also a leg of the ceiling.
pub async fn measure_throughput(
    settings: &Settings,
    config: &PlatformConfig,
) -> anyhow::Result<(ThroughputResults, check::PackageCheck)> {
    let (platform, clients) = start(settings, config).await?;
    let mut integration = workers(&platform).await?;
    let meter = meter(&platform);
    let cpu_before = meter.read();
    let started = Instant::now();
    let run = load::closed_loop(&clients.crm, settings.customers, settings.concurrency).await?;
    // The delivered counter is cheap to watch; the listing below then proves it.
    check::wait_delivered(&mut integration, run.created.len(), settings.stall_timeout).await?;
    let mut end_to_end = started.elapsed();
    let cpu = meter.per_customer(&cpu_before, &meter.read(), run.created.len());
    let (packages, _) = check::verify_packages(&clients.inventory, &run.created).await?;
    if settings.cluster.is_some() {
        // Workers count a redelivery after a partition moved as a delivery again, so their
        // added-up counters can reach the target early: in a cluster, end to end lasts until
        // the listing has found every package (which includes the listing's own time).
        end_to_end = started.elapsed();
    }
    platform.stop().await?;

    let results = ThroughputResults {
        customers: run.created.len(),
        concurrency: settings.concurrency,
        create_s: round3(run.elapsed.as_secs_f64()),
        create_per_s: per_second(run.created.len(), run.elapsed),
        end_to_end_s: round3(end_to_end.as_secs_f64()),
        end_to_end_per_s: per_second(run.created.len(), end_to_end),
        create_latency: Percentiles::of(&run.latency),
        create_retries: run.retries,
        cpu_us_per_customer: cpu,
    };
    Ok((results, packages))
}

/// The throughput scenario's rows.
fn throughput_table(results: &ThroughputResults, settings: &Settings, table: &mut Table) {
    let call = if settings.batch > 1 {
        format!("BatchCreateCustomers ({} per call)", settings.batch)
    } else {
        "CreateCustomer".to_owned()
    };
    table.row(
        "customers",
        format!(
            "{} at concurrency {}, by {call}",
            results.customers, results.concurrency
        ),
    );
    table.row(
        "creation",
        format!(
            "{:.0} customers/s ({:.2} s)",
            results.create_per_s, results.create_s
        ),
    );
    table.row(
        "end to end (all packaged)",
        format!(
            "{:.0} customers/s ({:.2} s)",
            results.end_to_end_per_s, results.end_to_end_s
        ),
    );
    table.row("call latency", results.create_latency.summary());
    table.row(
        "CPU per customer",
        cpu::summary(&results.cpu_us_per_customer),
    );
    table.row("call retries", results.create_retries.to_string());
}

/// Figures of the latency scenario.
#[derive(Debug, Serialize)]
pub struct LatencyResults {
    /// Creates per second asked for.
    target_rate_per_s: f64,
    /// Creates per second actually sent.
    sent_rate_per_s: f64,
    /// Customers created.
    customers: usize,
    /// Package `create_time` minus customer `create_time`, both server timestamps.
    end_to_end: Percentiles,
    /// CreateCustomer reply time, from each call's scheduled send time.
    create_response: Percentiles,
    /// Largest delay of a send behind its schedule (the load generator falling behind).
    max_send_lag_ms: f64,
    /// Most creates in flight at once.
    max_in_flight: usize,
    /// Transient CreateCustomer failures retried.
    create_retries: u64,
}

/// Customers created at a fixed rate, whatever the replies do; latency from each customer's
/// creation to its package's.
async fn latency(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<LatencyResults>> {
    let (platform, clients) = start(settings, config).await?;
    let run = load::open_loop(&clients.crm, settings.rate, settings.duration).await?;
    let (packages, found) = deliver_and_verify(&platform, &clients, &run.created, settings).await?;
    platform.stop().await?;

    let mut end_to_end = histogram();
    for customer in &run.created {
        if let Some(package) = found.get(&customer.id) {
            let delay = (package.first_create_us - customer.create_us).max(0);
            record_micros(&mut end_to_end, delay as u64);
        }
    }
    let results = LatencyResults {
        target_rate_per_s: settings.rate,
        sent_rate_per_s: per_second(run.created.len().saturating_sub(1), run.send_elapsed),
        customers: run.created.len(),
        end_to_end: Percentiles::of(&end_to_end),
        create_response: Percentiles::of(&run.response),
        max_send_lag_ms: round3(run.max_send_lag.as_secs_f64() * 1000.0),
        max_in_flight: run.max_in_flight,
        create_retries: run.retries,
    };
    table.row(
        "customers",
        format!(
            "{} at {:.0}/s asked, {:.0}/s sent",
            results.customers, results.target_rate_per_s, results.sent_rate_per_s
        ),
    );
    table.row(
        "end to end (package − customer)",
        results.end_to_end.summary(),
    );
    table.row(
        "CreateCustomer (from schedule)",
        results.create_response.summary(),
    );
    table.row(
        "send lag max / in flight max",
        format!("{} ms / {}", results.max_send_lag_ms, results.max_in_flight),
    );
    Ok(Part {
        results,
        checks: vec![Check::OneWelcomePackageEach(packages)],
    })
}

/// Figures of the unary scenario.
#[derive(Debug, Serialize)]
pub struct UnaryResults {
    /// Requests made.
    pub requests: usize,
    /// Concurrent requests.
    pub concurrency: usize,
    /// From the first request to the last reply.
    pub elapsed_s: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Latency as the callers saw it.
    pub latency: Percentiles,
    /// Transient failures retried.
    pub retries: u64,
    /// CPU time per request over the measurement, in microseconds, by process (and by thread
    /// group of this process; see `cpu`).
    pub cpu_us_per_customer: BTreeMap<String, f64>,
}

/// CreateCustomer alone: CRM and Inventory run, the integration service starts only after the
/// measurement (it then serves every customer from the start of the log, for the check).
async fn unary(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<UnaryResults>> {
    let (results, packages) = measure_unary(settings, config).await?;
    table.row(
        "CreateCustomer",
        format!(
            "{} requests at concurrency {}: {:.0} requests/s ({:.2} s)",
            results.requests, results.concurrency, results.requests_per_s, results.elapsed_s
        ),
    );
    table.row("latency", results.latency.summary());
    table.row(
        "CPU per request",
        cpu::summary(&results.cpu_us_per_customer),
    );
    table.row("retries", results.retries.to_string());
    Ok(Part {
        results,
        checks: vec![Check::OneWelcomePackageEach(packages)],
    })
}

/// The unary scenario's measurement, without its table: also a leg of the ceiling.
pub async fn measure_unary(
    settings: &Settings,
    config: &PlatformConfig,
) -> anyhow::Result<(UnaryResults, check::PackageCheck)> {
    let mut platform = Platform::start_without_integration(config).await?;
    let clients = Clients::connect(&platform.crm_replicas, platform.inventory, settings).await?;
    let meter = meter(&platform);
    let cpu_before = meter.read();
    let run = load::closed_loop(&clients.crm, settings.customers, settings.concurrency).await?;
    let cpu = meter.per_customer(&cpu_before, &meter.read(), run.created.len());
    platform.start_integration().await?;
    let (packages, _) = deliver_and_verify(&platform, &clients, &run.created, settings).await?;
    platform.stop().await?;

    let results = UnaryResults {
        requests: run.created.len(),
        concurrency: settings.concurrency,
        elapsed_s: round3(run.elapsed.as_secs_f64()),
        requests_per_s: per_second(run.created.len(), run.elapsed),
        latency: Percentiles::of(&run.latency),
        retries: run.retries,
        cpu_us_per_customer: cpu,
    };
    Ok((results, packages))
}

/// Figures of the fanout scenario.
#[derive(Debug, Serialize)]
pub struct FanoutResults {
    /// Watchers subscribed.
    watchers: usize,
    /// Events each watcher had to receive.
    events: u64,
    /// Creates per second asked for.
    target_rate_per_s: f64,
    /// Creates per second actually sent.
    sent_rate_per_s: f64,
    /// Commit-to-receipt delay over every event at every watcher.
    delay_all: Percentiles,
    /// The highest per-watcher p99: the slowest watcher's experience.
    p99_ms_slowest_watcher: f64,
    /// The median of the per-watcher p99s.
    p99_ms_median_watcher: f64,
}

/// W watchers while customers are created at rate R: delay from commit to receipt, and every
/// watcher must get every event.
async fn fanout(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<FanoutResults>> {
    let (platform, clients) = start(settings, config).await?;
    let head_before = clients.crm_head().await?;
    let fanout = Fanout::start(&platform.crm_replicas, settings.watchers).await?;
    let run = load::open_loop(&clients.crm, settings.rate, settings.duration).await?;
    let head = clients.crm_head().await?;
    let watchers = fanout.finish(head, settings.stall_timeout).await;
    let (packages, _) = deliver_and_verify(&platform, &clients, &run.created, settings).await?;
    platform.stop().await?;

    let (first, expected) = (head_before + 1, (head - head_before).max(0) as u64);
    let mut all = histogram();
    let mut p99s = Vec::with_capacity(watchers.len());
    let mut fanout_check = FanoutCheck {
        watchers: settings.watchers,
        expected_events: expected,
        complete: 0,
        examples: Vec::new(),
    };
    for (i, watcher) in watchers.iter().enumerate() {
        all.add(&watcher.delays)?;
        p99s.push(watcher.delays.value_at_quantile(0.99));
        if watcher.complete(first, head) {
            fanout_check.complete += 1;
        } else if fanout_check.examples.len() < 5 {
            fanout_check.examples.push(format!(
                "watcher {i}: {} events, sequences {}..={}, {} out of order{}",
                watcher.received,
                watcher.first,
                watcher.last,
                watcher.out_of_order,
                watcher
                    .error
                    .as_deref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    p99s.sort_unstable();
    let ms = |micros: u64| round3(micros as f64 / 1000.0);
    let results = FanoutResults {
        watchers: settings.watchers,
        events: expected,
        target_rate_per_s: settings.rate,
        sent_rate_per_s: per_second(run.created.len().saturating_sub(1), run.send_elapsed),
        delay_all: Percentiles::of(&all),
        p99_ms_slowest_watcher: ms(p99s.last().copied().unwrap_or(0)),
        p99_ms_median_watcher: ms(p99s.get(p99s.len() / 2).copied().unwrap_or(0)),
    };
    table.row(
        "watchers × events",
        format!(
            "{} × {} ({:.0}/s asked, {:.0}/s sent)",
            results.watchers, results.events, results.target_rate_per_s, results.sent_rate_per_s
        ),
    );
    table.row("commit → receipt, all", results.delay_all.summary());
    table.row(
        "p99 slowest / median watcher",
        format!(
            "{} / {} ms",
            results.p99_ms_slowest_watcher, results.p99_ms_median_watcher
        ),
    );
    Ok(Part {
        results,
        checks: vec![
            Check::EveryWatcherEveryEvent(fanout_check),
            Check::OneWelcomePackageEach(packages),
        ],
    })
}

/// One process's memory.
#[derive(Debug, Serialize)]
pub struct ProcessMemory {
    /// `crm`, `inventory`, `integration`, or `mip-bench`: this process, the load generator,
    /// whose peak covers its whole life (under `all`, the in-process scenarios before too).
    process: String,
    /// Its process id.
    pid: u32,
    /// Resident memory once ready, before any load.
    rss_ready_mib: f64,
    /// Resident memory after the run.
    rss_end_mib: f64,
    /// Peak resident memory over its life (VmHWM).
    peak_rss_mib: f64,
}

/// VmRSS and VmHWM of a process, in MiB, from /proc (Linux only).
fn rss(pid: u32) -> anyhow::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("read {path} (Linux only)"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing from {path}"))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {line:?} in {path}"))?;
        Ok(round3(kib / 1024.0))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// N customers through three service processes; each one's peak RSS afterwards.
async fn memory(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<Results>> {
    let (platform, clients) = start(settings, config).await?;
    let mut processes: Vec<(String, u32)> = platform
        .pids()
        .into_iter()
        .map(|(name, pid)| (name.to_owned(), pid))
        .collect();
    processes.push(("mip-bench".to_owned(), std::process::id()));
    let ready = processes
        .iter()
        .map(|(_, pid)| rss(*pid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let run = load::closed_loop(&clients.crm, settings.customers, settings.concurrency).await?;
    let (packages, _) = deliver_and_verify(&platform, &clients, &run.created, settings).await?;
    let mut memory = Vec::new();
    for ((process, pid), (rss_ready, _)) in processes.into_iter().zip(ready) {
        let (rss_end, peak) = rss(pid)?;
        memory.push(ProcessMemory {
            process,
            pid,
            rss_ready_mib: rss_ready,
            rss_end_mib: rss_end,
            peak_rss_mib: peak,
        });
    }
    platform.stop().await?;

    table.row(
        "customers",
        format!(
            "{} at concurrency {}",
            run.created.len(),
            settings.concurrency
        ),
    );
    for m in &memory {
        table.row(
            format!("{} (pid {})", m.process, m.pid),
            format!(
                "peak {:.1} MiB · ready {:.1} MiB · end {:.1} MiB",
                m.peak_rss_mib, m.rss_ready_mib, m.rss_end_mib
            ),
        );
    }
    Ok(Part {
        results: Results::Memory {
            customers: run.created.len(),
            processes: memory,
        },
        checks: vec![Check::OneWelcomePackageEach(packages)],
    })
}

/// New events the poll-cost batches ask for, besides none (a poll from the head).
const NEW_EVENTS: [usize; 3] = [1, 100, 1000];

/// Most wall time a poll-cost batch spends reaching its CRM CPU minimum.
const POLL_BATCH_MAX_WALL: Duration = Duration::from_secs(20);

/// Figures of the poll-cost scenario.
#[derive(Debug, Serialize)]
pub struct PollCostResults {
    /// Events every poll asked for.
    page_size: i32,
    /// Untimed calls before each batch.
    warm_up_calls: u64,
    /// The /proc CPU clock tick, in milliseconds: the resolution of each batch's CRM CPU time.
    cpu_tick_ms: f64,
    /// One entry per customer count, in increasing order.
    steps: Vec<PollCostStep>,
}

/// The polls measured at one customer count.
#[derive(Debug, Serialize)]
pub struct PollCostStep {
    /// Customers in CRM.
    customers: usize,
    /// The change log's head (one CREATED event per customer).
    head_sequence: i64,
    /// One batch per number of new events; those the log is too short for are left out.
    polls: Vec<PollCostBatch>,
}

/// One batch of identical polls.
#[derive(Debug, Serialize)]
pub struct PollCostBatch {
    /// Events each poll returned (0: from the head).
    new_events: usize,
    /// Timed calls.
    calls: u64,
    /// Calls per second, one at a time.
    calls_per_s: f64,
    /// Latency as the client saw it (encode, round trip on loopback, decode).
    latency: Percentiles,
    /// CPU time of CRM's process over the batch.
    crm_cpu_ms: f64,
    /// CPU time of CRM's process per call, in microseconds.
    crm_cpu_us_per_call: f64,
    /// Its resolution: one clock tick over the calls, in microseconds.
    crm_cpu_resolution_us: f64,
}

/// Customer counts poll-cost measures at: none, a tenth of `-n`, and `-n`.
fn customer_steps(n: usize) -> Vec<usize> {
    let mut steps = vec![0, n / 10, n];
    steps.dedup();
    steps
}

/// What an empty poll and a poll of 1, 100 and 1000 new events cost CRM, at a growing number
/// of customers: client-observed latency and CRM's CPU time per call. CRM and Inventory run
/// as processes with nothing else touching them; the integration service starts after the
/// measurement, for the package check.
async fn poll_cost(
    settings: &Settings,
    config: &PlatformConfig,
    table: &mut Table,
) -> anyhow::Result<Part<PollCostResults>> {
    let mut platform = Platform::start_without_integration(config).await?;
    let clients = Clients::connect(&platform.crm_replicas, platform.inventory, settings).await?;
    let crm_pid = platform
        .pids()
        .into_iter()
        .find_map(|(name, pid)| (name == "crm").then_some(pid))
        .context("CRM does not run as a process of its own")?;
    // A connection of its own, so no load on the shared ones sits in front of a poll.
    let mut poller = Poller::new(
        CrmServiceClient::new(load::connect(platform.crm).await?),
        crm_pid,
    );
    let plan = BatchPlan {
        warm_up: (settings.polls as u64 / 10).max(10),
        min_calls: settings.polls as u64,
        min_cpu: if settings.smoke {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        },
        max_wall: POLL_BATCH_MAX_WALL,
    };
    let mut created = Vec::new();
    let mut steps = Vec::new();
    let mut poll_check = PollCheck {
        polls: 0,
        exact: 0,
        examples: Vec::new(),
    };
    for customers in customer_steps(settings.customers) {
        if customers > created.len() {
            let run = load::closed_loop_from(
                &clients.crm,
                created.len(),
                customers - created.len(),
                settings.concurrency,
            )
            .await?;
            created.extend(run.created);
        }
        let (head, token) = clients.crm_head_token().await?;
        poller.remember(head, token);
        let mut polls = Vec::new();
        for new_events in std::iter::once(0).chain(NEW_EVENTS) {
            if new_events as i64 > head {
                continue;
            }
            let batch = poller.measure(head, new_events, &plan).await?;
            poll_check.polls += batch.checked;
            poll_check.exact += batch.checked - batch.wrong;
            for example in &batch.examples {
                if poll_check.examples.len() < 5 {
                    poll_check.examples.push(example.clone());
                }
            }
            polls.push(PollCostBatch {
                new_events,
                calls: batch.calls,
                calls_per_s: per_second(batch.calls as usize, batch.wall),
                latency: Percentiles::of(&batch.latency),
                crm_cpu_ms: round3(batch.crm_cpu.as_secs_f64() * 1000.0),
                crm_cpu_us_per_call: (batch.crm_cpu_us_per_call() * 10.0).round() / 10.0,
                crm_cpu_resolution_us: (batch.crm_cpu_resolution_us(poller.tick()) * 10.0).round()
                    / 10.0,
            });
        }
        steps.push(PollCostStep {
            customers: created.len(),
            head_sequence: head,
            polls,
        });
    }
    platform.start_integration().await?;
    let (packages, _) = deliver_and_verify(&platform, &clients, &created, settings).await?;
    platform.stop().await?;

    let results = PollCostResults {
        page_size: PAGE_SIZE,
        warm_up_calls: plan.warm_up,
        cpu_tick_ms: round3(poller.tick().as_secs_f64() * 1000.0),
        steps,
    };
    poll_cost_table(&results, &plan, table);
    Ok(Part {
        results,
        checks: vec![
            Check::PollsReturnTheNewEvents(poll_check),
            Check::OneWelcomePackageEach(packages),
        ],
    })
}

/// The poll-cost figures as two grids, customers down and new events across.
fn poll_cost_table(results: &PollCostResults, plan: &BatchPlan, table: &mut Table) {
    let columns = std::iter::once(0).chain(NEW_EVENTS);
    let header = columns
        .clone()
        .map(|k| match k {
            0 => "empty".to_owned(),
            1 => "1 event".to_owned(),
            k => format!("{k} events"),
        })
        .map(|h| format!("{h:<16}"))
        .collect::<String>();
    let grid = |table: &mut Table, cell: &dyn Fn(&PollCostBatch) -> String| {
        table.row("customers", header.trim_end());
        for step in &results.steps {
            let row = columns
                .clone()
                .map(|k| {
                    step.polls
                        .iter()
                        .find(|b| b.new_events == k)
                        .map_or_else(|| "–".to_owned(), cell)
                })
                .map(|c| format!("{c:<16}"))
                .collect::<String>();
            table.row(step.customers.to_string(), row.trim_end());
        }
    };
    table.row(
        "each batch",
        format!(
            "≥ {} ListCustomerEvents calls (page_size {}) one at a time on one connection, \
             after {} warm-up calls{}",
            plan.min_calls,
            results.page_size,
            plan.warm_up,
            if plan.min_cpu > Duration::ZERO {
                format!(", and until CRM used ≥ {:?} of CPU", plan.min_cpu)
            } else {
                String::new()
            }
        ),
    );
    table.section("latency as the client saw it: p50 / p99 ms");
    grid(table, &|b| {
        format!("{} / {}", ms3(b.latency.p50_ms), ms3(b.latency.p99_ms))
    });
    table.section(format!(
        "CRM CPU per call: µs ± one {} ms tick over the calls (utime + stime of the crm process)",
        results.cpu_tick_ms
    ));
    grid(table, &|b| {
        format!(
            "{:.1} ±{:.1}",
            b.crm_cpu_us_per_call, b.crm_cpu_resolution_us
        )
    });
}

/// Milliseconds to the microsecond while small.
fn ms3(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_cost_measures_at_none_a_tenth_and_all_customers() {
        assert_eq!(customer_steps(100_000), [0, 10_000, 100_000]);
        assert_eq!(customer_steps(300), [0, 30, 300]);
        assert_eq!(customer_steps(5), [0, 5], "no step twice");
    }
}
