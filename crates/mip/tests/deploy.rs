//! The container deployment, checked without a container engine: `docker-compose.yml` and the
//! `Dockerfile` are read as files and held against the real `mip` binary. Every subcommand,
//! environment variable and health-check flag they use must be one `mip` documents in its
//! `--help`, ports and addresses must agree across services, and each service must start from
//! its compose environment (moved to loopback) and pass its own health check. The optional
//! `monitoring` profile is held against `deploy/prometheus`: Prometheus scrapes each service
//! where compose makes it serve metrics, and loads the alert rules from the directory it
//! mounts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Process, free_port, run_mip};
use serde_norway::{Mapping, Value};

/// The compose services, each with the `mip` subcommand it must run, the gRPC name of the
/// service it hosts, and the variable holding its listen address.
const SERVICES: [Expected; 3] = [
    Expected {
        name: "crm",
        grpc_name: mip_crm::SERVICE_NAME,
        listen_var: "MIP_CRM_LISTEN",
    },
    Expected {
        name: "inventory",
        grpc_name: mip_inventory::SERVICE_NAME,
        listen_var: "MIP_INVENTORY_LISTEN",
    },
    Expected {
        name: "integration",
        grpc_name: mip_integration::SERVICE_NAME,
        listen_var: "MIP_INTEGRATION_LISTEN",
    },
];

/// The ports the README and the compose file promise: CRM, Inventory, integration.
const PORTS: std::ops::RangeInclusive<u16> = 50051..=50053;

/// How long a service gets to pass its health check; generous, so a slow machine never fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between two looks at a condition that is not true yet.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// The environment variable of the metrics address (`--metrics-addr`).
const METRICS_VAR: &str = "MIP_METRICS_ADDR";

/// The compose profile that adds Prometheus.
const MONITORING: &str = "monitoring";

/// Where the Prometheus configuration and alert rules live in the checkout.
const PROMETHEUS_DIR: &str = "deploy/prometheus";

/// What one compose service must be.
struct Expected {
    /// Compose service name, also the `mip` subcommand.
    name: &'static str,
    /// Fully-qualified gRPC name its health check asks about.
    grpc_name: &'static str,
    /// Environment variable of its listen address.
    listen_var: &'static str,
}

// ---------------------------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------------------------

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name)
}

fn read(name: &str) -> String {
    let path = repo_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `docker-compose.yml`'s `services`, by name.
fn compose_services() -> BTreeMap<String, Mapping> {
    compose_file_services("docker-compose.yml")
}

/// The services plain `docker compose up` starts: those outside every profile.
fn default_services() -> BTreeMap<String, Mapping> {
    compose_services()
        .into_iter()
        .filter(|(_, service)| !service.contains_key("profiles"))
        .collect()
}

/// `docker-compose.yml` with `docker-compose.secure.yml` on top, merged the way compose merges
/// files: `environment` and `depends_on` by key, `volumes` appended, anything else replaced.
fn secure_compose_services() -> BTreeMap<String, Mapping> {
    let mut services = compose_services();
    for (name, overlay) in compose_file_services("docker-compose.secure.yml") {
        let service = services.entry(name).or_default();
        for (key, value) in overlay {
            match (key.as_str(), service.get_mut(&key), value) {
                (
                    Some("environment" | "depends_on"),
                    Some(Value::Mapping(base)),
                    Value::Mapping(more),
                ) => {
                    base.extend(more);
                }
                (Some("volumes"), Some(Value::Sequence(base)), Value::Sequence(more)) => {
                    base.extend(more);
                }
                (_, _, value) => {
                    service.insert(key, value);
                }
            }
        }
    }
    services
}

/// One compose file's `services`, by name.
fn compose_file_services(file: &str) -> BTreeMap<String, Mapping> {
    let mut compose: Value = serde_norway::from_str(&read(file)).expect("valid YAML");
    // Compose resolves `<<: *anchor` merge keys; so must the reading.
    compose.apply_merge().expect("valid merge keys");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("a `services` mapping");
    services
        .iter()
        .map(|(name, service)| {
            let name = name.as_str().expect("service names are strings").to_owned();
            let service = service
                .as_mapping()
                .unwrap_or_else(|| panic!("service {name} is a mapping"))
                .clone();
            (name, service)
        })
        .collect()
}

/// The top-level `volumes` names.
fn compose_volumes() -> BTreeSet<String> {
    let compose: Value = serde_norway::from_str(&read("docker-compose.yml")).expect("valid YAML");
    compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|volumes| {
            volumes
                .keys()
                .map(|k| k.as_str().expect("volume names are strings").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn service<'a>(services: &'a BTreeMap<String, Mapping>, name: &str) -> &'a Mapping {
    services
        .get(name)
        .unwrap_or_else(|| panic!("compose has no service {name}"))
}

/// The top-level `volumes` names of `docker-compose.cluster.yml`.
fn cluster_volumes() -> BTreeSet<String> {
    let compose: Value =
        serde_norway::from_str(&read("docker-compose.cluster.yml")).expect("valid YAML");
    compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|volumes| volumes.keys().map(scalar).collect())
        .unwrap_or_default()
}

/// A scalar as compose reads it: strings, numbers and booleans all become strings.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// A string or a list of strings (compose's `command` and `healthcheck.test`), as a list.
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Sequence(items) => items.iter().map(scalar).collect(),
        other => panic!("expected a string or a list, found {other:?}"),
    }
}

/// A service's `command`.
fn command(service: &Mapping) -> Vec<String> {
    words(service.get("command").expect("a `command`"))
}

/// A service's `environment`, in either of compose's forms (mapping, or `KEY=VALUE` list).
fn environment(service: &Mapping) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(vars)) => vars
            .iter()
            .map(|(k, v)| {
                (
                    scalar(k),
                    if v.is_null() {
                        String::new()
                    } else {
                        scalar(v)
                    },
                )
            })
            .collect(),
        Some(Value::Sequence(vars)) => vars
            .iter()
            .map(|entry| {
                let entry = scalar(entry);
                let (k, v) = entry.split_once('=').unwrap_or((&entry, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("`environment` is a mapping or a list, not {other:?}"),
    }
}

/// A service's published ports as (host port, container port), from the short syntax
/// (`[IP:]HOST:CONTAINER[/PROTO]`) or the long one (`target`, `published`).
fn ports(service: &Mapping) -> Vec<(Option<u16>, u16)> {
    let Some(ports) = service.get("ports") else {
        return Vec::new();
    };
    let port = |s: &str| -> u16 {
        s.parse()
            .unwrap_or_else(|_| panic!("{s:?} is a single port number"))
    };
    ports
        .as_sequence()
        .expect("`ports` is a list")
        .iter()
        .map(|entry| match entry {
            Value::Mapping(long) => (
                long.get("published").map(|p| port(&scalar(p))),
                port(&scalar(long.get("target").expect("a port `target`"))),
            ),
            short => {
                let short = scalar(short);
                let short = short.split('/').next().unwrap_or_default();
                let parts: Vec<&str> = short.rsplitn(3, ':').collect();
                match parts.as_slice() {
                    [container] => (None, port(container)),
                    [container, host, ..] => (Some(port(host)), port(container)),
                    [] => unreachable!("rsplitn yields at least one part"),
                }
            }
        })
        .collect()
}

/// A service's volumes as (source, target), from the short (`SOURCE:TARGET[:MODE]`) or long
/// syntax.
fn volumes(service: &Mapping) -> Vec<(String, String)> {
    let Some(volumes) = service.get("volumes") else {
        return Vec::new();
    };
    volumes
        .as_sequence()
        .expect("`volumes` is a list")
        .iter()
        .map(|entry| match entry {
            Value::Mapping(long) => (
                long.get("source").map(scalar).unwrap_or_default(),
                scalar(long.get("target").expect("a volume `target`")),
            ),
            short => {
                let short = scalar(short);
                let mut parts = short.split(':');
                match (parts.next(), parts.next()) {
                    (Some(source), Some(target)) => (source.to_owned(), target.to_owned()),
                    _ => (String::new(), short.clone()),
                }
            }
        })
        .collect()
}

/// The `--flag value` and `--flag=value` pairs of an argument list.
fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut flags = BTreeMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let flag = arg
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("{arg:?} in {args:?} is not a --flag"));
        match flag.split_once('=') {
            Some((name, value)) => flags.insert(name.to_owned(), value.to_owned()),
            None => flags.insert(
                flag.to_owned(),
                args.next()
                    .unwrap_or_else(|| panic!("--{flag} has a value"))
                    .clone(),
            ),
        };
    }
    flags
}

/// Splits `HOST:PORT` (optionally `http://HOST:PORT`) into host and port.
fn host_port(addr: &str) -> (String, u16) {
    let addr = addr.strip_prefix("http://").unwrap_or(addr);
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr:?} is HOST:PORT"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("{addr:?} has a numeric port"));
    (host.to_owned(), port)
}

/// One Dockerfile instruction: the keyword (upper case) and the rest of the line.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's stages (each starting with its `FROM`), with continuations joined and
/// comments dropped.
fn dockerfile_stages() -> Vec<Vec<Instruction>> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let instruction = Instruction {
            keyword: keyword.to_uppercase(),
            args: args.trim().to_owned(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

/// An instruction's arguments in exec form (`["a", "b"]`) or shell form, as words.
fn exec_form(args: &str) -> Vec<String> {
    match serde_json::from_str::<Vec<String>>(args) {
        Ok(words) => words,
        Err(_) => args.split_whitespace().map(str::to_owned).collect(),
    }
}

/// `ENV` variables set in a stage (`KEY=VALUE ...` or the legacy `KEY VALUE`).
fn env_of(stage: &[Instruction]) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for env in stage.iter().filter(|i| i.keyword == "ENV") {
        if env.args.contains('=') {
            for pair in env.args.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("KEY=VALUE");
                vars.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        } else {
            let (k, v) = env.args.split_once(' ').expect("KEY VALUE");
            vars.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    vars
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// `mip <subcommand> --help`, which must succeed.
fn help(subcommand: &[String]) -> String {
    let mut args = subcommand.to_vec();
    args.push("--help".to_owned());
    let (status, stdout) = run_mip(&args, &BTreeMap::new());
    assert!(
        status.success(),
        "`mip {}` failed ({status}): is it a real subcommand with real flags?",
        args.join(" ")
    );
    stdout
}

/// The environment variables a `--help` text documents (clap prints `[env: NAME=...]`).
fn documented_env(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(at, marker)| {
            let rest = &help[at + marker.len()..];
            let end = rest.find(['=', ']']).expect("`[env: NAME=...]`");
            rest[..end].to_owned()
        })
        .collect()
}

/// The long flags a `--help` text documents.
fn documented_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .flat_map(|line| line.trim().split([' ', ',']))
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap_or_default().to_owned())
        .filter(|flag| !flag.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------------

#[test]
fn compose_runs_exactly_crm_inventory_and_integration_each_as_its_mip_subcommand() {
    let services = default_services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = SERVICES.iter().map(|s| s.name).collect();
    assert_eq!(names, expected);

    for expected in &SERVICES {
        let command = command(service(&services, expected.name));
        assert_eq!(
            command.first().map(String::as_str),
            Some(expected.name),
            "compose service {} runs `mip {}`",
            expected.name,
            expected.name
        );
        // `--help` after the whole command: fails on an unknown subcommand or flag.
        help(&command);
    }
}

#[test]
fn compose_sets_only_environment_variables_the_binary_documents() {
    let services = compose_services();
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        let documented = documented_env(&help(&command(service)[..1]));
        assert!(
            documented.contains(expected.listen_var) && documented.contains("MIP_DATA_DIR"),
            "`mip {} --help` documents its environment: {documented:?}",
            expected.name
        );
        for var in environment(service).keys() {
            assert!(
                documented.contains(var),
                "compose sets {var} for {}, but `mip {} --help` does not document it \
                 (documented: {documented:?})",
                expected.name,
                expected.name
            );
        }
    }
}

#[test]
fn compose_publishes_each_listen_port_and_points_integration_at_its_neighbours() {
    let services = compose_services();
    let mut listen_ports = BTreeMap::new();
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        let env = environment(service);
        let listen = env.get(expected.listen_var).unwrap_or_else(|| {
            panic!(
                "compose sets {} for {}: the default listens on loopback, unreachable \
                 from outside the container",
                expected.listen_var, expected.name
            )
        });
        let listen: SocketAddr = listen
            .parse()
            .unwrap_or_else(|_| panic!("{}={listen} is an IP:PORT", expected.listen_var));
        assert!(
            listen.ip().is_unspecified(),
            "{} listens on {listen}; in a container it must listen on every interface \
             for its published port to reach it",
            expected.name
        );
        assert!(
            PORTS.contains(&listen.port()),
            "{} listens on port {}, outside {PORTS:?}",
            expected.name,
            listen.port()
        );
        let published = ports(service);
        assert!(
            published
                .iter()
                .any(|&(host, container)| container == listen.port()
                    && host.is_none_or(|h| PORTS.contains(&h))),
            "{} publishes its listen port {} (in {PORTS:?}); it publishes {published:?}",
            expected.name,
            listen.port()
        );
        listen_ports.insert(expected.name, listen.port());
    }
    let distinct: BTreeSet<_> = listen_ports.values().collect();
    assert_eq!(distinct.len(), SERVICES.len(), "{listen_ports:?}");

    let integration = environment(service(&services, "integration"));
    for (var, neighbour) in [("MIP_CRM_ADDR", "crm"), ("MIP_INVENTORY_ADDR", "inventory")] {
        let addr = integration
            .get(var)
            .unwrap_or_else(|| panic!("compose sets {var} for integration"));
        assert_eq!(
            host_port(addr),
            (neighbour.to_owned(), listen_ports[neighbour]),
            "integration's {var}={addr} names the {neighbour} service and its listen port"
        );
    }
}

#[test]
fn compose_healthchecks_ask_mip_health_about_each_service_by_its_grpc_name() {
    let services = compose_services();
    let health_flags = documented_flags(&help(&["health".to_owned()]));
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        let test = words(
            service
                .get("healthcheck")
                .and_then(|h| h.get("test"))
                .unwrap_or_else(|| panic!("{} has a healthcheck test", expected.name)),
        );
        assert_eq!(
            test.get(..3).map(|w| w.join(" ")).as_deref(),
            Some("CMD mip health"),
            "{}'s healthcheck runs `mip health` in exec form: {test:?}",
            expected.name
        );
        let flags = flags(&test[3..]);
        for flag in flags.keys() {
            assert!(
                health_flags.contains(flag),
                "{}'s healthcheck passes --{flag}, which `mip health --help` does not \
                 document ({health_flags:?})",
                expected.name
            );
        }
        let listen: SocketAddr = environment(service)[expected.listen_var].parse().unwrap();
        assert_eq!(
            flags.get("addr").map(String::as_str),
            Some(format!("127.0.0.1:{}", listen.port()).as_str()),
            "{}'s healthcheck asks its own listen port",
            expected.name
        );
        assert_eq!(
            flags.get("service").map(String::as_str),
            Some(expected.grpc_name),
            "{}'s healthcheck asks about its gRPC service",
            expected.name
        );
    }
}

#[test]
fn compose_waits_for_healthy_dependencies_and_keeps_data_in_named_volumes() {
    let services = compose_services();
    let declared = compose_volumes();
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        if let Some(depends_on) = service.get("depends_on") {
            let depends_on = depends_on.as_mapping().unwrap_or_else(|| {
                panic!(
                    "{}'s depends_on is the long form, with conditions",
                    expected.name
                )
            });
            for (dependency, how) in depends_on {
                let dependency = scalar(dependency);
                assert_eq!(
                    how.get("condition").map(scalar).as_deref(),
                    Some("service_healthy"),
                    "{} waits for {dependency} to be healthy, not just started",
                    expected.name
                );
                assert!(
                    services
                        .get(&dependency)
                        .is_some_and(|d| d.contains_key("healthcheck")),
                    "{dependency}, which {} waits for, has a healthcheck",
                    expected.name
                );
            }
        }

        let data_dir = environment(service)
            .get("MIP_DATA_DIR")
            .cloned()
            .unwrap_or_else(dockerfile_data_dir);
        let mounts = volumes(service);
        let data = mounts
            .iter()
            .find(|(_, target)| *target == data_dir)
            .unwrap_or_else(|| {
                panic!(
                    "{} mounts a volume at its MIP_DATA_DIR {data_dir}: {mounts:?}",
                    expected.name
                )
            });
        assert!(
            declared.contains(&data.0),
            "{}'s data volume {:?} is a named volume declared under `volumes`: {declared:?}",
            expected.name,
            data.0
        );
    }

    let integration = service(&services, "integration");
    let dependencies: BTreeSet<String> = integration
        .get("depends_on")
        .and_then(Value::as_mapping)
        .map(|d| d.keys().map(scalar).collect())
        .unwrap_or_default();
    assert!(
        dependencies.contains("crm") && dependencies.contains("inventory"),
        "integration waits for the services it calls: {dependencies:?}"
    );
}

/// Starts a compose service the way its environment says, moved to loopback: its listen port
/// becomes a free loopback port, its data directory a temporary one, and `overrides` apply.
/// Once the server answers SERVING, runs its compose health check, aimed at that port, which
/// must pass. Returns the process and its port.
fn start_like_compose(
    name: &str,
    services: &BTreeMap<String, Mapping>,
    overrides: &BTreeMap<String, String>,
    dir: &Path,
) -> (Process, u16) {
    let expected = SERVICES.iter().find(|s| s.name == name).unwrap();
    let service = service(services, name);
    let healthcheck = words(service.get("healthcheck").unwrap().get("test").unwrap());
    for _ in 0..3 {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut env = environment(service);
        env.insert(expected.listen_var.to_owned(), addr.clone());
        env.insert(
            "MIP_DATA_DIR".to_owned(),
            dir.join(name).display().to_string(),
        );
        // Metrics too move to a free loopback port, or the services would share compose's.
        let metrics = env
            .contains_key(METRICS_VAR)
            .then(|| format!("127.0.0.1:{}", free_port()));
        if let Some(metrics) = &metrics {
            env.insert(METRICS_VAR.to_owned(), metrics.clone());
        }
        env.extend(overrides.clone());
        let mut process = Process::spawn(name, &command(service), &env, dir);

        // Health checks run inside the container, with its environment (the TLS files).
        let ready = ["health", "--addr", &addr, "--timeout", "1s"].map(str::to_owned);
        let deadline = Instant::now() + START_TIMEOUT;
        let serving = loop {
            if run_mip(&ready, &env).0.success() {
                break true;
            }
            if let Some(status) = process.exited() {
                eprintln!(
                    "{name} exited before serving on port {port} ({status}); trying another \
                     port:\n{}",
                    process.log_tail(5)
                );
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not report SERVING within {START_TIMEOUT:?}"
            );
            std::thread::sleep(POLL_EVERY);
        };
        if !serving {
            continue;
        }

        // The health check exactly as compose runs it (after `CMD`), only the port changed.
        let mut check: Vec<String> = healthcheck[2..].to_vec();
        let at = check.iter().position(|w| w == "--addr").unwrap() + 1;
        check[at] = addr;
        let (status, stdout) = run_mip(&check, &env);
        assert!(
            status.success() && stdout.trim() == "SERVING",
            "{name}'s compose health check `mip {}` fails on a serving {name} ({status}): {stdout}",
            check.join(" ")
        );
        // What Prometheus scrapes: the calls just made are counted there.
        if let Some(metrics) = metrics {
            let body = scrape(&metrics);
            assert!(
                body.contains("mip_rpc_requests_total{"),
                "{name} serves its metrics at {METRICS_VAR}: {body}"
            );
        }
        return (process, port);
    }
    panic!("{name} could not be started");
}

#[test]
fn each_service_starts_from_its_compose_environment_and_passes_its_healthcheck() {
    let services = compose_services();
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeMap::new();
    let (_crm, crm_port) = start_like_compose("crm", &services, &none, dir.path());
    let (_inventory, inventory_port) =
        start_like_compose("inventory", &services, &none, dir.path());
    // Service names only resolve inside compose's network: point at the loopback ports instead.
    let neighbours = BTreeMap::from([
        ("MIP_CRM_ADDR".to_owned(), format!("127.0.0.1:{crm_port}")),
        (
            "MIP_INVENTORY_ADDR".to_owned(),
            format!("127.0.0.1:{inventory_port}"),
        ),
    ]);
    let (_integration, _) = start_like_compose("integration", &services, &neighbours, dir.path());
}

#[test]
fn the_secure_compose_file_runs_every_service_with_mutual_tls_and_a_token() {
    let services = secure_compose_services();
    let dir = tempfile::tempdir().unwrap();
    // The certificate volume, moved to a temporary directory.
    let certs = dir.path().join("certs");
    let in_volume = |value: &str| value.replace("/etc/mip/certs", &certs.display().to_string());

    // The one-off `certs` service writes them, and keeps them when run again.
    let generate: Vec<String> = command(service(&services, "certs"))
        .iter()
        .map(|word| in_volume(word))
        .collect();
    assert_eq!(generate.first().map(String::as_str), Some("dev-certs"));
    for run in ["first", "second"] {
        let (status, _) = run_mip(&generate, &BTreeMap::new());
        assert!(
            status.success(),
            "`mip {}` failed on its {run} run",
            generate.join(" ")
        );
    }

    let mut with_certs = BTreeMap::new();
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        let env = environment(service);
        for var in [
            "MIP_TLS_CERT",
            "MIP_TLS_KEY",
            "MIP_TLS_CLIENT_CA",
            "MIP_AUTH_TOKEN_FILE",
        ] {
            assert!(env.contains_key(var), "{} sets {var}", expected.name);
        }
        let documented = documented_env(&help(&command(service)[..1]));
        for var in env.keys() {
            assert!(
                documented.contains(var),
                "the secure file sets {var} for {}, which `mip {} --help` does not document",
                expected.name,
                expected.name
            );
        }
        assert!(
            volumes(service)
                .iter()
                .any(|(source, target)| source == "certs" && target == "/etc/mip/certs"),
            "{} mounts the certs volume",
            expected.name
        );
        for (var, value) in env {
            if value.starts_with("/etc/mip/certs") {
                with_certs.insert(var, in_volume(&value));
            }
        }
    }
    let none = with_certs.clone();
    let (_crm, crm_port) = start_like_compose("crm", &services, &none, dir.path());
    let (_inventory, inventory_port) =
        start_like_compose("inventory", &services, &none, dir.path());
    let mut neighbours = with_certs;
    neighbours.insert("MIP_CRM_ADDR".to_owned(), format!("127.0.0.1:{crm_port}"));
    neighbours.insert(
        "MIP_INVENTORY_ADDR".to_owned(),
        format!("127.0.0.1:{inventory_port}"),
    );
    let (integration, _) = start_like_compose("integration", &services, &neighbours, dir.path());

    // Plain text is refused: the services really serve TLS.
    let plain = [
        "health",
        "--addr",
        &format!("127.0.0.1:{crm_port}"),
        "--timeout",
        "2s",
    ]
    .map(str::to_owned);
    assert_eq!(run_mip(&plain, &BTreeMap::new()).0.code(), Some(2));
    // The integration service reached both over mutual TLS with the token.
    assert!(
        integration.log_tail(50).contains("watching CRM customers"),
        "{}",
        integration.log_tail(20)
    );
}

/// `GET http://ADDR/metrics`, which must answer 200; returns the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let socket: SocketAddr = addr.parse().expect("an IP:PORT");
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("nothing serves metrics at {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("reading the metrics at {addr}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET http://{addr}/metrics: {head}"
    );
    body.to_owned()
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml: the `monitoring` profile
// ---------------------------------------------------------------------------------------------

/// deploy/prometheus/prometheus.yml.
fn prometheus_config() -> Value {
    serde_norway::from_str(&read(&format!("{PROMETHEUS_DIR}/prometheus.yml"))).expect("valid YAML")
}

/// A service's `depends_on` names, in either of compose's forms (list, or mapping).
fn dependencies(service: &Mapping) -> BTreeSet<String> {
    match service.get("depends_on") {
        None => BTreeSet::new(),
        Some(Value::Mapping(long)) => long.keys().map(scalar).collect(),
        Some(short) => words(short).into_iter().collect(),
    }
}

#[test]
fn the_monitoring_profile_adds_only_a_pinned_prometheus_and_leaves_plain_up_unchanged() {
    let services = compose_services();
    let profiled: BTreeMap<&str, Vec<String>> = services
        .iter()
        .filter_map(|(name, s)| s.get("profiles").map(|p| (name.as_str(), words(p))))
        .collect();
    assert_eq!(
        profiled,
        BTreeMap::from([("prometheus", vec![MONITORING.to_owned()])]),
        "only Prometheus sits in a profile, and only in `{MONITORING}`"
    );

    let prometheus = service(&services, "prometheus");
    let image = prometheus.get("image").map(scalar).expect("an image");
    let (repository, tag) = image.split_once(':').expect("an image with a tag");
    assert!(
        ["prom/prometheus", "docker.io/prom/prometheus"].contains(&repository),
        "the official image, not {image}"
    );
    assert!(
        tag.starts_with('v')
            && tag[1..].split('.').count() == 3
            && tag[1..].split('.').all(|n| n.parse::<u32>().is_ok()),
        "the image is pinned to a release (vX.Y.Z), not {tag}: the alert rules are tested with that release's PromQL"
    );

    // Plain `docker compose up` must not pull Prometheus in through a dependency, and must
    // run the same three services as without the profile.
    let prometheus_volumes: BTreeSet<String> = volumes(prometheus)
        .into_iter()
        .map(|(source, _)| source)
        .collect();
    let defaults = default_services();
    assert_eq!(
        defaults.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        SERVICES.iter().map(|s| s.name).collect::<BTreeSet<_>>()
    );
    for (name, service) in &defaults {
        for dependency in dependencies(service) {
            assert!(
                !profiled.contains_key(dependency.as_str()),
                "{name} depends on {dependency}, which only runs with --profile {MONITORING}"
            );
        }
        for (source, _) in volumes(service) {
            assert!(
                !prometheus_volumes.contains(&source),
                "{name} shares the volume {source} with Prometheus"
            );
        }
    }
}

#[test]
fn prometheus_scrapes_every_service_where_compose_serves_its_metrics() {
    let services = compose_services();
    let mut expected = BTreeMap::new();
    for service_kind in &SERVICES {
        let env = environment(service(&services, service_kind.name));
        let metrics: SocketAddr = env
            .get(METRICS_VAR)
            .unwrap_or_else(|| panic!("compose sets {METRICS_VAR} for {}", service_kind.name))
            .parse()
            .unwrap_or_else(|_| panic!("{}'s {METRICS_VAR} is an IP:PORT", service_kind.name));
        assert!(
            metrics.ip().is_unspecified(),
            "{} serves metrics on {metrics}; Prometheus, in another container, reaches it only \
             on every interface",
            service_kind.name
        );
        let listen: SocketAddr = env[service_kind.listen_var].parse().unwrap();
        assert_ne!(
            metrics.port(),
            listen.port(),
            "{}'s metrics and gRPC ports differ",
            service_kind.name
        );
        expected.insert(
            service_kind.name.to_owned(),
            BTreeSet::from([(service_kind.name.to_owned(), metrics.port())]),
        );
    }

    let config = prometheus_config();
    let mut jobs = BTreeMap::new();
    for job in config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("`scrape_configs` is a list")
    {
        let name = job.get("job_name").map(scalar).expect("a `job_name`");
        assert!(
            job.get("metrics_path")
                .is_none_or(|path| scalar(path) == "/metrics"),
            "job {name} scrapes /metrics, where the services serve them"
        );
        assert!(
            job.get("scheme").is_none_or(|s| scalar(s) == "http"),
            "job {name} scrapes over plain HTTP, as the services serve metrics"
        );
        let targets: BTreeSet<(String, u16)> = job
            .get("static_configs")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("job {name} lists its targets in `static_configs`"))
            .iter()
            .flat_map(|group| {
                group
                    .get("targets")
                    .and_then(Value::as_sequence)
                    .expect("`targets` is a list")
                    .iter()
                    .map(|target| host_port(&scalar(target)))
            })
            .collect();
        assert!(
            jobs.insert(name.clone(), targets).is_none(),
            "job {name} appears once"
        );
    }
    assert_eq!(
        jobs, expected,
        "one job per service, named after it, scraping it by its compose name at its \
         {METRICS_VAR} port"
    );
}

#[test]
fn prometheus_loads_its_configuration_and_the_alert_rules_from_the_mounted_directory() {
    let services = compose_services();
    let prometheus = service(&services, "prometheus");
    let flags = flags(&command(prometheus));
    let config_file = PathBuf::from(
        flags
            .get("config.file")
            .expect("Prometheus is given --config.file"),
    );
    let mounts = volumes(prometheus);
    let (source, target) = mounts
        .iter()
        .find(|(_, target)| config_file.starts_with(target))
        .unwrap_or_else(|| {
            panic!(
                "--config.file {} is inside a mounted directory: {mounts:?}",
                config_file.display()
            )
        });
    assert_eq!(
        source.trim_start_matches("./").trim_end_matches('/'),
        PROMETHEUS_DIR,
        "the configuration comes from the checkout's {PROMETHEUS_DIR}"
    );
    let on_host = |in_container: &Path| {
        repo_file(PROMETHEUS_DIR).join(in_container.strip_prefix(target).unwrap())
    };
    assert_eq!(
        on_host(&config_file),
        repo_file(&format!("{PROMETHEUS_DIR}/prometheus.yml")),
        "--config.file is {PROMETHEUS_DIR}/prometheus.yml"
    );

    // Prometheus resolves rule files relative to the configuration file.
    let rule_files: Vec<PathBuf> = prometheus_config()
        .get("rule_files")
        .and_then(Value::as_sequence)
        .expect("`rule_files` is a list")
        .iter()
        .map(|file| config_file.parent().unwrap().join(scalar(file)))
        .collect();
    for file in &rule_files {
        assert!(
            file.starts_with(target) && on_host(file).is_file(),
            "rule file {} is in the mounted directory",
            file.display()
        );
    }
    assert!(
        rule_files
            .iter()
            .any(|file| on_host(file) == repo_file(&format!("{PROMETHEUS_DIR}/alerts.yml"))),
        "Prometheus loads {PROMETHEUS_DIR}/alerts.yml: {rule_files:?}"
    );

    let storage = flags
        .get("storage.tsdb.path")
        .expect("Prometheus is given --storage.tsdb.path");
    assert!(
        mounts
            .iter()
            .any(|(source, target)| target == storage && compose_volumes().contains(source)),
        "Prometheus keeps its data in a named volume at {storage}: {mounts:?}"
    );
    // The README sends operators to http://127.0.0.1:9090, Prometheus's default address.
    assert!(!flags.contains_key("web.listen-address"));
    assert!(
        ports(prometheus).contains(&(Some(9090), 9090)),
        "Prometheus's UI is published on port 9090"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

/// The data directory the image sets.
fn dockerfile_data_dir() -> String {
    let stages = dockerfile_stages();
    env_of(stages.last().expect("a stage"))
        .remove("MIP_DATA_DIR")
        .expect("the final stage sets ENV MIP_DATA_DIR")
}

#[test]
fn dockerfile_builds_in_stages_and_runs_mip_as_a_non_root_user() {
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "a multi-stage build: {} FROM",
        stages.len()
    );
    let builder = exec_form(&stages[0][0].args);
    assert!(
        builder[0].starts_with("rust:") || builder[0].starts_with("docker.io/library/rust:"),
        "the first stage builds on a rust image: FROM {}",
        stages[0][0].args
    );
    let stage_names: Vec<String> = stages
        .iter()
        .map(|stage| {
            let from = exec_form(&stage[0].args);
            match from.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                Some(at) => from[at + 1].clone(),
                None => String::new(),
            }
        })
        .collect();
    let last = stages.last().unwrap();

    let user = last
        .iter()
        .rfind(|i| i.keyword == "USER")
        .map(|i| i.args.clone())
        .expect("the final stage sets USER");
    let user_name = user.split(':').next().unwrap().to_owned();
    assert!(
        !["root", "0"].contains(&user_name.as_str()),
        "the final stage runs as a non-root user, not {user}"
    );

    // The binary comes from an earlier stage, onto the PATH (the health checks run plain `mip`).
    let copy = last
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| exec_form(&i.args))
        .find(|words| {
            words.iter().any(|w| w.starts_with("--from="))
                && words
                    .iter()
                    .any(|w| !w.starts_with("--") && w.ends_with("/mip"))
        })
        .expect("the final stage copies the mip binary from a build stage");
    let from = copy.iter().find_map(|w| w.strip_prefix("--from=")).unwrap();
    assert!(
        stage_names[..stage_names.len() - 1].contains(&from.to_owned()),
        "COPY --from={from} names an earlier stage ({stage_names:?})"
    );
    let destination = copy.last().unwrap();
    assert!(
        ["/usr/local/bin/mip", "/usr/local/bin/", "/usr/local/bin"].contains(&destination.as_str()),
        "the binary lands on the PATH, at /usr/local/bin/mip, not {destination}"
    );

    let entrypoint = last
        .iter()
        .rfind(|i| i.keyword == "ENTRYPOINT")
        .map(|i| exec_form(&i.args))
        .expect("an ENTRYPOINT");
    assert!(
        entrypoint
            .first()
            .is_some_and(|e| e == "mip" || e == "/usr/local/bin/mip"),
        "ENTRYPOINT runs mip: {entrypoint:?}"
    );

    // The image's data directory is where compose mounts the volumes, and belongs to the user:
    // Docker fills an empty named volume from the image's directory, ownership included.
    let data_dir = dockerfile_data_dir();
    let services = compose_services();
    for expected in &SERVICES {
        let service = service(&services, expected.name);
        if let Some(dir) = environment(service).get("MIP_DATA_DIR") {
            assert_eq!(
                dir, &data_dir,
                "compose's {} MIP_DATA_DIR is the image's",
                expected.name
            );
        }
        assert!(
            volumes(service)
                .iter()
                .any(|(_, target)| *target == data_dir),
            "{} mounts its volume at the image's MIP_DATA_DIR {data_dir}",
            expected.name
        );
    }
    let creates_data_dir = last.iter().any(|i| {
        i.keyword == "RUN"
            && i.args.contains(&data_dir)
            && (i.args.contains(&format!("chown {user_name}"))
                || i.args.contains(&format!("chown -R {user_name}"))
                || i.args.contains(&format!("-o {user_name}")))
    });
    assert!(
        creates_data_dir,
        "the final stage creates {data_dir} owned by {user_name}, or a fresh named volume \
         there belongs to root and mip cannot write its databases"
    );
}

// ---------------------------------------------------------------------------------------------
// docker-compose.cluster.yml
// ---------------------------------------------------------------------------------------------

/// The cluster's replicas, each with the service it runs (an entry of [`SERVICES`]).
const CLUSTER: [(&str, &str); 7] = [
    ("crm-1", "crm"),
    ("crm-2", "crm"),
    ("crm-3", "crm"),
    ("inventory-1", "inventory"),
    ("inventory-2", "inventory"),
    ("integration-1", "integration"),
    ("integration-2", "integration"),
];

/// The compose variable the PostgreSQL password comes from, unquoted, so it never sits in a
/// committed file.
const PASSWORD_VAR: &str = "${POSTGRES_PASSWORD";

fn cluster_services() -> BTreeMap<String, Mapping> {
    compose_file_services("docker-compose.cluster.yml")
}

fn expected(kind: &str) -> &'static Expected {
    SERVICES.iter().find(|s| s.name == kind).unwrap()
}

#[test]
fn the_cluster_runs_postgres_and_every_replica_from_the_base_image() {
    let services = cluster_services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let mut wanted: BTreeSet<&str> = CLUSTER.iter().map(|(name, _)| *name).collect();
    wanted.insert("postgres");
    assert_eq!(names, wanted);

    let postgres = service(&services, "postgres");
    assert_eq!(
        postgres.get("image").map(scalar).as_deref(),
        Some("postgres:16")
    );
    let password = environment(postgres)
        .get("POSTGRES_PASSWORD")
        .cloned()
        .unwrap_or_default();
    assert!(
        password.starts_with(PASSWORD_VAR),
        "postgres takes POSTGRES_PASSWORD from the environment, not the file: {password:?}"
    );
    let test = words(
        postgres
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .unwrap(),
    );
    assert_eq!(
        &test[..2],
        ["CMD", "pg_isready"],
        "postgres is health-checked with pg_isready"
    );
    let declared = cluster_volumes();
    assert!(
        volumes(postgres).iter().any(|(source, target)| {
            target == "/var/lib/postgresql/data" && declared.contains(source)
        }),
        "postgres keeps its data in a named volume: {:?}",
        volumes(postgres)
    );

    let base = compose_services();
    let base = service(&base, "crm");
    for (name, kind) in CLUSTER {
        let replica = service(&services, name);
        for key in ["build", "image"] {
            assert_eq!(
                replica.get(key),
                base.get(key),
                "{name}'s {key} is the base file's"
            );
        }
        let command = command(replica);
        assert_eq!(
            command.first().map(String::as_str),
            Some(kind),
            "{name} runs `mip {kind}`"
        );
        help(&command);
    }
}

#[test]
fn cluster_replicas_share_postgres_with_the_password_outside_the_url() {
    let services = cluster_services();
    for (name, kind) in CLUSTER {
        let replica = service(&services, name);
        let help = help(&[kind.to_owned()]);
        let documented = documented_env(&help);
        let env = environment(replica);
        for var in env.keys() {
            // PGPASSWORD is libpq's variable; `--database-url`'s help says it is read.
            let known = documented.contains(var) || (var == "PGPASSWORD" && help.contains(var));
            assert!(
                known,
                "{name} sets {var}, which `mip {kind} --help` does not document"
            );
        }
        let url = env
            .get("MIP_DATABASE_URL")
            .unwrap_or_else(|| panic!("{name} sets MIP_DATABASE_URL"));
        let authority = url
            .strip_prefix("postgres://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("{name}'s MIP_DATABASE_URL {url} is a postgres:// URL"));
        let (user, host) = authority.split_once('@').unwrap_or(("", authority));
        assert!(
            !user.contains(':'),
            "{name}'s MIP_DATABASE_URL carries no password"
        );
        assert_eq!(
            host_port(host),
            ("postgres".to_owned(), 5432),
            "{name} uses postgres"
        );
        assert!(
            env.get("PGPASSWORD")
                .is_some_and(|p| p.starts_with(PASSWORD_VAR)),
            "{name} gets the password as PGPASSWORD, from POSTGRES_PASSWORD"
        );

        let depends_on = replica
            .get("depends_on")
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{name}'s depends_on is the long form"));
        assert!(
            depends_on.contains_key("postgres"),
            "{name} waits for postgres"
        );
        for (dependency, how) in depends_on {
            let dependency = scalar(dependency);
            assert_eq!(
                how.get("condition").map(scalar).as_deref(),
                Some("service_healthy"),
                "{name} waits for {dependency} to be healthy"
            );
            assert!(
                services
                    .get(&dependency)
                    .is_some_and(|d| d.contains_key("healthcheck")),
                "{dependency}, which {name} waits for, has a healthcheck"
            );
        }
    }
}

#[test]
fn cluster_replicas_publish_distinct_ports_check_their_health_and_workers_call_every_replica() {
    let services = cluster_services();
    let health_flags = documented_flags(&help(&["health".to_owned()]));
    let mut host_ports = BTreeSet::new();
    let mut replicas: BTreeMap<&str, BTreeSet<(String, u16)>> = BTreeMap::new();
    for (name, kind) in CLUSTER {
        let expected = expected(kind);
        let replica = service(&services, name);
        let listen: SocketAddr = environment(replica)
            .get(expected.listen_var)
            .unwrap_or_else(|| panic!("{name} sets {}", expected.listen_var))
            .parse()
            .unwrap_or_else(|_| panic!("{name}'s {} is an IP:PORT", expected.listen_var));
        assert!(
            listen.ip().is_unspecified(),
            "{name} listens on every interface"
        );
        let published = ports(replica);
        let host = published
            .iter()
            .find(|(_, container)| *container == listen.port())
            .and_then(|(host, _)| *host)
            .unwrap_or_else(|| panic!("{name} publishes {listen} on a host port: {published:?}"));
        assert!(
            host_ports.insert(host),
            "host port {host} is published twice"
        );
        replicas
            .entry(kind)
            .or_default()
            .insert((name.to_owned(), listen.port()));

        let test = words(
            replica
                .get("healthcheck")
                .and_then(|h| h.get("test"))
                .unwrap(),
        );
        assert_eq!(test[..3].join(" "), "CMD mip health", "{name}: {test:?}");
        let flags = flags(&test[3..]);
        assert!(
            flags.keys().all(|flag| health_flags.contains(flag)),
            "{name}'s healthcheck flags {flags:?} are documented"
        );
        assert_eq!(
            flags.get("addr").cloned(),
            Some(format!("127.0.0.1:{}", listen.port())),
            "{name}'s healthcheck asks its own listen port"
        );
        assert_eq!(
            flags.get("service").map(String::as_str),
            Some(expected.grpc_name)
        );
    }

    let mut worker_ids = BTreeSet::new();
    for (name, _) in CLUSTER.iter().filter(|(_, kind)| *kind == "integration") {
        let env = environment(service(&services, name));
        // A stable name of its own: a restarted worker takes its partitions back at once.
        let worker_id = env
            .get("MIP_INTEGRATION_WORKER_ID")
            .unwrap_or_else(|| panic!("{name} sets MIP_INTEGRATION_WORKER_ID"))
            .clone();
        assert!(
            worker_ids.insert(worker_id.clone()),
            "{name}'s worker id {worker_id} is another worker's too"
        );
        for (var, kind) in [("MIP_CRM_ADDR", "crm"), ("MIP_INVENTORY_ADDR", "inventory")] {
            let listed: BTreeSet<(String, u16)> = env
                .get(var)
                .unwrap_or_else(|| panic!("{name} sets {var}"))
                .split(',')
                .map(host_port)
                .collect();
            assert_eq!(
                listed, replicas[kind],
                "{name}'s {var} lists every {kind} replica"
            );
        }
    }
}
