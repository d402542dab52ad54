//! The platform under test: CRM, Inventory and the integration service on loopback ports and
//! temporary data directories, either in this process (their own `serve` functions on a
//! runtime of their own) or as separate `mip` processes.
//!
//! Either way the load reaches them only through gRPC, so the two deployments are measured
//! through the same client code.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mip_integration::deliver::RandomJitter;
use mip_integration::{IntegrationOptions, Mode};
use mip_proto::integration::v1::{FeedMode, GetStatusRequest};
use mip_runtime::CancellationToken;
use mip_runtime::clock::{SharedClock, SystemClock};
use mip_runtime::server::ServerOptions;
use mip_runtime::sqlite::Durability;
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::load;

/// How long a service gets to report SERVING (a debug build with fsync is slow to start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long in-process services get to stop after their shutdown token is cancelled: their
/// own grace period plus slack.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between two readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// How the platform is run and configured.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Separate `mip` processes instead of in-process `serve` calls.
    pub processes: bool,
    /// The integration service's feed mode.
    pub mode: Mode,
    /// Its poll interval.
    pub poll_interval: Duration,
    /// Its deliveries at once.
    pub max_in_flight: usize,
    /// Every service's durability (SQLite).
    pub durability: Durability,
    /// PostgreSQL for every service instead of SQLite, if set.
    pub database_url: Option<String>,
    /// Several processes per service, on `database_url`.
    pub cluster: Option<crate::Cluster>,
    /// RUST_LOG of the service processes.
    pub service_log: String,
}

/// The running services. Dropping it stops them (kills the processes), so no exit path,
/// error or panic included, leaves anything behind.
pub struct Platform {
    /// CRM's address (the first replica's, in a cluster).
    pub crm: SocketAddr,
    /// Every CRM replica's address (one, outside a cluster).
    pub crm_replicas: Vec<SocketAddr>,
    /// Inventory's address.
    pub inventory: SocketAddr,
    /// The integration service's admin API, once started (the first worker's, in a cluster).
    pub integration: Option<SocketAddr>,
    /// Every Inventory replica's address.
    inventory_replicas: Vec<SocketAddr>,
    /// Every integration worker's admin address, in a cluster.
    workers: Vec<SocketAddr>,
    /// How it was configured; the integration service may start later.
    config: PlatformConfig,
    /// The services themselves.
    services: Services,
    /// Data directories and process logs; declared last so it outlives the services.
    dir: tempfile::TempDir,
}

/// The two ways to run the services.
enum Services {
    /// `serve` tasks on a dedicated runtime.
    InProcess(InProcess),
    /// `mip` child processes.
    Processes(Vec<Process>),
}

impl Platform {
    /// Starts all three services and waits until the integration service follows CRM.
    pub async fn start(config: &PlatformConfig) -> anyhow::Result<Self> {
        let mut platform = Self::start_without_integration(config).await?;
        platform.start_integration().await?;
        Ok(platform)
    }

    /// Starts CRM and Inventory only, so a scenario can measure them without the integration
    /// service competing for the CPU; [`Platform::start_integration`] adds it later.
    pub async fn start_without_integration(config: &PlatformConfig) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mip-bench-")
            .tempdir()
            .context("temporary data directory")?;
        if let Some(url) = &config.database_url {
            empty_schemas(url).await?;
        }
        let mut crm_replicas = Vec::new();
        let mut inventory_replicas = Vec::new();
        let (crm, inventory, services) = if let Some(cluster) = config.cluster {
            let mip = mip_binary()?;
            let mut processes = Vec::new();
            for (name, count, addrs) in [
                ("crm", cluster.crm, &mut crm_replicas),
                ("inventory", cluster.inventory, &mut inventory_replicas),
            ] {
                for replica in 0..count {
                    let addr = free_addr()?;
                    processes.push(Process::spawn(
                        &mip,
                        name,
                        &format!("{name}-{replica}"),
                        &service_args(name, addr, dir.path(), config),
                        dir.path(),
                        &config.service_log,
                    )?);
                    addrs.push(addr);
                }
            }
            (
                crm_replicas[0],
                inventory_replicas[0],
                Services::Processes(processes),
            )
        } else if config.processes {
            let mip = mip_binary()?;
            let (crm, inventory) = (free_addr()?, free_addr()?);
            let crm_process = Process::spawn(
                &mip,
                "crm",
                "crm",
                &service_args("crm", crm, dir.path(), config),
                dir.path(),
                &config.service_log,
            )?;
            let inventory_process = Process::spawn(
                &mip,
                "inventory",
                "inventory",
                &service_args("inventory", inventory, dir.path(), config),
                dir.path(),
                &config.service_log,
            )?;
            (
                crm,
                inventory,
                Services::Processes(vec![crm_process, inventory_process]),
            )
        } else {
            let mut in_process = InProcess::new()?;
            let crm = in_process.start_crm(database(config, &dir.path().join("crm"))?)?;
            let inventory =
                in_process.start_inventory(database(config, &dir.path().join("inventory"))?)?;
            (crm, inventory, Services::InProcess(in_process))
        };
        if crm_replicas.is_empty() {
            crm_replicas.push(crm);
            inventory_replicas.push(inventory);
        }
        let mut platform = Self {
            crm,
            crm_replicas: crm_replicas.clone(),
            inventory_replicas: inventory_replicas.clone(),
            workers: Vec::new(),
            inventory,
            integration: None,
            config: config.clone(),
            services,
            dir,
        };
        for addr in crm_replicas {
            platform.wait_serving("CRM", addr).await?;
        }
        for addr in inventory_replicas {
            platform.wait_serving("Inventory", addr).await?;
        }
        Ok(platform)
    }

    /// Starts the integration service and waits until it reads CRM's feed (a stream is open,
    /// or it polls in poll mode), so no scenario times its start-up.
    pub async fn start_integration(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.integration.is_none(),
            "the integration service already runs"
        );
        let joined = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let options = IntegrationOptions {
            crm_addr: joined(&self.crm_replicas),
            inventory_addr: joined(&self.inventory_replicas),
            mode: self.config.mode,
            poll_interval: self.config.poll_interval,
            max_in_flight: self.config.max_in_flight,
            ..IntegrationOptions::default()
        };
        let dir = self.dir.path().join("integration");
        if let Some(cluster) = self.config.cluster {
            let mip = mip_binary()?;
            for worker in 0..cluster.workers {
                let addr = free_addr()?;
                let mut args = service_args("integration", addr, self.dir.path(), &self.config);
                args.extend(integration_flags(&options));
                let process = Process::spawn(
                    &mip,
                    "integration",
                    &format!("integration-{worker}"),
                    &args,
                    self.dir.path(),
                    &self.config.service_log,
                )?;
                if let Services::Processes(processes) = &mut self.services {
                    processes.push(process);
                }
                self.workers.push(addr);
            }
            self.integration = self.workers.first().copied();
            for addr in self.workers.clone() {
                self.wait_serving("integration worker", addr).await?;
                self.wait_following(addr).await?;
            }
            return Ok(());
        }
        let addr = match &mut self.services {
            Services::Processes(processes) => {
                let addr = free_addr()?;
                let mut args = service_args("integration", addr, self.dir.path(), &self.config);
                args.extend(integration_flags(&options));
                processes.push(Process::spawn(
                    &mip_binary()?,
                    "integration",
                    "integration",
                    &args,
                    self.dir.path(),
                    &self.config.service_log,
                )?);
                addr
            }
            Services::InProcess(in_process) => {
                in_process.start_integration(database(&self.config, &dir)?, options)?
            }
        };
        self.integration = Some(addr);
        self.wait_serving("integration service", addr).await?;
        self.wait_following(addr).await
    }

    /// Every integration worker's admin address: the cluster's workers, or the one service.
    pub fn integration_addrs(&self) -> Vec<SocketAddr> {
        if self.workers.is_empty() {
            self.integration.into_iter().collect()
        } else {
            self.workers.clone()
        }
    }

    /// The service processes' names and ids (none when in-process).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        match &self.services {
            Services::Processes(processes) => {
                processes.iter().map(|p| (p.name, p.child.id())).collect()
            }
            Services::InProcess(_) => Vec::new(),
        }
    }

    /// Stops every service; fails if one had already died or stopped with an error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match &mut self.services {
            Services::Processes(processes) => {
                let mut died = Vec::new();
                for process in processes.iter_mut() {
                    if let Some(status) = process.child.try_wait()? {
                        died.push(format!(
                            "{} exited during the run ({status}); last lines of its log:\n{}",
                            process.name,
                            process.log_tail(20)
                        ));
                    }
                }
                // Killing is enough: the data directories are thrown away with the run.
                processes.clear();
                if !died.is_empty() {
                    bail!("{}", died.join("\n"));
                }
                Ok(())
            }
            Services::InProcess(in_process) => in_process.stop().await,
        }
    }

    /// Polls the standard health check until SERVING, failing early if the service died.
    async fn wait_serving(&mut self, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive().await?;
            let probe = mip_runtime::probe::check(
                &addr.to_string(),
                "",
                Duration::from_secs(1),
                &Default::default(),
            )
            .await;
            if matches!(probe, Ok(ServingStatus::Serving)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name} at {addr} is not SERVING after {START_TIMEOUT:?}: {probe:?}");
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Waits until the integration service reads the feed the configured way.
    async fn wait_following(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let mut client = load::integration_client(addr).await?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive().await?;
            let status = client.get_status(GetStatusRequest {}).await?.into_inner();
            let following = match self.config.mode {
                Mode::Poll => status.mode() == FeedMode::Poll,
                Mode::Stream | Mode::Auto => status.stream_connected,
            };
            if following {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the integration service does not follow CRM after {START_TIMEOUT:?}: {status:?}"
                );
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Fails if a service has already stopped.
    async fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.services {
            Services::Processes(processes) => {
                for process in processes {
                    if let Some(status) = process.child.try_wait()? {
                        bail!(
                            "{} exited ({status}); last lines of its log:\n{}",
                            process.name,
                            process.log_tail(20)
                        );
                    }
                }
                Ok(())
            }
            Services::InProcess(in_process) => in_process.check_alive().await,
        }
    }
}

/// Services running in this process, on their own runtime: the load generator's tasks then
/// do not queue behind the services' on the same workers, as with separate processes.
struct InProcess {
    /// The services' runtime; `None` once shut down.
    runtime: Option<Runtime>,
    /// Cancelling it stops every service gracefully.
    shutdown: CancellationToken,
    /// Each service's `serve` task, by name.
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

impl InProcess {
    fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("platform")
            .build()
            .context("the services' runtime")?;
        Ok(Self {
            runtime: Some(runtime),
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("runtime runs until stop")
    }

    /// Binds `127.0.0.1:0` here (so the address is known at once) and hands the socket to a
    /// task on the services' runtime, whose reactor must own it.
    fn spawn<F, Fut, E>(&mut self, name: &'static str, serve: F) -> anyhow::Result<SocketAddr>
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = StdListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let task = self.runtime().spawn(async move {
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            serve(listener).await.map_err(|e| e.to_string())
        });
        self.tasks.push((name, task));
        Ok(addr)
    }

    fn start_crm(&mut self, database: Database) -> anyhow::Result<SocketAddr> {
        let token = self.shutdown.clone();
        self.spawn("CRM", move |listener| async move {
            mip_crm::serve(
                listener,
                &database,
                mip_crm::CrmOptions::default(),
                &ServerOptions::default(),
                clock(),
                token,
            )
            .await
        })
    }

    fn start_inventory(&mut self, database: Database) -> anyhow::Result<SocketAddr> {
        let token = self.shutdown.clone();
        self.spawn("Inventory", move |listener| async move {
            mip_inventory::serve(
                listener,
                &database,
                &ServerOptions::default(),
                clock(),
                token,
            )
            .await
        })
    }

    fn start_integration(
        &mut self,
        database: Database,
        options: IntegrationOptions,
    ) -> anyhow::Result<SocketAddr> {
        let token = self.shutdown.clone();
        self.spawn("integration service", move |listener| async move {
            mip_integration::serve(
                listener,
                &database,
                options,
                &ServerOptions::default(),
                clock(),
                Arc::new(RandomJitter),
                token,
            )
            .await
        })
    }

    /// Fails with the service's error if its `serve` has returned.
    async fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(index) = self.tasks.iter().position(|(_, t)| t.is_finished()) {
            let (name, task) = self.tasks.remove(index);
            match task.await {
                Ok(Ok(())) => bail!("{name} stopped by itself"),
                Ok(Err(e)) => bail!("{name} failed: {e}"),
                Err(e) => bail!("{name} panicked: {e}"),
            }
        }
        Ok(())
    }

    /// Graceful stop: cancel, wait for every `serve` to return, then drop the runtime.
    async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let mut failures = Vec::new();
        for (name, task) in self.tasks.drain(..) {
            match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failures.push(format!("{name} failed: {e}")),
                Ok(Err(e)) => failures.push(format!("{name} panicked: {e}")),
                Err(_) => failures.push(format!("{name} did not stop in {STOP_TIMEOUT:?}")),
            }
        }
        if let Some(runtime) = self.runtime.take() {
            // Not a plain drop: dropping a runtime blocks, which a runtime thread (this code's)
            // must not do. Every service has returned; only idle threads remain.
            runtime.shutdown_background();
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("{}", failures.join("; "))
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The wall clock every in-process service runs on.
fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A running `mip` child process. Dropping it kills and reaps it.
struct Process {
    /// `crm`, `inventory` or `integration`.
    name: &'static str,
    /// The process.
    child: Child,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Process {
    /// Starts `mip <args>`, its output going to `<log_dir>/<log_name>.log`.
    fn spawn(
        mip: &Path,
        name: &'static str,
        log_name: &str,
        args: &[String],
        log_dir: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{log_name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("log file {}", log.display()))?;
        let mut command = Command::new(mip);
        command
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // The children get their settings from flags only: a MIP_* variable left in the
        // environment (a metrics address, say) would change or break every one of them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MIP_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {} {name}", mip.display()))?;
        Ok(Self { name, child, log })
    }

    /// The last lines of its log, for error messages.
    fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = File::open(&self.log) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL and reap: nothing of a benchmark's throw-away data needs a graceful stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `mip` binary built next to this one (`target/<profile>/mip`).
fn mip_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("mip");
    if !path.is_file() {
        let profile = if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        };
        bail!(
            "{} not found; separate processes need the mip binary next to mip-bench: \
             cargo build{profile} -p mip",
            path.display()
        );
    }
    Ok(path)
}

/// The flags every service process gets: where to listen, where its data goes, durability.
fn service_args(
    command: &str,
    addr: SocketAddr,
    root: &Path,
    config: &PlatformConfig,
) -> Vec<String> {
    let mut args = vec![command.to_owned(), "--listen".to_owned(), addr.to_string()];
    match &config.database_url {
        Some(url) => args.extend(["--database-url".to_owned(), url.clone()]),
        None => args.extend([
            "--data-dir".to_owned(),
            root.join(command).display().to_string(),
            "--durability".to_owned(),
            crate::value_name(&config.durability),
        ]),
    }
    args
}

/// The integration service's own flags, as a process gets them.
fn integration_flags(options: &IntegrationOptions) -> Vec<String> {
    vec![
        "--crm-addr".to_owned(),
        options.crm_addr.clone(),
        "--inventory-addr".to_owned(),
        options.inventory_addr.clone(),
        "--mode".to_owned(),
        crate::value_name(&options.mode),
        "--poll-interval".to_owned(),
        humantime::format_duration(options.poll_interval).to_string(),
        "--max-in-flight".to_owned(),
        options.max_in_flight.to_string(),
    ]
}

/// Where an in-process service keeps its tables: `dir`, or the PostgreSQL database.
fn database(config: &PlatformConfig, dir: &Path) -> anyhow::Result<Database> {
    Ok(match &config.database_url {
        Some(url) => Database::from_url(url, mip_runtime::store::DEFAULT_POOL_SIZE)?,
        None => Database::Sqlite {
            dir: dir.to_owned(),
            durability: config.durability,
        },
    })
}

/// Drops the services' schemas, so that each run starts from an empty log, no packages and no
/// checkpoint, as it does with fresh SQLite files.
async fn empty_schemas(url: &str) -> anyhow::Result<()> {
    let options = mip_runtime::postgres::PgOptions::parse(url, 2)?;
    let pg = mip_runtime::postgres::Pg::new(&options, "mip-bench")?;
    let client = pg.client().await?;
    client
        .batch_execute(
            "DROP SCHEMA IF EXISTS crm CASCADE;
             DROP SCHEMA IF EXISTS inventory CASCADE;
             DROP SCHEMA IF EXISTS integration CASCADE;",
        )
        .await
        .with_context(|| format!("cannot empty the schemas of {}", options.name()))?;
    Ok(())
}

/// A loopback address nothing listens on right now: bind an ephemeral port, read it, let it go
/// for the child to bind.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}
