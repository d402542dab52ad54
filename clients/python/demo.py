#!/usr/bin/env python3
"""The whole platform demo from Python, with the mip_client package.

1. Checks that CRM, Inventory and the integration service report SERVING (standard health).
2. Lists customers to get a resume token, and follows the customer feed from it
   (mip_client.follow_customers).
3. Creates a customer (idempotently, with a request_id).
4. Sees the customer's CREATED event arrive on the feed.
5. Waits until the integration service has created its welcome package in Inventory.

Install the package first (`pip install ./clients/python`), with `mip all` running. Exits 0
on success, 1 if a step fails, with the reason on one line.

The services' addresses default to what `mip all` serves on; --crm, --inventory and
--integration change them:

    python3 clients/python/demo.py --crm 127.0.0.1:50051 --inventory 127.0.0.1:50052 \
        --integration 127.0.0.1:50053

Against a cluster, give every CRM replica, comma-separated; the demo uses the first one that
answers SERVING and tries the next when one is unreachable:

    python3 clients/python/demo.py --crm 127.0.0.1:50051,127.0.0.1:50061,127.0.0.1:50071

With security on (see `mip dev-certs`), pass the same files the platform uses:

    python3 clients/python/demo.py --ca certs/ca.pem --cert certs/client.pem \
        --key certs/client-key.pem --token-file certs/token
"""

import argparse
import pathlib
import queue
import sys
import threading
import time
import uuid

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mip_client import follow_customers
    from mip_client.crm.v1 import crm_pb2, crm_pb2_grpc
    from mip_client.inventory.v1 import inventory_pb2, inventory_pb2_grpc
except ImportError as missing:
    sys.exit(f"demo failed: {missing}; install the client first: pip install ./clients/python")

SERVICES = {
    "crm": "crm.v1.CrmService",
    "inventory": "inventory.v1.InventoryService",
    "integration": "integration.v1.IntegrationService",
}


class Connector:
    """Opens channels: plain text, or TLS (with a client certificate for mutual TLS) plus the
    bearer token on every call."""

    def __init__(self, args: argparse.Namespace):
        read = lambda path: pathlib.Path(path).read_bytes() if path else None  # noqa: E731
        self.tls = None
        if args.ca:
            self.tls = grpc.ssl_channel_credentials(
                root_certificates=read(args.ca),
                private_key=read(args.key),
                certificate_chain=read(args.cert),
            )
        self.token = read(args.token_file).decode().split()[0] if args.token_file else None
        if self.token and not self.tls:
            raise RuntimeError("--token-file needs --ca: gRPC sends tokens only over TLS")

    def channel(self, address: str, with_token: bool = True) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address)
        credentials = self.tls
        if self.token and with_token:
            credentials = grpc.composite_channel_credentials(
                self.tls, grpc.access_token_call_credentials(self.token)
            )
        return grpc.secure_channel(address, credentials)


def check_one(connector: Connector, name: str, address: str, timeout: float) -> None:
    # Health answers without a token, as probes do.
    with connector.channel(address, with_token=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=SERVICES[name]), timeout=timeout
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"health {name:<12} {address:<18} {status}")
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{name} is {status}")


def unreachable(name: str, address: str, error: grpc.RpcError) -> str:
    """One line, with a hint, for a service that did not answer its health check."""
    hint = ""
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = f": is `mip all` running on {address}? (--{name} sets the address)"
    return f"{name} at {address}: {error.code().name}{hint}"


def check_health(connector: Connector, addresses: dict, timeout: float) -> dict:
    """Checks every service; `addresses` maps a name to one address or several,
    comma-separated (replicas). Returns the address chosen for each: the first replica that
    answers SERVING, so an unreachable or unready replica is skipped."""
    chosen = {}
    for name, spec in addresses.items():
        replicas = [address.strip() for address in spec.split(",")]
        if not all(replicas):
            raise RuntimeError(f"--{name} {spec!r} has an empty address")
        for index, address in enumerate(replicas):
            try:
                check_one(connector, name, address, timeout)
            except (grpc.RpcError, RuntimeError) as error:
                if index + 1 == len(replicas):
                    if isinstance(error, grpc.RpcError):
                        raise RuntimeError(unreachable(name, address, error)) from None
                    raise
                reason = error.code().name if isinstance(error, grpc.RpcError) else error
                print(f"health {name:<12} {address:<18} {reason}; trying the next replica")
                continue
            chosen[name] = address
            break
    return chosen


def watch(crm: crm_pb2_grpc.CrmServiceStub, token: str, events: queue.Queue, follower_box: list):
    """Puts every event the follower yields on `events`, and its error if it stops on one."""
    try:
        with follow_customers(crm, token=token) as follower:
            follower_box.append(follower)
            for item in follower:
                events.put(item)
    except grpc.RpcError as error:
        events.put(error)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--crm", default="127.0.0.1:50051", help="CRM address, or replicas comma-separated"
    )
    parser.add_argument("--inventory", default="127.0.0.1:50052", help="Inventory address")
    parser.add_argument(
        "--integration", default="127.0.0.1:50053", help="integration service address"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--ca", help="PEM CA certificate: use TLS and trust this CA")
    parser.add_argument("--cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--key", help="PEM key of --cert")
    parser.add_argument("--token-file", help="file whose first line is the bearer token")
    return parser.parse_args()


def main(args: argparse.Namespace) -> int:
    connector = Connector(args)

    chosen = check_health(
        connector,
        {"crm": args.crm, "inventory": args.inventory, "integration": args.integration},
        args.timeout,
    )

    crm_channel = connector.channel(chosen["crm"])
    crm = crm_pb2_grpc.CrmServiceStub(crm_channel)
    inventory = inventory_pb2_grpc.InventoryServiceStub(connector.channel(chosen["inventory"]))

    snapshot = crm.ListCustomers(crm_pb2.ListCustomersRequest(page_size=1), timeout=args.timeout)
    print(f"following the feed from resume token {snapshot.resume_token}")
    events: queue.Queue = queue.Queue()
    follower_box: list = []
    watcher = threading.Thread(
        target=watch, args=(crm, snapshot.resume_token, events, follower_box), daemon=True
    )
    watcher.start()

    suffix = uuid.uuid4().hex[:12]
    request = crm_pb2.CreateCustomerRequest(
        name="Grace Hopper",
        email=f"grace.{suffix}@example.com",
        request_id=str(uuid.uuid4()),
    )
    customer = crm.CreateCustomer(request, timeout=args.timeout)
    again = crm.CreateCustomer(request, timeout=args.timeout)
    if again.id != customer.id:
        raise RuntimeError("a repeated request_id created a second customer")
    print(f"created customer {customer.id} <{customer.email}> (repeat returned the same id)")

    deadline = time.monotonic() + args.timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError("the CREATED event did not arrive on the watch stream")
        try:
            item = events.get(timeout=remaining)
        except queue.Empty:
            raise RuntimeError("the CREATED event did not arrive on the watch stream") from None
        if isinstance(item, grpc.RpcError):
            raise item
        if item.event is not None and item.customer.id == customer.id:
            kind = crm_pb2.CustomerEventType.Name(item.event.type)
            print(f"feed delivered {kind} for {item.customer.id} at sequence {item.sequence}"
                  f" ({follower_box[0].mode})")
            break
    follower_box[0].close()

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        listing = inventory.ListPackageRequests(
            inventory_pb2.ListPackageRequestsRequest(customer_id=customer.id),
            timeout=args.timeout,
        )
        if listing.package_requests:
            if len(listing.package_requests) != 1:
                raise RuntimeError(f"{len(listing.package_requests)} packages for one customer")
            package = listing.package_requests[0]
            delay = (
                package.create_time.ToNanoseconds() - customer.create_time.ToNanoseconds()
            ) / 1e6
            print(
                f"package request {package.id} ({package.package_type}) "
                f"created {delay:.1f} ms after the customer"
            )
            print("demo passed")
            crm_channel.close()
            return 0
        time.sleep(0.05)
    raise RuntimeError("no package request appeared in Inventory")


def describe(error: Exception, args: argparse.Namespace) -> str:
    """One line for a failure: grpc's own errors print a multi-line dump of call internals."""
    if not isinstance(error, grpc.RpcError):
        return str(error)
    code = error.code()
    line = f"{code.name}: {error.details()}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        line += " (did a service stop during the demo?)"
    return line


if __name__ == "__main__":
    arguments = parse_args()
    try:
        sys.exit(main(arguments))
    except Exception as error:  # noqa: BLE001 - one clear line for any failure
        print(f"demo failed: {describe(error, arguments)}", file=sys.stderr)
        sys.exit(1)
