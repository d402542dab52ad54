/**
 * The whole platform demo from TypeScript, with the clients generated from ../../proto.
 *
 * 1. Checks that CRM, Inventory and the integration service report SERVING (grpc.health.v1).
 * 2. Lists customers to get a resume token, and watches the customer stream from it.
 * 3. Creates a customer twice with the same request_id: one customer.
 * 4. Sees its CREATED event, disconnects, creates a second customer, and resumes the watch
 *    from the saved token: the second customer arrives, the first is not repeated.
 * 5. Waits until the integration service has created both welcome packages in Inventory.
 * 6. Follows the feed with the package's follower from the first token: both CREATED events.
 * 7. Sends an invalid customer and decodes the error's BadRequest field violations (and its
 *    ErrorInfo, when the server sends one).
 *
 * Run `npm run build` first, with `mip all` running, then `npm run demo`. Exits 0 on success,
 * 1 if a step fails, with the reason.
 *
 * @module
 */
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

import {
  CrmErrorReason,
  createCrmClient,
  createHealthClient,
  createInventoryClient,
  createPlatformTransport,
  errorDetails,
  followCustomers,
  type ConnectOptions,
  type CrmClient,
} from "./index.js";
import { CustomerEventType, type Customer, type CustomerEvent } from "./gen/crm/v1/crm_pb.js";
import { HealthCheckResponse_ServingStatus } from "./gen/health/v1/health_pb.js";

const SERVICES = {
  crm: "crm.v1.CrmService",
  inventory: "inventory.v1.InventoryService",
  integration: "integration.v1.IntegrationService",
} as const;

type ServiceName = keyof typeof SERVICES;

const USAGE = `Usage: node dist/src/demo.js [options]

  --crm ADDRS          CRM address, or replicas comma-separated (default 127.0.0.1:50051)
  --inventory ADDR     Inventory address (default 127.0.0.1:50052)
  --integration ADDR   integration service address (default 127.0.0.1:50053)
  --timeout SECONDS    deadline of each step (default 10)
  --ca FILE            PEM CA certificate: use TLS and trust this CA
  --cert FILE          PEM client certificate, for mutual TLS
  --key FILE           PEM key of --cert
  --token-file FILE    file whose first line is the bearer token`;

/** Checks one server's health for `name`; throws unless it is SERVING. */
async function checkOne(
  name: ServiceName,
  address: string,
  connect: ConnectOptions,
  timeoutMs: number,
): Promise<void> {
  // Health answers without a token, as probes do.
  const { token: _token, ...withoutToken } = connect;
  const health = createHealthClient(createPlatformTransport(address, withoutToken));
  const response = await health.check({ service: SERVICES[name] }, { timeoutMs });
  const status = HealthCheckResponse_ServingStatus[response.status] ?? String(response.status);
  console.log(`health ${name.padEnd(12)} ${address.padEnd(18)} ${status}`);
  if (response.status !== HealthCheckResponse_ServingStatus.SERVING) {
    throw new Error(`${name} is ${status}`);
  }
}

/**
 * Checks every service; each maps to one address or several, comma-separated (replicas).
 * Returns the address chosen for each: the first replica that answers SERVING.
 */
async function checkHealth(
  addresses: Record<ServiceName, string>,
  connect: ConnectOptions,
  timeoutMs: number,
): Promise<Record<ServiceName, string>> {
  const chosen: Partial<Record<ServiceName, string>> = {};
  for (const name of Object.keys(SERVICES) as ServiceName[]) {
    const replicas = addresses[name].split(",").map((address) => address.trim());
    if (replicas.some((address) => address === "")) {
      throw new Error(`--${name} ${JSON.stringify(addresses[name])} has an empty address`);
    }
    for (const [index, address] of replicas.entries()) {
      try {
        await checkOne(name, address, connect, timeoutMs);
        chosen[name] = address;
        break;
      } catch (error) {
        if (index + 1 === replicas.length) {
          throw error;
        }
        const reason = error instanceof ConnectError ? Code[error.code] : String(error);
        console.log(`health ${name.padEnd(12)} ${address.padEnd(18)} ${reason}; trying the next replica`);
      }
    }
  }
  return chosen as Record<ServiceName, string>;
}

/**
 * Watches from `token` until an event for `customerId` arrives, and returns it; fails on any
 * event at or below `after` (a repeat) and after `timeoutMs`. The stream is closed on return:
 * that is the disconnect the resume is tested against.
 */
async function watchFor(
  crm: CrmClient,
  token: string,
  customerId: string,
  after: bigint,
  timeoutMs: number,
): Promise<CustomerEvent> {
  const stop = new AbortController();
  const timer = setTimeout(() => stop.abort(), timeoutMs);
  try {
    for await (const message of crm.watchCustomers({ resumeToken: token }, { signal: stop.signal })) {
      if (message.kind.case !== "event") {
        continue;
      }
      const event = message.kind.value;
      if (event.sequence <= after) {
        throw new Error(`the resumed watch repeated the event at sequence ${event.sequence}`);
      }
      if (event.customer?.id === customerId) {
        return event;
      }
    }
    throw new Error("the watch stream ended before the event arrived");
  } catch (error) {
    if (stop.signal.aborted) {
      throw new Error(`no event for customer ${customerId} on the watch stream within ${timeoutMs} ms`);
    }
    throw error;
  } finally {
    clearTimeout(timer);
    stop.abort();
  }
}

function describe(event: CustomerEvent): string {
  const kind = CustomerEventType[event.type] ?? String(event.type);
  return `${kind} for ${event.customer?.id} at sequence ${event.sequence}`;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      crm: { type: "string", default: "127.0.0.1:50051" },
      inventory: { type: "string", default: "127.0.0.1:50052" },
      integration: { type: "string", default: "127.0.0.1:50053" },
      timeout: { type: "string", default: "10" },
      ca: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
      "token-file": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const timeoutMs = Number(values.timeout) * 1000;
  if (!(timeoutMs > 0)) {
    throw new Error(`--timeout ${values.timeout} is not a positive number of seconds`);
  }
  const connect: ConnectOptions = {};
  if (values.ca !== undefined) connect.caFile = values.ca;
  if (values.cert !== undefined) connect.certFile = values.cert;
  if (values.key !== undefined) connect.keyFile = values.key;
  if (values["token-file"] !== undefined) {
    connect.token = readFileSync(values["token-file"], "utf8").split(/\s+/)[0] ?? "";
  }

  const chosen = await checkHealth(
    { crm: values.crm, inventory: values.inventory, integration: values.integration },
    connect,
    timeoutMs,
  );
  const crm = createCrmClient(createPlatformTransport(chosen.crm, connect));
  const inventory = createInventoryClient(createPlatformTransport(chosen.inventory, connect));

  const snapshot = await crm.listCustomers({ pageSize: 1 }, { timeoutMs });
  console.log(`watching from resume token ${snapshot.resumeToken}`);

  const suffix = randomUUID().replaceAll("-", "").slice(0, 12);
  // lowerCamelCase, as in every generated TypeScript type: `requestId` is the proto's
  // `request_id`, and a misspelt field does not compile.
  const request = {
    name: "Grace Hopper",
    email: `grace.${suffix}@example.com`,
    requestId: randomUUID(),
  };
  const first = await crm.createCustomer(request, { timeoutMs });
  const again = await crm.createCustomer(request, { timeoutMs });
  if (again.id !== first.id) {
    throw new Error("a repeated request_id created a second customer");
  }
  console.log(`created customer ${first.id} <${first.email}> (repeat returned the same id)`);

  // From the token taken before the create: the stream replays what came after it.
  const seen = await watchFor(crm, snapshot.resumeToken, first.id, snapshot.resumeSequence, timeoutMs);
  console.log(`stream delivered ${describe(seen)}; disconnected, saved its token`);

  const second = await crm.createCustomer(
    { name: "Edsger Dijkstra", email: `edsger.${suffix}@example.com`, requestId: randomUUID() },
    { timeoutMs },
  );
  console.log(`created customer ${second.id} while disconnected`);
  const resumed = await watchFor(crm, seen.resumeToken, second.id, seen.sequence, timeoutMs);
  console.log(`resumed stream delivered ${describe(resumed)}; nothing repeated`);

  for (const customer of [first, second]) {
    await waitForPackage(inventory, customer, timeoutMs);
  }

  await followBoth(crm, snapshot.resumeToken, [first.id, second.id], timeoutMs);

  await decodeBadRequest(crm, timeoutMs);
  console.log("demo passed");
}

/**
 * The package's follower from the token taken at the start: both customers' CREATED events,
 * in order, each once; then it is closed.
 */
async function followBoth(crm: CrmClient, token: string, ids: string[], timeoutMs: number): Promise<void> {
  const follower = followCustomers(crm, { token, callTimeoutMs: timeoutMs });
  const timer = setTimeout(() => follower.close(), timeoutMs);
  const seen: string[] = [];
  try {
    for await (const item of follower) {
      // Other clients may create customers meanwhile: only these two are checked.
      const id = item.kind === "event" ? item.event.customer?.id ?? "" : "";
      if (item.kind === "event" && ids.includes(id) && item.event.type === CustomerEventType.CREATED) {
        seen.push(id);
        if (seen.length === ids.length) {
          break;
        }
      }
    }
  } finally {
    clearTimeout(timer);
    follower.close();
  }
  if (JSON.stringify(seen) !== JSON.stringify(ids)) {
    throw new Error(`the follower handed over ${JSON.stringify(seen)}, expected ${JSON.stringify(ids)}`);
  }
  console.log(`follower from the first token handed over both CREATED events; token to save ${follower.token}`);
}

/** Waits for the integration service's welcome package for `customer`: exactly one. */
async function waitForPackage(
  inventory: ReturnType<typeof createInventoryClient>,
  customer: Customer,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const listing = await inventory.listPackageRequests({ customerId: customer.id }, { timeoutMs });
    if (listing.packageRequests.length > 1) {
      throw new Error(`${listing.packageRequests.length} packages for one customer`);
    }
    const found = listing.packageRequests[0];
    if (found !== undefined) {
      const delay =
        found.createTime && customer.createTime
          ? timestampMs(found.createTime) - timestampMs(customer.createTime)
          : NaN;
      console.log(
        `package request ${found.id} (${found.packageType}) for ${customer.id} ` +
          `created ${delay.toFixed(1)} ms after the customer`,
      );
      return;
    }
    // The package is created asynchronously, by another service; look again shortly.
    await sleep(50);
  }
  throw new Error(`no package request appeared in Inventory for ${customer.id}`);
}

/** An invalid customer: INVALID_ARGUMENT, with a field violation per bad field. */
async function decodeBadRequest(crm: CrmClient, timeoutMs: number): Promise<void> {
  try {
    await crm.createCustomer({ name: "", email: "not-an-email" }, { timeoutMs });
  } catch (error) {
    if (!(error instanceof ConnectError) || error.code !== Code.InvalidArgument) {
      throw error;
    }
    const details = errorDetails(error);
    console.log(`invalid customer refused: ${Code[error.code]}: ${error.rawMessage}`);
    for (const violation of details.fieldViolations) {
      console.log(`  field violation ${violation.field}: ${violation.description}`);
    }
    const fields = details.fieldViolations.map((violation) => violation.field);
    if (!fields.includes("name") || !fields.includes("email")) {
      throw new Error(`expected field violations for name and email, got ${JSON.stringify(fields)}`);
    }
    const info = details.errorInfo;
    if (info === undefined) {
      console.log("  no ErrorInfo on this error (the server sends none for it)");
    } else {
      const metadata = Object.entries(info.metadata)
        .map(([key, value]) => `${key}=${value}`)
        .join(" ");
      console.log(`  error info reason ${info.reason} domain ${info.domain} ${metadata}`.trimEnd());
      // The reasons are a contract: each is a value of the service's ErrorReason enum.
      if (!(info.reason in CrmErrorReason)) {
        throw new Error(`ErrorInfo reason ${info.reason} is not a value of crm.v1.ErrorReason`);
      }
    }
    return;
  }
  throw new Error("an invalid customer was accepted");
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    const message = error instanceof Error ? error.message : String(error);
    console.error(`demo failed: ${message}`);
    process.exit(1);
  },
);
