#!/usr/bin/env python3
"""Fault-injection check of the invariant: every customer gets exactly one welcome package.

Runs CRM, Inventory and the integration service as three separate `mip` processes on loopback
(free ephemeral ports, a fresh data directory each, under one temporary directory), creates
customers from a few concurrent client threads, and meanwhile injects faults with SIGKILL:

  kills                     (default) `--kills` times, at random moments of the load, SIGKILL a
                            randomly chosen service, wait a random short time, restart it on the
                            same port and data directory, and wait until it is SERVING again.
  inventory-outage          SIGKILL Inventory for `--outage` seconds while customers keep being
                            created, restart it, and report how long the backlog took to drain.
  crm-restart-during-watch  SIGKILL and restart CRM `--kills` times, each time while the
                            integration service has its WatchCustomers stream open.
  cluster (--cluster)       a cluster on one private PostgreSQL: 3 CRM replicas, 2 Inventory
                            replicas and 2 integration workers (every worker calls every
                            replica); customers are created through the CRM replicas round
                            robin while `--kills` times a random replica or worker is SIGKILLed
                            and restarted.
  postgres-restart          the three services keep every table in one private PostgreSQL
                            server (initdb into the temp dir, loopback, a free port; as the
                            `postgres` user when run as root); `--kills` times, stop it with an
                            immediate shutdown (SIGQUIT: no checkpoint, every connection cut)
                            under load, wait, start it again. No service is restarted: each must
                            ride out the outage (calls fail UNAVAILABLE) and recover by itself.

Every create carries a request_id (AIP-155). A create that fails because CRM was killed
(UNAVAILABLE, DEADLINE_EXCEEDED, or the transport's CANCELLED, UNKNOWN or INTERNAL) is retried
with the same request_id until it succeeds, so the set of created customers is known exactly.
Once all creates and faults are done, the script waits (at most `--settle-timeout`) for the integration service to catch up, then checks through
the public gRPC APIs only (ListCustomers and ListPackageRequests, paging) that every created
customer exists in CRM and has exactly one welcome package. It prints created, packaged,
missing, duplicated, kills and elapsed time, and exits 1 on any violation, failed restart or
timeout (`--timeout` bounds the whole run). Every child process is killed on every exit path,
including SIGINT and SIGTERM; on failure the tail of each service's log is printed and the
temporary directory is kept.

Run it from the repository root (Python 3.11, grpcio, grpcio-tools, grpcio-health-checking):

    cargo build --bin mip
    python3 scripts/chaos.py --short                       # CI: all three scenarios, small
    python3 scripts/chaos.py --seed 42                     # 50,000 customers, 20 kills
    python3 scripts/chaos.py --scenario inventory-outage --outage 30
    python3 scripts/chaos.py --scenario crm-restart-during-watch
    python3 scripts/chaos.py --scenario postgres-restart --kills 5
    python3 scripts/chaos.py --cluster --customers 20000 --kills 15
    MIP_BIN=target/release/mip python3 scripts/chaos.py    # or --mip PATH

The seed is printed first; rerunning with `--seed` replays the same fault plan (which service,
at what point of the load, for how long), though not the exact thread interleaving.
"""

import argparse
import collections
import dataclasses
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

try:
    import grpc
except ImportError:
    sys.exit("grpcio is missing: pip install grpcio grpcio-tools grpcio-health-checking")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MIP = os.environ.get("MIP_BIN", str(ROOT / "target" / "debug" / "mip"))
SERVICES = ("crm", "inventory", "integration")
HEALTH_NAMES = {
    "crm": "crm.v1.CrmService",
    "inventory": "inventory.v1.InventoryService",
    "integration": "integration.v1.IntegrationService",
}
PACKAGE_TYPE = "welcome_package"
# Codes a create may meet while CRM is being killed or restarted; the same request_id is retried.
# A killed CRM shows up as whatever the client transport makes of the dropped connection, and a
# busy one sheds load; every create carries its request_id, so retrying any of these is safe.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
CALL_TIMEOUT = 5.0
PAGE_SIZE = 1000
RESTART_TIMEOUT = 30.0  # a restarted service that is not SERVING by then is a failure
MIN_FAULT_GAP = 0.3  # seconds between a restart and the next kill, even when both are due
STREAM_WAIT = 20.0  # how long a CRM kill waits for the integration's watch stream to be open
STREAM_SLICE = 12.0  # seconds of load per CRM restart in crm-restart-during-watch
LOG_TAIL_LINES = 40
CLEANUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM}
# Reconnect quickly after a restart; gRPC's default backoff grows to two minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# request_id = UUIDv5(this, "<seed>/<index>"): reproducible and unique per customer of a run.
REQUEST_NAMESPACE = uuid.UUID("8f0c8f3e-0b7a-4f7e-9a57-6c1d2f0e5a11")

START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


class ChaosFailure(Exception):
    """The platform broke a promise: a service did not restart, did not settle, lost data."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or the overall --timeout ended the run early."""


# ---------------------------------------------------------------------------------------------
# Generated stubs


def load_stubs():
    """Generates the Python stubs from proto/ (the documented way) and imports them."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "clients/python/generate.py")],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        sys.exit(f"generating the Python stubs failed:\n{result.stdout}{result.stderr}")
    sys.path.insert(0, str(ROOT / "clients/python/generated"))
    global health_pb2, health_pb2_grpc, crm_pb2, crm_pb2_grpc
    global inventory_pb2, inventory_pb2_grpc, integration_pb2, integration_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from crm.v1 import crm_pb2, crm_pb2_grpc
    from inventory.v1 import inventory_pb2, inventory_pb2_grpc
    from integration.v1 import integration_pb2, integration_pb2_grpc


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> pathlib.Path | None:
    """Debian's newest PostgreSQL binaries, else the directory of `initdb` on PATH."""
    versions = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return pathlib.Path(found).parent if found else None


class Postgres:
    """A private PostgreSQL server in `workdir`, stopped with an immediate shutdown and started
    again on the same port. Started under `setpriv --pdeathsig`, so it never outlives this
    script; as the `postgres` user when running as root, since initdb refuses root."""

    def __init__(self, workdir: pathlib.Path):
        self.bin = postgres_bin()
        if self.bin is None:
            raise ChaosFailure("postgres-restart needs PostgreSQL's binaries (initdb, postgres)")
        self.root = workdir / "postgres"
        self.root.mkdir()
        self.port = free_port()
        self.log_path = workdir / "postgres.log"
        self.process = None
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, user="postgres", group="postgres")
            os.chmod(workdir, 0o755)
        run = subprocess.run(self._command("initdb", "-U", "postgres", "-A", "trust", "-E",
                                           "UTF8", "--locale=C", "--no-sync", "-D",
                                           str(self.root / "data")),
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise ChaosFailure(f"initdb failed: {run.stderr}")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, binary: str, *args: str) -> list:
        user = ["--reuid=postgres", "--regid=postgres", "--init-groups"] if self.as_postgres else []
        return ["setpriv", *user, "--pdeathsig=KILL", "--", str(self.bin / binary), *args]

    def start(self, all_processes: list) -> float:
        """Starts the server; returns once it accepts connections (how long that took)."""
        started = time.monotonic()
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                self._command("postgres", "-D", str(self.root / "data"), "-p", str(self.port),
                              "-c", "listen_addresses=127.0.0.1",
                              "-c", f"unix_socket_directories={self.root}",
                              "-c", "max_connections=200"),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.root)
        all_processes.append(self.process)
        while True:
            if self.process.poll() is not None:
                raise ChaosFailure(f"postgres exited with code {self.process.returncode} "
                                   f"(log: {self.log_path})")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1",
                                    "-p", str(self.port)]).returncode == 0
            if ready:
                return time.monotonic() - started
            if time.monotonic() - started > RESTART_TIMEOUT:
                raise ChaosFailure(f"postgres did not accept connections within "
                                   f"{RESTART_TIMEOUT:.0f}s (log: {self.log_path})")
            time.sleep(0.05)

    def kill(self) -> int:
        """Immediate shutdown (SIGQUIT to the postmaster): like a crash, no checkpoint."""
        pid = self.process.pid
        self.process.send_signal(signal.SIGQUIT)
        self.process.wait(timeout=30)
        return pid


@dataclasses.dataclass
class Service:
    """One `mip` service process, restartable on the same port and data directory."""

    name: str
    port: int
    data_dir: pathlib.Path
    log_path: pathlib.Path
    extra_args: list
    database_url: str | None = None
    command: str = ""  # the `mip` subcommand; the name when empty (replicas: `crm-1` runs `crm`)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, mip: str, all_processes: list) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"=== chaos.py: start #{self.starts} of {self.name} ===\n")
            log.flush()
            # Own session: a Ctrl-C in the terminal reaches only this script, which then kills
            # its children itself (and can report what it was doing).
            store = (["--database-url", self.database_url] if self.database_url
                     else ["--data-dir", str(self.data_dir)])
            self.process = subprocess.Popen(
                [mip, self.command or self.name, "--listen", self.address, *store,
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        all_processes.append(self.process)

    def kill(self) -> int:
        """SIGKILLs the process and reaps it; returns its pid."""
        pid = self.process.pid
        self.process.kill()
        self.process.wait()
        return pid

    def log_tail(self, lines: int) -> str:
        """The last `lines` lines, after the last few warnings and errors (often the cause)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        errors = [line for line in text if " ERROR " in line]
        warnings = [line for line in text if " WARN " in line]
        return "\n".join([f"(first {min(len(errors), 10)} of {len(errors)} ERROR lines)",
                          *errors[:10],
                          f"(last {min(len(warnings), 5)} of {len(warnings)} WARN lines)",
                          *warnings[-5:], f"(last {lines} lines)", *text[-lines:]])


class Platform:
    """The three services as separate processes, with their logs and data in `workdir`."""

    def __init__(self, mip: str, workdir: pathlib.Path, postgres: bool = False,
                 replicas: dict | None = None):
        self.mip = mip
        self.workdir = workdir
        self.processes: list = []  # every Popen ever started, so cleanup misses none
        self.postgres = Postgres(workdir) if postgres or replicas else None
        # How many processes of each service: one each, or a cluster's replicas and workers.
        counts = replicas or {name: 1 for name in SERVICES}
        names = {command: ([command] if counts[command] == 1 and not replicas
                           else [f"{command}-{n}" for n in range(1, counts[command] + 1)])
                 for command in SERVICES}
        ports = {name: free_port() for command in SERVICES for name in names[command]}
        self.replicas = names
        self.services = {}
        for command in SERVICES:
            for name in names[command]:
                extra = []
                if command == "integration":
                    extra = ["--crm-addr", ",".join(f"127.0.0.1:{ports[n]}" for n in names["crm"]),
                             "--inventory-addr",
                             ",".join(f"127.0.0.1:{ports[n]}" for n in names["inventory"]),
                             # A stable name: a killed worker's restart takes its partitions
                             # back at once, fencing whatever its old process left.
                             "--worker-id", name]
                self.services[name] = Service(
                    name=name, port=ports[name], data_dir=workdir / "data" / name,
                    log_path=workdir / f"{name}.log", extra_args=extra,
                    database_url=self.postgres.url if self.postgres else None,
                    command=command,
                )

    def address(self, name: str) -> str:
        """A service's address; for a service with replicas, the first replica's."""
        return self.services[self.replicas.get(name, [name])[0]].address

    def addresses(self, command: str) -> list:
        """Every replica's address of `command`."""
        return [self.services[name].address for name in self.replicas[command]]

    def start(self, name: str) -> float:
        """Starts a service and waits until it is SERVING; returns how long that took."""
        service = self.services[name]
        started = time.monotonic()
        service.start(self.mip, self.processes)
        wait_serving(service, RESTART_TIMEOUT)
        return time.monotonic() - started

    def start_all(self) -> None:
        if self.postgres:
            took = self.postgres.start(self.processes)
            say(f"started postgres    pid {self.postgres.process.pid:<7} on 127.0.0.1:"
                f"{self.postgres.port} (accepting after {took:.2f}s)")
        for name in self.services:
            took = self.start(name)
            say(f"started {name:<11} pid {self.services[name].process.pid:<7} "
                f"on {self.services[name].address} (SERVING after {took:.2f}s)")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                say(f"WARNING: pid {process.pid} did not exit after SIGKILL")

    def restarted_services(self) -> list:
        """Services that had to be started more than once, or that have exited."""
        return [name for name, s in self.services.items()
                if s.starts > 1 or (s.process and s.process.poll() is not None)]

    def print_log_tails(self) -> None:
        if self.postgres:
            try:
                tail = self.postgres.log_path.read_text(errors="replace").splitlines()[-15:]
            except OSError as error:
                tail = [f"(no log: {error})"]
            print(f"----- last lines of {self.postgres.log_path} -----")
            print("\n".join(tail))
        for service in self.services.values():
            print(f"----- last {LOG_TAIL_LINES} lines of {service.log_path} -----")
            print(service.log_tail(LOG_TAIL_LINES))
        print("-----", flush=True)


def wait_serving(service: Service, timeout: float) -> None:
    """Polls standard health until SERVING; fails if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    request = health_pb2.HealthCheckRequest(service=HEALTH_NAMES[service.command or service.name])
    while True:
        code = service.process.poll()
        if code is not None:
            raise ChaosFailure(f"{service.name} exited with code {code} while starting "
                               f"(log: {service.log_path})")
        try:
            with grpc.insecure_channel(service.address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise ChaosFailure(f"{service.name} not SERVING {timeout:.0f}s after start "
                               f"(log: {service.log_path})")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Load


class Creator:
    """Creates `total` customers from `clients` threads, retrying each with its own request_id."""

    def __init__(self, addresses: list, total: int, clients: int, seed: int, rate: float):
        self.addresses = addresses  # CRM replicas: creates go round robin, retries to the next
        self.total = total
        self.seed = seed
        self.rate = rate  # customers per second in all; 0 = as fast as the platform allows
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.next_index = 0
        self.ids: dict = {}  # index -> customer id, for every acknowledged create
        self.retries = 0
        self.errors: list = []  # permanent failures: (index, code, details)
        self.started = 0.0
        self.finished = 0.0
        self.threads = [threading.Thread(target=self._worker, name=f"creator-{n}", daemon=True)
                        for n in range(clients)]
        self.running = clients  # workers not finished yet

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> bool:
        return self.running == 0

    def created_ids(self) -> set:
        with self.progress:
            return set(self.ids.values())

    def wait_until(self, count: int) -> None:
        """Returns once `count` customers are created, or creation has ended."""
        with self.progress:
            self.progress.wait_for(lambda: len(self.ids) >= count or self.done, timeout=None)

    def join(self) -> None:
        for thread in self.threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
        self.finished = time.monotonic()

    def _take(self):
        with self.progress:
            if self.stop.is_set() or self.next_index >= self.total:
                return None
            self.next_index += 1
            return self.next_index - 1

    def _pace(self, index: int) -> None:
        if self.rate > 0:
            delay = self.started + index / self.rate - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)

    def _worker(self) -> None:
        try:
            channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                        for address in self.addresses]
            try:
                stubs = [crm_pb2_grpc.CrmServiceStub(channel) for channel in channels]
                while (index := self._take()) is not None:
                    self._pace(index)
                    customer_id = self._create(stubs, index)
                    with self.progress:
                        if customer_id is not None:
                            self.ids[index] = customer_id
                        self.progress.notify_all()
            finally:
                for channel in channels:
                    channel.close()
        finally:
            with self.progress:
                self.running -= 1
                self.progress.notify_all()

    def _create(self, stubs: list, index: int):
        request = crm_pb2.CreateCustomerRequest(
            name=f"Chaos Customer {index}",
            email=f"c{index}.s{self.seed}@chaos.example.com",
            request_id=str(uuid.uuid5(REQUEST_NAMESPACE, f"{self.seed}/{index}")),
        )
        delay = 0.02
        attempt = 0
        while not self.stop.is_set():
            # Round robin over the replicas, and a retry goes to the next one: a killed replica
            # costs one failed attempt, and the same request id makes the retry safe anywhere.
            stub = stubs[(index + attempt) % len(stubs)]
            attempt += 1
            try:
                return stub.CreateCustomer(request, timeout=CALL_TIMEOUT).id
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    with self.progress:
                        self.errors.append((index, error.code().name, error.details()))
                    return None
                with self.progress:
                    self.retries += 1
                self.stop.wait(delay)
                delay = min(delay * 2, 0.5)
        return None


def report_progress(creator: Creator, kills: collections.Counter, stop: threading.Event) -> None:
    """Prints a progress line every 5 s until creation ends or `stop` is set."""
    last_count, last_time = 0, time.monotonic()
    while not stop.wait(5.0) and not creator.done:
        count, now = creator.count, time.monotonic()
        rate = (count - last_count) / (now - last_time)
        say(f"progress: created {count}/{creator.total} ({rate:.0f}/s), "
            f"create retries {creator.retries}, kills {sum(kills.values())}")
        last_count, last_time = count, now


# ---------------------------------------------------------------------------------------------
# Reading the outcome through the public APIs


def with_retry(call, timeout: float = 30.0):
    """Runs `call()`, retrying transient failures (a service that just restarted) for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class PackageScanner:
    """Pages through Inventory's package requests; `refresh()` reads only what is new.

    Package requests are listed in creation order, so a page that has a next_page_token is
    complete for good: each refresh starts again from the last page, which may still grow.
    """

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = inventory_pb2_grpc.InventoryServiceStub(self.channel)
        self.customer_of: dict = {}  # package request id -> customer id, welcome packages only
        self.token = ""

    def refresh(self) -> collections.Counter:
        while True:
            request = inventory_pb2.ListPackageRequestsRequest(page_size=PAGE_SIZE,
                                                               page_token=self.token)
            page = with_retry(lambda: self.stub.ListPackageRequests(request, timeout=CALL_TIMEOUT))
            for package in page.package_requests:
                if package.package_type == PACKAGE_TYPE:
                    self.customer_of[package.id] = package.customer_id
            if not page.next_page_token:
                return self.counts()
            self.token = page.next_page_token

    def counts(self) -> collections.Counter:
        return collections.Counter(self.customer_of.values())

    def close(self) -> None:
        self.channel.close()


def list_customers(address: str) -> list:
    """Every customer id in CRM (ListCustomers, paging)."""
    ids, token = [], ""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = crm_pb2_grpc.CrmServiceStub(channel)
        while True:
            request = crm_pb2.ListCustomersRequest(page_size=PAGE_SIZE, page_token=token)
            page = with_retry(lambda: stub.ListCustomers(request, timeout=CALL_TIMEOUT))
            ids += [customer.id for customer in page.customers]
            token = page.next_page_token
            if not token:
                return ids


def crm_head(address: str) -> int:
    """The sequence of the newest event in CRM's change log."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = crm_pb2_grpc.CrmServiceStub(channel)
        request = crm_pb2.ListCustomersRequest(page_size=1)
        return with_retry(lambda: stub.ListCustomers(request, timeout=CALL_TIMEOUT)).resume_sequence


def integration_status(address: str):
    with grpc.insecure_channel(address) as channel:
        stub = integration_pb2_grpc.IntegrationServiceStub(channel)
        return with_retry(lambda: stub.GetStatus(integration_pb2.GetStatusRequest(),
                                                 timeout=CALL_TIMEOUT))


# ---------------------------------------------------------------------------------------------
# Faults


@dataclasses.dataclass
class Fault:
    """Kill `service` once `at_count` customers exist, keep it down `downtime` s, restart it."""

    service: str
    at_count: int
    downtime: float
    wait_for_stream: bool = False  # only kill while the integration's watch stream is open
    measure_drain: bool = False  # after the restart, time until the backlog has its packages


def plan_faults(config, rng: random.Random) -> list:
    """The scenario's faults, drawn from the seeded generator so a seed replays the plan."""
    if config.scenario == "inventory-outage":
        return [Fault("inventory", config.customers // 4, config.outage, measure_drain=True)]
    if config.scenario == "postgres-restart":
        moments = sorted(int(rng.uniform(0.1, 0.8) * config.customers)
                         for _ in range(config.kills))
        return [Fault("postgres", at, rng.uniform(0.5, 3.0)) for at in moments]
    if config.scenario == "crm-restart-during-watch":
        # One restart per equal slice of the load: the stream needs time to come back.
        moments = [int((n + rng.uniform(0.2, 0.8)) / config.kills * config.customers)
                   for n in range(config.kills)]
        return [Fault("crm", at, rng.uniform(0.05, 1.0), wait_for_stream=True) for at in moments]
    moments = sorted(int(rng.uniform(0.02, 0.95) * config.customers) for _ in range(config.kills))
    # Random victims, but every service (every replica and worker, in a cluster) at least once
    # when there are enough rounds.
    candidates = list(CLUSTER_NAMES if config.scenario == "cluster" else SERVICES)
    victims = candidates[:config.kills]
    victims += [rng.choice(candidates) for _ in range(config.kills - len(victims))]
    rng.shuffle(victims)
    return [Fault(victim, at, rng.uniform(0.05, 2.0)) for victim, at in zip(victims, moments)]


def wait_for_stream(platform: Platform) -> str:
    """Waits (bounded) until the integration service has its watch stream open."""
    deadline = time.monotonic() + STREAM_WAIT
    while True:
        status = integration_status(platform.address("integration"))
        if status.stream_connected:
            return "stream open"
        if time.monotonic() > deadline:
            mode = integration_pb2.FeedMode.Name(status.mode)
            return f"stream NOT open after {STREAM_WAIT:.0f}s, mode {mode}"
        time.sleep(0.1)


def inject(platform: Platform, creator: Creator, fault: Fault, number: int, total: int,
           kills: collections.Counter) -> float:
    """Runs one fault; returns the moment the service was started again."""
    note = f", {wait_for_stream(platform)}" if fault.wait_for_stream else ""
    if fault.service == "postgres":
        at = creator.count
        pid = platform.postgres.kill()
        kills["postgres"] += 1
        say(f"kill {number}/{total}: immediate shutdown of postgres (pid {pid}) at created={at}; "
            f"down for {fault.downtime:.2f}s")
        time.sleep(fault.downtime)
        restarted = time.monotonic()
        took = platform.postgres.start(platform.processes)
        say(f"restart {number}/{total}: postgres accepting after {took:.2f}s "
            f"(created={creator.count}, {creator.count - at} during the fault); services left "
            f"to recover by themselves")
        return restarted
    service = platform.services[fault.service]
    at = creator.count
    pid = service.kill()
    kills[fault.service] += 1
    say(f"kill {number}/{total}: SIGKILL {fault.service} (pid {pid}) at created={at}{note}; "
        f"down for {fault.downtime:.2f}s")
    time.sleep(fault.downtime)
    restarted = time.monotonic()
    took = platform.start(fault.service)
    say(f"restart {number}/{total}: {fault.service} pid {service.process.pid}, SERVING after "
        f"{took:.2f}s (created={creator.count}, {creator.count - at} during the fault)")
    return restarted


def measure_drain(platform: Platform, creator: Creator, restarted: float, timeout: float) -> None:
    """Reports how long after `restarted` every customer created before it had its package."""
    backlog = creator.created_ids()
    head = crm_head(platform.address("crm"))
    scanner = PackageScanner(platform.address("inventory"))
    try:
        waiting = len(backlog - set(scanner.refresh()))
    finally:
        scanner.close()
    say(f"backlog: {waiting} of {len(backlog)} customers created before the restart had no "
        f"package yet")
    problem = wait_for_packages(platform, backlog, head, restarted + timeout, settle=False)
    if problem:
        say(f"backlog NOT drained ({time.monotonic() - restarted:.2f}s after the restart): "
            f"{problem}")
    else:
        say(f"backlog drained {time.monotonic() - restarted:.2f}s after the restart "
            f"({waiting} packages)")


def run_faults(platform: Platform, creator: Creator, faults: list, config,
               kills: collections.Counter) -> None:
    for number, fault in enumerate(faults, 1):
        creator.wait_until(fault.at_count)
        if number > 1:
            time.sleep(MIN_FAULT_GAP)  # let the restarted service work before the next kill
        restarted = inject(platform, creator, fault, number, len(faults), kills)
        if fault.measure_drain:
            measure_drain(platform, creator, restarted, config.settle_timeout)


# ---------------------------------------------------------------------------------------------
# Settling and checking


def wait_for_packages(platform: Platform, customers: set, head: int, deadline: float,
                      settle: bool) -> str | None:
    """Waits until each of `customers` has a package and, with `settle`, the integration's
    checkpoint has also reached `head` (so no redelivery is still to come). Returns None then.
    Otherwise returns what is missing: at the deadline, or as soon as the checkpoint is at
    `head` with customers still waiting, since every event up to it is already handled."""
    scanner = PackageScanner(platform.address("inventory"))
    try:
        while True:
            # Status before packages: every package the checkpoints cover exists by then. In
            # a cluster every worker's checkpoints count, and only once every partition has an
            # owner (a killed worker's wait for their leases to expire).
            statuses = [integration_status(address)
                        for address in platform.addresses("integration")]
            waiting = len(customers - set(scanner.refresh()))
            status = min(statuses, key=lambda s: s.checkpoint_sequence)
            owned = sum(len(s.partitions) for s in statuses)
            caught_up = (status.checkpoint_sequence >= head
                         and owned >= max(s.partition_count for s in statuses))
            if not waiting and (caught_up or not settle):
                return None
            if caught_up or time.monotonic() > deadline:
                return (f"{waiting} customers without a package; integration checkpoint at "
                        f"{status.checkpoint_sequence} of CRM head {head}"
                        f"{' (every event handled)' if caught_up else ''}, lag "
                        f"{status.lag_events}, dead letters {status.dead_letters_pending}, "
                        f"mode {integration_pb2.FeedMode.Name(status.mode)}")
            time.sleep(0.1)
    finally:
        scanner.close()


def print_dead_letters(platform: Platform, limit: int = 5) -> None:
    """Shows the integration service's dead letters: why a package is missing."""
    with grpc.insecure_channel(platform.address("integration")) as channel:
        stub = integration_pb2_grpc.IntegrationServiceStub(channel)
        listing = stub.ListDeadLetters(integration_pb2.ListDeadLettersRequest(page_size=limit),
                                       timeout=CALL_TIMEOUT)
    for letter in listing.dead_letters:
        say(f"  dead letter: customer {letter.customer_id} after {letter.attempts} attempt(s): "
            f"{letter.reason}")


@dataclasses.dataclass
class Outcome:
    created: int
    in_crm: int
    packaged: int
    missing: list  # created customers without a welcome package
    duplicated: list  # created customers with more than one
    lost: list  # acknowledged creates that ListCustomers does not return
    unexpected: list  # customers or packaged customers nobody created

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.lost or self.unexpected)


def check_invariant(platform: Platform, expected: set) -> Outcome:
    """Reads every customer and package request afresh, through the public APIs only."""
    crm_ids = list_customers(platform.address("crm"))
    scanner = PackageScanner(platform.address("inventory"))
    try:
        packages = scanner.refresh()
    finally:
        scanner.close()
    in_crm = set(crm_ids)
    listed_twice = {c for c, n in collections.Counter(crm_ids).items() if n > 1}
    return Outcome(
        created=len(expected),
        in_crm=len(in_crm),
        packaged=sum(1 for c in expected if packages[c] >= 1),
        missing=sorted(c for c in expected if packages[c] == 0),
        duplicated=sorted(c for c in expected if packages[c] > 1),
        lost=sorted(expected - in_crm),
        unexpected=sorted((in_crm - expected) | (set(packages) - expected) | listed_twice),
    )


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclasses.dataclass
class Config:
    scenario: str
    customers: int
    kills: int
    outage: float
    rate: float
    clients: int
    settle_timeout: float


# The cluster scenario's processes: as in `docker-compose.cluster.yml`.
CLUSTER = {"crm": 3, "inventory": 2, "integration": 2}
CLUSTER_NAMES = [f"{command}-{n}" for command, count in CLUSTER.items()
                 for n in range(1, count + 1)]


def run_scenario(config: Config, mip: str, seed: int, keep: bool) -> bool:
    """Runs one scenario on a fresh platform; returns True when the invariant held."""
    rng = random.Random(f"{seed}/{config.scenario}")
    faults = plan_faults(config, rng)
    say(f"=== scenario {config.scenario}: {config.customers} customers from {config.clients} "
        f"clients{f' at {config.rate:.0f}/s' if config.rate else ''}, {len(faults)} faults ===")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"mip-chaos-{config.scenario}-"))
    platform = Platform(mip, workdir, postgres=config.scenario == "postgres-restart",
                        replicas=CLUSTER if config.scenario == "cluster" else None)
    creator = Creator(platform.addresses("crm"), config.customers, config.clients, seed,
                      config.rate)
    kills: collections.Counter = collections.Counter()
    stop_progress = threading.Event()
    started = time.monotonic()
    ok = False
    try:
        say(f"work dir {workdir}")
        platform.start_all()
        creator.start()
        threading.Thread(target=report_progress, args=(creator, kills, stop_progress),
                         daemon=True).start()
        run_faults(platform, creator, faults, config, kills)
        creator.join()
        say(f"creates done: {creator.count} in {creator.finished - creator.started:.1f}s, "
            f"{creator.retries} retried calls, {len(creator.errors)} permanent errors")
        stop_progress.set()
        expected = creator.created_ids()
        unsettled = wait_for_packages(platform, expected, crm_head(platform.address("crm")),
                                      creator.finished + config.settle_timeout, settle=True)
        if unsettled:
            say(f"NOT settled: {unsettled}")
        else:
            say(f"settled {time.monotonic() - creator.finished:.1f}s after the last create")
        outcome = check_invariant(platform, expected)
        restarted = (platform.restarted_services() if config.scenario == "postgres-restart"
                     else [])
        if restarted:
            say(f"services that did not ride out the database outage: {', '.join(restarted)}")
        ok = (outcome.ok and not unsettled and not creator.errors and not restarted
              and creator.count == config.customers)
        print_outcome(platform, config, outcome, creator, kills, time.monotonic() - started)
        if not ok:
            print_dead_letters(platform)
        say(f"{'PASS' if ok else 'FAIL'} {config.scenario}")
        return ok
    except (ChaosFailure, grpc.RpcError) as failure:
        say(f"FAIL {config.scenario}: {failure}")
        return False
    finally:
        # A second Ctrl-C or the timeout must not cut the cleanup short; they land afterwards.
        signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
        stop_progress.set()
        creator.stop.set()
        platform.stop_all()
        if not ok:
            platform.print_log_tails()
            say(f"logs and data kept in {workdir}")
        elif keep:
            say(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CLEANUP_SIGNALS)


def print_outcome(platform: Platform, config: Config, outcome: Outcome, creator: Creator,
                  kills: collections.Counter, elapsed: float) -> None:
    per_service = ", ".join(f"{name} {count}" for name, count in sorted(kills.items()) if count)
    say(f"result {config.scenario}: created={outcome.created} in_crm={outcome.in_crm} "
        f"packaged={outcome.packaged} missing={len(outcome.missing)} "
        f"duplicated={len(outcome.duplicated)} lost={len(outcome.lost)} "
        f"unexpected={len(outcome.unexpected)} kills={sum(kills.values())}"
        f"{f' ({per_service})' if per_service else ''} elapsed={elapsed:.1f}s")
    status = integration_status(platform.address("integration"))
    say(f"  integration: delivered={status.delivered} retried={status.retried} "
        f"dead_lettered={status.dead_lettered} mode_switches={status.mode_switches} "
        f"mode={integration_pb2.FeedMode.Name(status.mode)}")
    for label, ids in [("missing", outcome.missing), ("duplicated", outcome.duplicated),
                       ("lost", outcome.lost), ("unexpected", outcome.unexpected)]:
        if ids:
            say(f"  {label}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    for index, code, details in creator.errors[:5]:
        say(f"  create #{index} failed permanently: {code} {details}")
    if creator.count != config.customers:
        say(f"  only {creator.count} of {config.customers} creates were acknowledged")


def make_config(args, scenario: str, customers: int, kills: int, outage: float) -> Config:
    rate = args.rate
    if rate is None:
        # Faults must happen under load, so creation is paced to span them: about twice the
        # outage (which starts a quarter of the way in), or a slice per CRM restart long enough
        # for the integration service to get back on the stream (after a few failures it
        # polls, and probes the stream every 10 s). `kills` goes flat out.
        span = {"inventory-outage": 2 * outage,
                "crm-restart-during-watch": kills * STREAM_SLICE}.get(scenario)
        rate = customers / span if span else 0
    settle_timeout = args.settle_timeout or (60.0 if args.short else 120.0)
    return Config(scenario, customers, kills, outage, rate, args.clients, settle_timeout)


def configs(args) -> list:
    if args.short:
        short = [make_config(args, "kills", 3000, 4, 0),
                 make_config(args, "inventory-outage", 1500, 0, 5.0),
                 make_config(args, "crm-restart-during-watch", 3000, 2, 0)]
        if postgres_bin() is not None or os.environ.get("MIP_REQUIRE_POSTGRES") == "1":
            short.append(make_config(args, "postgres-restart", 3000, 2, 0))
            short.append(make_config(args, "cluster", 4000, 6, 0))
        else:
            say("skipping postgres-restart: PostgreSQL's binaries are not installed")
        return short
    scenario = "cluster" if args.cluster else args.scenario
    kills = args.kills if args.kills is not None else (
        {"crm-restart-during-watch": 6, "postgres-restart": 5, "cluster": 15}.get(scenario, 20))
    return [make_config(args, scenario, args.customers, kills, args.outage)]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--scenario", default="kills",
                        choices=["kills", "inventory-outage", "crm-restart-during-watch",
                                 "postgres-restart", "cluster"],
                        help="fault scenario (default: kills)")
    parser.add_argument("--cluster", action="store_true",
                        help="the cluster scenario: 3 CRM, 2 Inventory, 2 workers on PostgreSQL, "
                             "a random replica or worker SIGKILLed --kills times (default 15)")
    parser.add_argument("--short", action="store_true",
                        help="CI version, a few minutes with the debug build: kills (3000 "
                             "customers, 4 kills), inventory-outage (1500, 5 s), "
                             "crm-restart-during-watch (3000, 2 restarts) and postgres-restart "
                             "(3000, 2 restarts) and cluster (4000, 6 kills), where "
                             "PostgreSQL is installed; ignores "
                             "--scenario, --customers, --kills and --outage")
    parser.add_argument("--customers", type=int, default=50_000, help="customers to create (50000)")
    parser.add_argument("--kills", type=int, default=None,
                        help="kill rounds (default 20; 6 for crm-restart-during-watch, 5 for "
                             "postgres-restart)")
    parser.add_argument("--outage", type=float, default=30.0,
                        help="seconds Inventory stays down in inventory-outage (30)")
    parser.add_argument("--rate", type=float, default=None,
                        help="customers/s in all, 0 = unthrottled (default: unthrottled for "
                             "kills; the other scenarios pace creation to span their faults)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (4)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--settle-timeout", type=float, default=None,
                        help="seconds to wait for every package after the last create "
                             "(default 120; 60 with --short)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for the whole run (default 900; 360 with --short)")
    parser.add_argument("--mip", default=DEFAULT_MIP, help="the mip binary ($MIP_BIN or "
                        "target/debug/mip)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir on success too")
    return parser.parse_args()


def on_signal(signum, _frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def main() -> int:
    args = parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    timeout = args.timeout or (360.0 if args.short else 900.0)
    print(f"chaos.py seed={seed} (rerun with --seed {seed}) mip={args.mip} timeout={timeout:.0f}s",
          flush=True)
    if not os.access(args.mip, os.X_OK):
        print(f"no mip binary at {args.mip}: run `cargo build --bin mip` or pass --mip",
              file=sys.stderr)
        return 2
    load_stubs()
    for signum in CLEANUP_SIGNALS:
        signal.signal(signum, on_signal)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    results = {}
    try:
        for config in configs(args):
            results[config.scenario] = run_scenario(config, args.mip, seed, args.keep)
    except Interrupted as interruption:
        reason = f"timeout after {timeout:.0f}s" if "SIGALRM" in str(interruption) else interruption
        say(f"FAIL: {reason}; all child processes killed")
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    summary = ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in results.items())
    say(f"chaos.py seed={seed}: {summary}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
