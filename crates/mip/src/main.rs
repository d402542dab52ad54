//! `mip`: runs the Mini Integration Platform's services, together or one at a time, and probes
//! their health. Everything here is flag parsing and wiring; the services live in their crates.
#![forbid(unsafe_code)]

mod certs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mip_integration::deliver::RandomJitter;
use mip_runtime::CancellationToken;
use mip_runtime::clock::{SharedClock, SystemClock};
use mip_runtime::probe::ProbeError;
use mip_runtime::security::Security;
use mip_runtime::server::{ServerOptions, bind};
use mip_runtime::store::{Database, StoreOptions};
use mip_runtime::telemetry::{self, LogFormat};
use tokio::net::TcpListener;
use tonic_health::pb::health_check_response::ServingStatus;
use tracing::{error, info};

/// mimalloc instead of the system allocator: glibc's `malloc` and `free` took about 12% of the
/// CPU in a throughput profile (TECHNICAL_DESIGN.md, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Mini Integration Platform: every customer created in CRM gets exactly one welcome package
/// request in Inventory.
#[derive(Debug, Parser)]
#[command(name = "mip", version, about, long_about = None)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "MIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9090). Off when
    /// unset.
    #[arg(long, env = "MIP_METRICS_ADDR", global = true)]
    metrics_addr: Option<SocketAddr>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CRM, Inventory and the integration service in one process.
    All(AllArgs),
    /// Run the CRM service alone.
    Crm(CrmArgs),
    /// Run the Inventory service alone.
    Inventory(InventoryArgs),
    /// Run the integration service alone (it calls CRM and Inventory at --crm-addr and
    /// --inventory-addr).
    Integration(IntegrationArgs),
    /// Ask a server for its health; exit 0 if SERVING, 1 if not, 2 if it cannot be asked.
    Health(HealthArgs),
    /// Write a development CA, server and client certificates and a token, to try TLS, mutual
    /// TLS and token authentication. Not for production.
    DevCerts(certs::DevCertsArgs),
}

#[derive(Debug, clap::Args)]
struct AllArgs {
    /// Address of the CRM service.
    #[arg(long, env = "MIP_CRM_LISTEN", default_value = "127.0.0.1:50051")]
    crm_listen: SocketAddr,

    /// Address of the Inventory service.
    #[arg(long, env = "MIP_INVENTORY_LISTEN", default_value = "127.0.0.1:50052")]
    inventory_listen: SocketAddr,

    /// Address of the integration service's admin API.
    #[arg(
        long,
        env = "MIP_INTEGRATION_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    integration_listen: SocketAddr,

    #[command(flatten)]
    store: StoreOptions,

    #[command(flatten)]
    crm: mip_crm::CrmOptions,

    #[command(flatten)]
    integration: mip_integration::IntegrationOptions,

    #[command(flatten)]
    server: ServerOptions,
}

#[derive(Debug, clap::Args)]
struct CrmArgs {
    /// Address to serve on.
    #[arg(long, env = "MIP_CRM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    #[command(flatten)]
    store: StoreOptions,

    #[command(flatten)]
    crm: mip_crm::CrmOptions,

    #[command(flatten)]
    server: ServerOptions,
}

#[derive(Debug, clap::Args)]
struct InventoryArgs {
    /// Address to serve on.
    #[arg(long, env = "MIP_INVENTORY_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,

    #[command(flatten)]
    store: StoreOptions,

    #[command(flatten)]
    server: ServerOptions,
}

#[derive(Debug, clap::Args)]
struct IntegrationArgs {
    /// Address of the admin API.
    #[arg(
        long,
        env = "MIP_INTEGRATION_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    listen: SocketAddr,

    #[command(flatten)]
    store: StoreOptions,

    #[command(flatten)]
    integration: mip_integration::IntegrationOptions,

    #[command(flatten)]
    server: ServerOptions,
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// Server to ask, as HOST:PORT.
    #[arg(long, env = "MIP_HEALTH_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,

    /// Service to ask about, for example `crm.v1.CrmService`. Empty: the server as a whole.
    #[arg(long, env = "MIP_HEALTH_SERVICE", default_value = "")]
    service: String,

    /// How long to wait for an answer.
    #[arg(long, env = "MIP_HEALTH_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// PEM CA certificates to verify a TLS server with. Turns TLS on.
    #[arg(long, env = "MIP_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a server that requires mutual TLS.
    #[arg(long, env = "MIP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MIP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    if let Command::DevCerts(args) = &cli.command {
        return match certs::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mip dev-certs: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mip: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Health(args) => health(args).await,
            command => match run(command, cli.metrics_addr).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report_failure(&e);
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// Says why `mip` stopped, once: as a log line where logging shows errors (so a JSON log
/// stays one object per line), else as a plain line on stderr, so it is never silent.
fn report_failure(error: &anyhow::Error) {
    let message = one_line(error);
    if tracing::enabled!(tracing::Level::ERROR) {
        error!("{message}");
    } else {
        eprintln!("mip: {message}");
    }
}

/// An error and its causes on one line, leaving out a cause whose words the line already
/// has: many errors quote their cause in their own message, and `{:#}` would repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Cancels the returned token on the first ctrl-c or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    // Installed here, not in the task: a SIGTERM sent as soon as the service says it serves
    // must drain it, not kill it before the task has first run.
    let signal = signal_received();
    tokio::spawn(async move {
        signal.await;
        info!("shutdown requested: draining");
        trigger.cancel();
    });
    token
}

/// Resolves on the first ctrl-c or SIGTERM. The handlers are installed when this is called
/// (`tokio::signal::ctrl_c` would install its own only when first polled).
#[cfg(unix)]
fn signal_received() -> impl Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(signal: std::io::Result<Signal>) {
        match signal {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Not installable: this signal cannot stop the server; the other still can.
            Err(_) => std::future::pending().await,
        }
    }
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        tokio::select! {
            () = received(interrupt) => {}
            () = received(terminate) => {}
        }
    }
}

#[cfg(not(unix))]
fn signal_received() -> impl Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Where a neighbour in this process can be called: a listener on every interface (0.0.0.0,
/// as in the container image) is called on loopback, which the certificates `mip dev-certs`
/// makes also name; `https://0.0.0.0` would match no certificate.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

async fn run(command: Command, metrics_addr: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = metrics_addr {
        mip_runtime::metrics::install(addr)
            .with_context(|| format!("cannot serve metrics on {addr} (--metrics-addr)"))?;
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let shutdown = shutdown_on_signal();
    match command {
        Command::All(mut args) => {
            let security = &args.server.security;
            anyhow::ensure!(
                security.tls_cert.is_none() || security.tls_ca.is_some(),
                "with --tls-cert, `mip all` also needs --tls-ca (the CA that signed the \
                 certificate), so that the integration service can verify CRM and Inventory"
            );
            // A bad --database-url is reported before anything listens.
            let database = args.store.database()?;
            let crm_listener = bind(args.crm_listen, "--crm-listen").await?;
            let inventory_listener = bind(args.inventory_listen, "--inventory-listen").await?;
            let integration_listener =
                bind(args.integration_listen, "--integration-listen").await?;
            // In one process the integration service talks to its neighbours where they
            // listen: the bound addresses, not the requested ones (port 0 picks a free port).
            args.integration.crm_addr = reachable(crm_listener.local_addr()?).to_string();
            args.integration.inventory_addr =
                reachable(inventory_listener.local_addr()?).to_string();
            // If one service fails, stop the others instead of limping along half-up.
            let stop_all = |result: anyhow::Result<()>| {
                if result.is_err() {
                    shutdown.cancel();
                }
                result
            };
            let (crm, inventory, integration) = tokio::join!(
                async {
                    stop_all(
                        run_crm(crm_listener, &database, args.crm, &args.server, &shutdown).await,
                    )
                },
                async {
                    stop_all(
                        run_inventory(inventory_listener, &database, &args.server, &shutdown).await,
                    )
                },
                async {
                    stop_all(
                        run_integration(
                            integration_listener,
                            &database,
                            args.integration,
                            &args.server,
                            &shutdown,
                        )
                        .await,
                    )
                },
            );
            crm.and(inventory).and(integration)
        }
        Command::Crm(args) => {
            let database = args.store.database()?;
            let listener = bind(args.listen, "--listen").await?;
            run_crm(listener, &database, args.crm, &args.server, &shutdown).await
        }
        Command::Inventory(args) => {
            let database = args.store.database()?;
            let listener = bind(args.listen, "--listen").await?;
            run_inventory(listener, &database, &args.server, &shutdown).await
        }
        Command::Integration(args) => {
            let database = args.store.database()?;
            let listener = bind(args.listen, "--listen").await?;
            run_integration(
                listener,
                &database,
                args.integration,
                &args.server,
                &shutdown,
            )
            .await
        }
        Command::Health(_) | Command::DevCerts(_) => unreachable!("handled in main"),
    }
}

async fn run_crm(
    listener: TcpListener,
    database: &Database,
    options: mip_crm::CrmOptions,
    server: &ServerOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    announce(
        "CRM",
        listener.local_addr()?,
        "crm.v1.CrmService/ListCustomers",
        server,
    );
    mip_crm::serve(
        listener,
        database,
        options,
        server,
        clock(),
        shutdown.clone(),
    )
    .await
    .context("CRM")
}

async fn run_inventory(
    listener: TcpListener,
    database: &Database,
    server: &ServerOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    announce(
        "Inventory",
        listener.local_addr()?,
        "inventory.v1.InventoryService/ListPackageRequests",
        server,
    );
    mip_inventory::serve(listener, database, server, clock(), shutdown.clone())
        .await
        .context("Inventory")
}

async fn run_integration(
    listener: TcpListener,
    database: &Database,
    options: mip_integration::IntegrationOptions,
    server: &ServerOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    announce(
        "Integration",
        listener.local_addr()?,
        "integration.v1.IntegrationService/GetStatus",
        server,
    );
    mip_integration::serve(
        listener,
        database,
        options,
        server,
        clock(),
        Arc::new(RandomJitter),
        shutdown.clone(),
    )
    .await
    .context("integration service")
}

/// Logs where a service listens, with a grpcurl line that works against it as configured
/// (placeholders for files and the token, which are never logged).
fn announce(name: &str, addr: SocketAddr, example: &str, server: &ServerOptions) {
    let security = &server.security;
    let mut flags = Vec::new();
    if security.tls_cert.is_none() {
        flags.push("-plaintext");
    } else {
        flags.push("-cacert <ca.pem>");
        if security.tls_client_ca.is_some() {
            flags.push("-cert <client.pem> -key <client-key.pem>");
        }
    }
    if security.auth_token.is_some() || security.auth_token_file.is_some() {
        flags.push("-H 'authorization: Bearer <token>'");
    }
    let flags = flags.join(" ");
    info!(%addr, "{name} listening; try: grpcurl {flags} -d '{{}}' {addr} {example}");
}

/// Exit codes: 0 SERVING, 1 answered but not SERVING, 2 could not ask.
async fn health(args: HealthArgs) -> ExitCode {
    let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
    let security = match Security::client(args.tls_ca.as_deref(), identity) {
        Ok(security) => security,
        Err(e) => {
            eprintln!("mip health: {e}");
            return ExitCode::from(2);
        }
    };
    match mip_runtime::probe::check(&args.addr, &args.service, args.timeout, &security).await {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::from(1)
        }
        Err(e) => {
            // A plain-text probe of a TLS server connects, then fails on the first call.
            let plaintext_to_tls = matches!(e, ProbeError::Rpc(_)) && args.tls_ca.is_none();
            let hint = if plaintext_to_tls {
                " (if the server uses TLS, pass --tls-ca, and --tls-cert/--tls-key for mutual TLS)"
            } else {
                ""
            };
            eprintln!("mip health: {e}{hint}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{one_line, reachable};

    #[test]
    fn a_failure_line_names_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        // A cause quoted in its parent's message, as `#[error("…: {0}")]` with `#[from]` does.
        let quoted = anyhow::Error::new(io).context("cannot open crm.db: disk on fire");
        assert_eq!(one_line(&quoted), "cannot open crm.db: disk on fire");
        let io = std::io::Error::other("disk on fire");
        let separate = anyhow::Error::new(io)
            .context("cannot open crm.db")
            .context("CRM");
        assert_eq!(one_line(&separate), "CRM: cannot open crm.db: disk on fire");
    }

    #[test]
    fn neighbours_listening_everywhere_are_called_on_loopback() {
        let cases = [
            ("0.0.0.0:50051", "127.0.0.1:50051"),
            ("[::]:50052", "[::1]:50052"),
            ("127.0.0.1:50053", "127.0.0.1:50053"),
            ("10.1.2.3:50051", "10.1.2.3:50051"),
        ];
        for (listen, called) in cases {
            assert_eq!(reachable(listen.parse().unwrap()).to_string(), called);
        }
    }
}
