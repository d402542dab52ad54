"""Real `mip` processes for the client's tests: free loopback ports, temporary data
directories, readiness by health check, and every process killed when its test ends.

The binary is $MIP_BIN, or the repository's target/debug/mip.
"""

import atexit
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mip_client.crm.v1 import crm_pb2, crm_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[3]
MIP = os.environ.get("MIP_BIN", str(ROOT / "target" / "debug" / "mip"))

# Channel options that make a restarted server reachable again quickly: grpc's default
# reconnect backoff starts at a second and grows to two minutes.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# Every process started here and not yet reaped, and every temporary directory not yet
# removed: cleaned up at exit, and on SIGTERM (which is how `timeout` ends an overrunning
# run), so nothing outlives the test run even when a test's own cleanup never gets to run.
_RUNNING = set()
_DIRECTORIES = set()


def _clean_up() -> None:
    for process in list(_RUNNING):
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        _RUNNING.discard(process)
    for directory in list(_DIRECTORIES):
        shutil.rmtree(directory, ignore_errors=True)
        _DIRECTORIES.discard(directory)


def _on_sigterm(signum, frame):
    _clean_up()
    raise KeyboardInterrupt("SIGTERM")


atexit.register(_clean_up)
if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Crm:
    """One `mip crm` process that a test can kill and start again on the same port and data
    directory, as an operator's restart would."""

    def __init__(self, test: unittest.TestCase, *flags: str):
        if not os.path.exists(MIP):
            raise unittest.SkipTest(f"no mip binary at {MIP}: build it or set MIP_BIN")
        self.work = tempfile.mkdtemp(prefix="mip-py-test-")
        _DIRECTORIES.add(self.work)
        test.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flags = list(flags)
        self.process = None
        self.starts = 0
        test.addCleanup(self.kill)

    def start(self, *flags: str, timeout: float = 30.0) -> None:
        """Starts the process (with `flags` instead of the constructor's, if given) and waits
        until it answers its health check SERVING."""
        if flags:
            self.flags = list(flags)
        self.starts += 1
        log = open(os.path.join(self.work, f"crm-{self.starts}.log"), "w")
        self.process = subprocess.Popen(
            [MIP, "crm", "--listen", self.address, "--data-dir", os.path.join(self.work, "data"),
             *self.flags],
            stdout=log, stderr=subprocess.STDOUT,
        )
        _RUNNING.add(self.process)
        log.close()
        self.wait_serving(timeout)

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"mip crm exited with {self.process.returncode}: {self.log()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"mip crm not SERVING after {timeout} s: {self.log()}")
                try:
                    # wait_for_ready: the call waits for the port to open instead of failing.
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service="crm.v1.CrmService"),
                        timeout=min(remaining, 1.0), wait_for_ready=True,
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or closed gracefully."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        _RUNNING.discard(self.process)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator's stop, then SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        _RUNNING.discard(self.process)

    def log(self) -> str:
        path = os.path.join(self.work, f"crm-{self.starts}.log")
        return open(path).read()[-3000:] if os.path.exists(path) else ""

    def channel(self, test: unittest.TestCase) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address, options=FAST_RECONNECT)
        test.addCleanup(channel.close)
        return channel


class Writer:
    """Creates customers one at a time, each with its own request_id, retrying a failed call
    with the same request_id until it succeeds: across a CRM restart every customer is
    created exactly once, and `ids` lists them in creation order."""

    def __init__(self, channel: grpc.Channel):
        self.crm = crm_pb2_grpc.CrmServiceStub(channel)
        self.ids = []
        self.lock = threading.Lock()

    def create(self, count: int, deadline: float) -> list:
        created = []
        for _ in range(count):
            suffix = uuid.uuid4().hex[:12]
            request = crm_pb2.CreateCustomerRequest(
                name=f"Customer {suffix}", email=f"c.{suffix}@example.com",
                request_id=str(uuid.uuid4()),
            )
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("could not create a customer before the deadline")
                try:
                    customer = self.crm.CreateCustomer(request, timeout=2, wait_for_ready=True)
                    break
                except grpc.RpcError as error:
                    if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                            grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    time.sleep(0.05)  # CRM is restarting; the retry is idempotent
            with self.lock:
                self.ids.append(customer.id)
            created.append(customer.id)
        return created


class Consumer:
    """Iterates a follower on its own thread, so a test can change the world (kill CRM,
    create customers) while it runs, and wait for what it has seen with a deadline."""

    def __init__(self, test: unittest.TestCase, follower, on_item=None):
        self.follower = follower
        self.items = []
        self.error = None
        self.on_item = on_item
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        test.addCleanup(self.stop)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.follower:
                if self.on_item:
                    self.on_item(item)
                with self.changed:
                    self.items.append(item)
                    self.changed.notify_all()
        except Exception as error:  # noqa: BLE001 - handed to the test
            with self.changed:
                self.error = error
                self.changed.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        """Waits until `predicate(items)` holds; fails the test with `what` at the deadline.
        Checked on every new item, and every 50 ms for predicates on the follower's state."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.items):
                if self.error is not None:
                    raise self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                         f"have {len(self.items)} items, "
                                         f"stats {self.follower.stats}")
                self.changed.wait(min(remaining, 0.05))

    def stop(self) -> None:
        self.follower.close()
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            raise AssertionError("the follower did not stop within 10 s of close()")


def bound(test: unittest.TestCase, seconds: int) -> None:
    """Fails `test` with TimeoutError if it runs longer than `seconds` (cleanups still run,
    so no process outlives it)."""

    def expired(signum, frame):
        raise TimeoutError(f"{test.id()} took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    test.addCleanup(signal.signal, signal.SIGALRM, previous)
    test.addCleanup(signal.alarm, 0)
