//! `mip-bench`: benchmarks the Mini Integration Platform over real gRPC on loopback, and checks
//! on every run that creates customers that each one got exactly one welcome package request.
//!
//! Build and run it in release mode; figures from a debug build say little:
//!
//! ```sh
//! cargo run --release -p mip-bench -- ceiling               # the same load against no-op servers
//! cargo run --release -p mip-bench -- throughput            # N customers at concurrency C
//! cargo run --release -p mip-bench -- latency               # open loop at R/s for D seconds
//! cargo run --release -p mip-bench -- unary                 # CreateCustomer alone
//! cargo run --release -p mip-bench -- fanout                # W watchers while creating at R/s
//! cargo run --release -p mip-bench -- poll                  # throughput + latency, poll mode
//! cargo build --release && cargo run --release -p mip-bench -- memory   # peak RSS per process
//! cargo build --release && cargo run --release -p mip-bench -- poll-cost  # CRM's cost per poll
//! cargo run --release -p mip-bench -- all                   # every scenario, in that order
//! cargo run -p mip-bench -- all --smoke                     # CI: small, quick, checks only
//! ```
//!
//! Common flags (they go before or after the scenario): `-n` customers (100000), `-c`
//! concurrency (64), `-r` rate per second (1000), `--duration` seconds (10), `-w` watchers
//! (1000), `--polls` calls per poll-cost batch (2000), `--mode stream|poll|auto` (auto),
//! `--max-in-flight` of the integration service (2048), `--durability full|normal` (full),
//! `--database-url postgres://...` (PostgreSQL instead of SQLite; the bench empties the
//! services' schemas in that database before each scenario),
//! `--processes`, `--json PATH` (default
//! `target/bench/<scenario>.json`), `--with-ceiling` (throughput and unary: the no-op legs of
//! the ceiling before and after, and every figure as a fraction of it; latency and fanout: the
//! same legs beside their figures), `--rounds` and `--legs`
//! (the ceiling's). `--help` lists them all.
//!
//! The ceiling: this machine's speed changes from hour to hour, so every closed-loop figure can
//! be read next to what a no-op `CrmService` (creates answered at once, no storage) reaches with
//! the same load generator, connections and concurrency in the same run, served by bare tonic,
//! and behind the project's own `runtime::server` stack (which prices its layers). `ceiling`
//! alternates those with the real CreateCustomer and CreateCustomer end to end; see
//! [`ceiling`].
//!
//! By default the three services run in this process, each on its own `127.0.0.1:0` listener
//! and temporary data directory, on a runtime of their own. `--processes` runs them as separate
//! `mip crm|inventory|integration` processes instead: the `mip` binary must sit next to this one
//! (`cargo build --release` builds it), and the children are killed on every way out, Ctrl-C
//! included. `memory` and `poll-cost` always use processes, since they read a process's peak
//! RSS or CPU time.
//!
//! Every scenario prints a table and writes a JSON report:
//!
//! ```json
//! { "scenario": "latency", "passed": true, "build": "release", "cpus": 2,
//!   "started_unix_ms": 0, "elapsed_s": 6.1,
//!   "settings": { "deployment": "in-process", "mode": "auto", "poll_interval_ms": 500,
//!                 "max_in_flight": 2048,
//!                 "durability": "full", "customers": 100000, "concurrency": 64,
//!                 "rate_per_s": 1000.0, "duration_s": 10.0, "watchers": 1000, "polls": 2000,
//!                 "connections": 4, "smoke": false },
//!   "results": { "customers": 10000, "end_to_end": { "count": 10000, "mean_ms": 1.2,
//!                "p50_ms": 1.0, "p90_ms": 1.7, "p99_ms": 4.5, "p999_ms": 9.0, "max_ms": 18.6 },
//!                "...": "scenario-specific fields, see `scenarios::Results`" },
//!   "checks": [ { "check": "one_welcome_package_each", "customers": 10000,
//!                 "exactly_one": 10000, "missing": 0, "duplicated": 0, "unexpected": 0,
//!                 "repeated_ids": 0 } ] }
//! ```
//!
//! With `--with-ceiling` a report also has `"ceiling": { "before": [LEG...], "after": [LEG...],
//! "ceiling_per_s", "figures": [{ "figure", "per_s", "fraction_of_ceiling" }] }`, and the
//! ceiling scenario's `results` hold `"rounds": [[LEG...]...]` and a `"summary"` per leg, where
//! each LEG is `{ "leg": "tonic", "per_s", "fraction_of_ceiling", "cpu_fraction_of_ceiling",
//! "customers", "elapsed_s", "latency", "cpu_us_per_customer": { "mip-bench", "crm", ...,
//! "thread bench-load", ..., "total" } }`.
//!
//! `all` writes each scenario's file and a combined `{ "scenario": "all", "passed", "runs":
//! [...] }`. The exit status is 0 only if every check passed.
//!
//! Layout:
//! - [`platform`]: starts and stops the services, in-process or as processes.
//! - [`noop`]: the no-op CRM of the ceiling and how it is served (`serve-noop`, hidden).
//! - [`ceiling`]: the ceiling scenario's legs and rounds, and `--with-ceiling`.
//! - [`load`]: the client side: a few shared HTTP/2 connections, closed- and open-loop drivers.
//! - [`watch`]: the fan-out watchers, which decode only the fields they time.
//! - [`poll_cost`]: timed `ListCustomerEvents` batches and CRM's CPU time around them.
//! - [`cpu`]: CPU time per customer from /proc, by process and by thread group.
//! - [`check`]: waiting for delivery, and the one-package-per-customer check.
//! - [`scenarios`]: what each scenario does and reports.
//! - [`report`]: percentiles, the printed table and the JSON file.
#![forbid(unsafe_code)]

mod ceiling;
mod check;
mod cpu;
mod load;
mod noop;
mod platform;
mod poll_cost;
mod report;
mod scenarios;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use mip_integration::Mode;
use mip_runtime::sqlite::Durability;

use crate::ceiling::Leg;
use crate::noop::Stack;
use crate::scenarios::Scenario;

/// mimalloc instead of the system allocator: glibc's `malloc` and `free` took about 12% of the
/// CPU in a throughput profile (TECHNICAL_DESIGN.md, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks the Mini Integration Platform (CRM, Inventory, integration service) over real
/// gRPC on loopback, and checks that every customer got exactly one welcome package.
#[derive(Debug, Parser)]
#[command(name = "mip-bench", version, about, long_about = None)]
struct Cli {
    /// What to measure.
    #[command(subcommand)]
    command: Command,

    /// Sizes and platform settings, shared by every scenario.
    #[command(flatten)]
    flags: Flags,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum Command {
    /// The yardstick: the same closed loop against a no-op CRM on bare tonic, the no-op behind
    /// the project's server stack, the real CreateCustomer, and CreateCustomer end to end,
    /// alternated over --rounds; each as a fraction of the same round's bare tonic.
    Ceiling,
    /// Create N customers at concurrency C; report customers/s for creation and end to end.
    Throughput,
    /// Create customers at R/s for D seconds (open loop); report end-to-end latency
    /// (package create_time minus customer create_time).
    Latency,
    /// CreateCustomer alone (the integration service starts afterwards): requests/s and
    /// latency percentiles.
    Unary,
    /// W WatchCustomers subscribers while customers are created at R/s: delay from commit to
    /// receipt; every watcher must receive every event.
    Fanout,
    /// The throughput and latency scenarios with the integration service polling.
    Poll,
    /// Peak RSS of each service process after N customers (always runs separate processes).
    Memory,
    /// What a ListCustomerEvents poll costs CRM at 0, N/10 and N customers: latency and CRM
    /// CPU time per call of an empty poll (from the head) and of polls returning 1, 100 and
    /// 1000 new events (always runs separate processes; the integration service starts after
    /// the measurement, for the package check).
    PollCost,
    /// Every scenario above, in that order, with the same flags.
    All,
    /// Serve the no-op CRM of the ceiling until stdin closes, printing `listening on ADDR`
    /// first (the bench starts it with --processes).
    #[command(hide = true)]
    ServeNoop {
        /// How much of the real servers' stack the no-op gets.
        #[arg(long, env = "MIP_BENCH_NOOP_STACK", value_enum, default_value_t = Stack::Tonic)]
        stack: Stack,
        /// Where to listen; port 0 takes a free one.
        #[arg(long, env = "MIP_BENCH_NOOP_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

/// Flags shared by every scenario. Options without a value take a default that depends on
/// `--smoke`.
#[derive(Debug, Clone, clap::Args)]
struct Flags {
    /// Customers to create in throughput, unary, memory, each ceiling leg, poll's throughput
    /// half, and the last step of poll-cost [default: 100000; 300 with --smoke].
    #[arg(short = 'n', long, env = "MIP_BENCH_CUSTOMERS", global = true)]
    customers: Option<usize>,

    /// Concurrent CreateCustomer calls in the closed-loop scenarios (ceiling, throughput, unary,
    /// memory).
    #[arg(
        short = 'c',
        long,
        env = "MIP_BENCH_CONCURRENCY",
        default_value_t = 64,
        global = true
    )]
    concurrency: usize,

    /// Customers created per second in the open-loop scenarios (latency, fanout)
    /// [default: 1000; 150 with --smoke].
    #[arg(short = 'r', long, env = "MIP_BENCH_RATE", value_parser = parse_rate, global = true)]
    rate: Option<f64>,

    /// How long the open-loop scenarios send, in seconds or with a unit (`5`, `500ms`, `1m`)
    /// [default: 10; 2 with --smoke].
    #[arg(long, env = "MIP_BENCH_DURATION", value_parser = parse_seconds, global = true)]
    duration: Option<Duration>,

    /// WatchCustomers subscribers in fanout [default: 1000; 20 with --smoke].
    #[arg(short = 'w', long, env = "MIP_BENCH_WATCHERS", global = true)]
    watchers: Option<usize>,

    /// Timed calls per poll-cost batch, at least; without --smoke a batch goes on until CRM
    /// has used a second of CPU, so the 10 ms /proc tick stays under 1% [default: 2000; 50
    /// with --smoke].
    #[arg(long, env = "MIP_BENCH_POLLS", global = true)]
    polls: Option<usize>,

    /// Run a cluster on PostgreSQL (needs --database-url): CRM,INVENTORY,WORKERS separate
    /// `mip` processes, for example `3,2,2` for three CRM replicas, two Inventory replicas and
    /// two integration workers. The load is spread over the CRM replicas (and fan-out watchers
    /// over them too); the workers get every replica's address.
    #[arg(long, env = "MIP_BENCH_CLUSTER", value_parser = parse_cluster, global = true)]
    cluster: Option<Cluster>,

    /// Run each service as its own `mip` process (the binary next to this one) instead of in
    /// this process.
    #[arg(long, env = "MIP_BENCH_PROCESSES", global = true)]
    processes: bool,

    /// How the integration service reads CRM's feed (poll always polls).
    #[arg(long, env = "MIP_BENCH_MODE", value_enum, default_value_t = Mode::Auto, global = true)]
    mode: Mode,

    /// The integration service's pause between polls once caught up, in poll mode.
    #[arg(long, env = "MIP_BENCH_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration, global = true)]
    poll_interval: Duration,

    /// The integration service's `--max-in-flight`: deliveries at once, and so how large its
    /// batches to Inventory can grow.
    #[arg(long, env = "MIP_BENCH_MAX_IN_FLIGHT", default_value_t = mip_integration::DEFAULT_MAX_IN_FLIGHT, global = true)]
    max_in_flight: usize,

    /// How durably every service commits: `full` fsyncs every group commit, `normal` does not.
    #[arg(long, env = "MIP_BENCH_DURABILITY", value_enum, default_value_t = Durability::Full, global = true)]
    durability: Durability,

    /// Run every service on this PostgreSQL database instead of temporary SQLite files, for
    /// example `postgres://postgres@127.0.0.1:5432/bench`. Each scenario starts from empty
    /// `crm`, `inventory` and `integration` schemas: the bench DROPS them first, so never point
    /// it at a database whose data you want. `--durability` then does not apply.
    #[arg(
        long,
        env = "MIP_BENCH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,

    /// HTTP/2 connections the load is spread over. A few, so the client neither funnels every
    /// call through one socket nor pays for a connection per call.
    #[arg(
        long,
        env = "MIP_BENCH_CONNECTIONS",
        default_value_t = 4,
        global = true
    )]
    connections: usize,

    /// How the load makes CreateCustomer's request ids: `ordered` (UUIDv7, what the API
    /// recommends) or `random` (UUIDv4, which costs CRM a random page write per create).
    #[arg(long, env = "MIP_BENCH_REQUEST_IDS", value_enum, default_value_t = RequestIds::Ordered, global = true)]
    request_ids: RequestIds,

    /// Customers per call in the closed-loop scenarios (ceiling, throughput, unary, memory): 1
    /// sends CreateCustomer, more send BatchCreateCustomers with that many (at most 1000).
    #[arg(long, env = "MIP_BENCH_BATCH", default_value_t = 1, global = true)]
    batch: usize,

    /// Fail a run when deliveries (or watchers) make no progress for this long.
    #[arg(long, env = "MIP_BENCH_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    stall_timeout: Duration,

    /// RUST_LOG of the service processes with --processes (their logs go to files in the
    /// temporary data directory). `info`, the default, is what an operator runs.
    #[arg(
        long,
        env = "MIP_BENCH_SERVICE_LOG",
        default_value = "info",
        global = true
    )]
    service_log: String,

    /// Throughput and unary: run the ceiling's no-op legs (those of --legs; at least bare
    /// tonic) right before and right after, and show every figure as a fraction of the ceiling
    /// (the mean of the two bare-tonic legs). Latency and fanout: the same legs, recorded
    /// beside their figures as the machine's speed in that run.
    #[arg(long, env = "MIP_BENCH_WITH_CEILING", global = true)]
    with_ceiling: bool,

    /// Rounds of the ceiling scenario, each running every leg once [default: 3; 1 with
    /// --smoke].
    #[arg(long, env = "MIP_BENCH_ROUNDS", global = true)]
    rounds: Option<usize>,

    /// The ceiling's legs, comma-separated: tonic (the no-op on bare tonic, always needed),
    /// runtime (the no-op behind runtime::server), metrics, admission, timeout (bare tonic
    /// plus that layer alone), create (CreateCustomer alone), end-to-end (with the
    /// integration service following).
    #[arg(long, env = "MIP_BENCH_LEGS", value_enum, value_delimiter = ',', default_values_t = ceiling::DEFAULT_LEGS, global = true)]
    legs: Vec<Leg>,

    /// Where to write the JSON report [default: target/bench/SCENARIO.json]. With `all`,
    /// the combined report; each scenario also writes its own default file.
    #[arg(long, env = "MIP_BENCH_JSON", global = true)]
    json: Option<PathBuf>,

    /// Short runs for CI: small sizes, short durations, same checks.
    #[arg(long, env = "MIP_BENCH_SMOKE", global = true)]
    smoke: bool,
}

/// Every setting a scenario reads, defaults resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Customers created by the closed-loop scenarios.
    pub customers: usize,
    /// Concurrent creates in the closed-loop scenarios.
    pub concurrency: usize,
    /// Creates per second in the open-loop scenarios.
    pub rate: f64,
    /// How long the open-loop scenarios send.
    pub duration: Duration,
    /// Watchers in fanout.
    pub watchers: usize,
    /// Timed calls per poll-cost batch, at least.
    pub polls: usize,
    /// Services as separate processes.
    pub processes: bool,
    /// The integration service's feed mode.
    pub mode: Mode,
    /// Its poll interval.
    pub poll_interval: Duration,
    /// Its deliveries at once.
    pub max_in_flight: usize,
    /// Every service's durability.
    pub durability: Durability,
    /// PostgreSQL instead of SQLite, if set.
    pub database_url: Option<String>,
    /// Replicas and workers, for a cluster run.
    pub cluster: Option<Cluster>,
    /// HTTP/2 connections for the load.
    pub connections: usize,
    /// CreateCustomer's request ids.
    pub request_ids: RequestIds,
    /// Customers per closed-loop call.
    pub batch: usize,
    /// No progress for this long fails the run.
    pub stall_timeout: Duration,
    /// RUST_LOG of service processes.
    pub service_log: String,
    /// The ceiling's no-op legs around throughput and unary.
    pub with_ceiling: bool,
    /// Rounds of the ceiling scenario.
    pub rounds: usize,
    /// The ceiling's legs.
    pub legs: Vec<Leg>,
    /// Whether this is a smoke run (recorded in the JSON so nobody mistakes it for figures).
    pub smoke: bool,
}

impl Settings {
    fn resolve(flags: &Flags) -> anyhow::Result<Self> {
        let smoke = flags.smoke;
        let settings = Self {
            customers: flags.customers.unwrap_or(if smoke { 300 } else { 100_000 }),
            concurrency: flags.concurrency,
            rate: flags.rate.unwrap_or(if smoke { 150.0 } else { 1000.0 }),
            duration: flags
                .duration
                .unwrap_or(Duration::from_secs(if smoke { 2 } else { 10 })),
            watchers: flags.watchers.unwrap_or(if smoke { 20 } else { 1000 }),
            polls: flags.polls.unwrap_or(if smoke { 50 } else { 2000 }),
            processes: flags.processes,
            mode: flags.mode,
            poll_interval: flags.poll_interval,
            max_in_flight: flags.max_in_flight,
            durability: flags.durability,
            database_url: flags.database_url.clone(),
            cluster: flags.cluster,
            connections: flags.connections,
            request_ids: flags.request_ids,
            batch: flags.batch,
            stall_timeout: flags.stall_timeout,
            service_log: flags.service_log.clone(),
            with_ceiling: flags.with_ceiling,
            rounds: flags.rounds.unwrap_or(if smoke { 1 } else { 3 }),
            legs: flags.legs.clone(),
            smoke,
        };
        anyhow::ensure!(
            settings.cluster.is_none() || settings.database_url.is_some(),
            "--cluster runs the services on one PostgreSQL database: give --database-url too"
        );
        anyhow::ensure!(settings.customers > 0, "--customers must be at least 1");
        anyhow::ensure!(settings.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(settings.watchers > 0, "--watchers must be at least 1");
        anyhow::ensure!(settings.polls > 0, "--polls must be at least 1");
        anyhow::ensure!(
            settings.max_in_flight > 0,
            "--max-in-flight must be at least 1"
        );
        anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
        anyhow::ensure!(settings.rounds > 0, "--rounds must be at least 1");
        anyhow::ensure!(
            !settings.legs.is_empty(),
            "--legs must name at least one leg"
        );
        anyhow::ensure!(
            (1..=1000).contains(&settings.batch),
            "--batch must be 1 to 1000"
        );
        Ok(settings)
    }
}

/// A rate: a positive, finite number per second.
fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{value:?} is not a positive number per second")),
    }
}

/// A duration: plain seconds (`5`, `0.5`) as the issue asks, or humantime (`500ms`, `1m`).
fn parse_seconds(value: &str) -> Result<Duration, String> {
    if let Ok(seconds) = value.parse::<f64>() {
        return if seconds.is_finite() && seconds > 0.0 {
            Ok(Duration::from_secs_f64(seconds))
        } else {
            Err(format!("{value:?} is not a positive number of seconds"))
        };
    }
    humantime::parse_duration(value).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ServeNoop { stack, listen } = cli.command {
        return serve_noop(stack, listen);
    }
    let settings = match Settings::resolve(&cli.flags) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("mip-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg!(debug_assertions) && !settings.smoke {
        eprintln!(
            "mip-bench: note: this is a debug build; its figures are not representative \
             (cargo run --release -p mip-bench -- …)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mip-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        // Dropping `run` on a signal drops the platform, which kills child processes and stops
        // in-process services: no leftovers on Ctrl-C either.
        tokio::select! {
            outcome = run(cli.command, &settings, cli.flags.json.clone()) => outcome,
            signal = interrupted() => Err(anyhow::anyhow!("{signal}; stopped")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("mip-bench: FAILED: a correctness check did not pass (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mip-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mip-bench serve-noop`: the no-op server alone, until stdin closes or a signal.
fn serve_noop(stack: Stack, listen: SocketAddr) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("noop-server")
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                tokio::select! {
                    served = noop::serve_process(stack, listen) => served,
                    _ = interrupted() => Ok(()),
                }
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mip-bench serve-noop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenarios; `Ok(false)` when one ran to the end but a check failed.
async fn run(command: Command, settings: &Settings, json: Option<PathBuf>) -> anyhow::Result<bool> {
    let scenarios: Vec<Scenario> = match command {
        Command::Ceiling => vec![Scenario::Ceiling],
        Command::Throughput => vec![Scenario::Throughput],
        Command::Latency => vec![Scenario::Latency],
        Command::Unary => vec![Scenario::Unary],
        Command::Fanout => vec![Scenario::Fanout],
        Command::Poll => vec![Scenario::Poll],
        Command::Memory => vec![Scenario::Memory],
        Command::PollCost => vec![Scenario::PollCost],
        Command::All => Scenario::ALL.to_vec(),
        Command::ServeNoop { .. } => anyhow::bail!("serve-noop is not a scenario"),
    };
    let single = scenarios.len() == 1;
    let mut reports = Vec::new();
    for scenario in scenarios {
        let report = scenarios::run(scenario, settings)
            .await
            .map_err(|e| e.context(format!("{} scenario", scenario.name())))?;
        report.print();
        let path = match (&json, single) {
            (Some(path), true) => path.clone(),
            _ => report::default_json_path(scenario.name()),
        };
        report::write_json(&path, &report)?;
        println!("  JSON report: {}\n", path.display());
        reports.push(report);
    }
    let passed = reports.iter().all(|r| r.passed);
    if !single {
        let path = json.unwrap_or_else(|| report::default_json_path("all"));
        report::write_json(&path, &report::Combined::new(reports))?;
        println!(
            "all scenarios: {}",
            if passed { "passed" } else { "FAILED" }
        );
        println!("  JSON report: {}", path.display());
    }
    Ok(passed)
}

/// Resolves on Ctrl-C or SIGTERM, with what happened.
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

/// How the load makes request ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RequestIds {
    /// UUIDv7: time-ordered, so CRM's request-id index grows at its end.
    Ordered,
    /// UUIDv4: each create writes a random page of that index.
    Random,
}

impl RequestIds {
    /// A new request id.
    pub fn make(self) -> uuid::Uuid {
        match self {
            Self::Ordered => uuid::Uuid::now_v7(),
            Self::Random => uuid::Uuid::new_v4(),
        }
    }
}

/// The name clap shows for a value, for reports (`auto`, `full`).
pub fn value_name<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// How many processes of each service a cluster run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// CRM replicas.
    pub crm: usize,
    /// Inventory replicas.
    pub inventory: usize,
    /// Integration workers.
    pub workers: usize,
}

/// `C,I,W`, each at least 1.
fn parse_cluster(text: &str) -> Result<Cluster, String> {
    let counts: Vec<usize> = text
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=16).contains(n))
        })
        .collect::<Option<_>>()
        .ok_or("expected three counts from 1 to 16: CRM,INVENTORY,WORKERS, for example 3,2,2")?;
    match counts[..] {
        [crm, inventory, workers] => Ok(Cluster {
            crm,
            inventory,
            workers,
        }),
        _ => Err("expected three counts: CRM,INVENTORY,WORKERS, for example 3,2,2".into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The settings a command line resolves to.
    pub(crate) fn parse(args: &[&str]) -> Settings {
        Settings::resolve(&Cli::try_parse_from(args).expect("parses").flags).expect("resolves")
    }

    #[test]
    fn ceiling_runs_alone_and_first_in_all_and_smoke_makes_it_one_round() {
        let cli = Cli::try_parse_from(["mip-bench", "ceiling"]).unwrap();
        assert_eq!(cli.command, Command::Ceiling);
        let settings = Settings::resolve(&cli.flags).unwrap();
        assert_eq!(settings.rounds, 3);
        assert_eq!(settings.legs, ceiling::DEFAULT_LEGS);
        assert_eq!(Scenario::ALL[0], Scenario::Ceiling);
        assert_eq!(parse(&["mip-bench", "all", "--smoke"]).rounds, 1);
        let legs = parse(&["mip-bench", "ceiling", "--legs", "tonic,metrics,end-to-end"]).legs;
        assert_eq!(legs, [Leg::Tonic, Leg::Metrics, Leg::EndToEnd]);
    }

    #[test]
    fn serve_noop_is_a_hidden_subcommand_with_a_stack_and_an_address() {
        let cli = Cli::try_parse_from(["mip-bench", "serve-noop", "--stack", "runtime"]).unwrap();
        assert_eq!(
            cli.command,
            Command::ServeNoop {
                stack: Stack::Runtime,
                listen: "127.0.0.1:0".parse().unwrap()
            }
        );
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("serve-noop"), "{help}");
    }

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_go_after_the_scenario_and_duration_takes_plain_seconds() {
        let cli = Cli::try_parse_from(["mip-bench", "latency", "--duration", "5", "-r", "200"])
            .expect("parses");
        assert_eq!(cli.command, Command::Latency);
        let settings = Settings::resolve(&cli.flags).unwrap();
        assert_eq!(settings.duration, Duration::from_secs(5));
        assert_eq!(settings.rate, 200.0);
        assert_eq!(settings.customers, 100_000);
    }

    #[test]
    fn smoke_shrinks_only_what_was_not_given() {
        let cli = Cli::try_parse_from(["mip-bench", "all", "--smoke", "-n", "50"]).unwrap();
        let settings = Settings::resolve(&cli.flags).unwrap();
        assert_eq!(settings.customers, 50);
        assert_eq!(settings.watchers, 20);
        assert_eq!(settings.duration, Duration::from_secs(2));
    }

    #[test]
    fn poll_cost_runs_alone_and_as_part_of_all() {
        let cli = Cli::try_parse_from(["mip-bench", "poll-cost", "--polls", "500"]).unwrap();
        assert_eq!(cli.command, Command::PollCost);
        assert_eq!(Settings::resolve(&cli.flags).unwrap().polls, 500);
        assert!(Scenario::ALL.contains(&Scenario::PollCost));
        assert_eq!(Scenario::PollCost.name(), "poll-cost");
        let smoke = Cli::try_parse_from(["mip-bench", "all", "--smoke"]).unwrap();
        assert_eq!(Settings::resolve(&smoke.flags).unwrap().polls, 50);
    }

    #[test]
    fn every_scenario_has_its_own_name_and_runs_once_in_all() {
        let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Scenario::ALL.len());
        for name in names {
            let cli = Cli::try_parse_from(["mip-bench", name]).expect(name);
            assert_ne!(cli.command, Command::All, "{name}");
        }
    }

    #[test]
    fn durations_and_rates_must_be_positive() {
        assert_eq!(parse_seconds("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("nan").is_err());
    }
}
