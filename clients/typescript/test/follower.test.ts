/**
 * The follower against the real CRM: a restart mid-stream, watching disabled, and a token that
 * retention has overtaken. Each test compares what the follower handed over with what it
 * created: nothing missed, nothing repeated.
 *
 * @module
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, test } from "node:test";

import { Code, ConnectError } from "@connectrpc/connect";

import {
  RESUME_TOKEN_EXPIRED,
  errorReason,
  followCustomers,
  type CrmClient,
  type FollowOptions,
} from "../src/index.js";
import { CustomerEventType, type Customer, type CustomerEvent } from "../src/gen/crm/v1/crm_pb.js";
import { Collector } from "./support/collect.js";
import { CrmProcess, tempDataDir } from "./support/platform.js";

/** Per test: generous for a loaded machine, short enough that a hang fails the run. */
const TEST_TIMEOUT_MS = 90_000;
/** Per awaited outcome within a test. */
const WAIT_MS = 20_000;

/** Quick retries, so the tests spend their time on behaviour rather than on backoff. */
const FAST: FollowOptions = {
  callTimeoutMs: 3000,
  initialBackoffMs: 20,
  maxBackoffMs: 300,
  pollIntervalMs: 50,
  streamProbeIntervalMs: 300,
};

const processes: CrmProcess[] = [];
after(async () => {
  await Promise.all(processes.map((crm) => crm.kill()));
});

async function startCrm(flags: string[], dataDir = tempDataDir(), port = 0): Promise<CrmProcess> {
  const crm = await CrmProcess.start(flags, dataDir, port);
  processes.push(crm);
  return crm;
}

async function restartCrm(crm: CrmProcess, flags: string[]): Promise<CrmProcess> {
  await crm.kill();
  const again = await crm.restart(flags);
  processes.push(again);
  return again;
}

/** Creates `count` customers one after another, so their events are in this order. */
async function createCustomers(client: CrmClient, count: number, label: string): Promise<Customer[]> {
  const created: Customer[] = [];
  for (let index = 0; index < count; index += 1) {
    created.push(
      await client.createCustomer(
        { name: `${label} ${index}`, email: `${label}-${index}-${randomUUID()}@example.com`, requestId: randomUUID() },
        { timeoutMs: 5000 },
      ),
    );
  }
  return created;
}

/** The events are exactly the CREATED events of `customers`, in order, each once. */
function assertCreatedExactly(events: CustomerEvent[], customers: Customer[]): void {
  assert.deepEqual(
    events.map((event) => event.customer?.id),
    customers.map((customer) => customer.id),
    "every created customer's event, in order, each once",
  );
  for (const event of events) {
    assert.equal(event.type, CustomerEventType.CREATED);
  }
  const sequences = events.map((event) => event.sequence);
  assert.deepEqual(
    sequences,
    [...new Set(sequences)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)),
    "strictly increasing sequences",
  );
}

test("follower resumes across a CRM restart mid-stream without missing or repeating an event", { timeout: TEST_TIMEOUT_MS }, async () => {
  let crm = await startCrm([]);
  const before = await createCustomers(crm.client(), 3, "before");
  const follower = followCustomers(crm.client(), FAST);
  const collector = new Collector(follower);
  try {
    await collector.until(() => collector.events().length === 3, WAIT_MS, "the events from before the follower");
    // Live on the open stream.
    const live = await createCustomers(crm.client(), 2, "live");
    await collector.until(() => collector.events().length === 5, WAIT_MS, "the events created while streaming");
    const tokenBeforeRestart = follower.token;

    crm = await restartCrm(crm, []);
    const restarted = await createCustomers(crm.client(), 3, "restarted");
    await collector.until(() => collector.events().length >= 8, WAIT_MS, "the events created after the restart");

    assertCreatedExactly(collector.events(), [...before, ...live, ...restarted]);
    assert.ok(collector.items.every((item) => item.kind === "event"), "only events: nothing was relisted");
    assert.notEqual(follower.token, tokenBeforeRestart, "the token moved on");
    assert.equal(follower.token, collector.items.at(-1)?.token, "the follower's token is its last item's");
  } finally {
    follower.close();
    await collector.done;
  }
  assert.equal(collector.error, undefined);
});

test("follower polls while watching is disabled and returns to the stream when it is back", { timeout: TEST_TIMEOUT_MS }, async () => {
  let crm = await startCrm(["--disable-watch"]);
  const modes: string[] = [];
  const before = await createCustomers(crm.client(), 3, "polled");
  let collector: Collector | undefined;
  const follower = followCustomers(crm.client(), {
    ...FAST,
    signalLive: true,
    onModeChange: (mode) => {
      modes.push(mode);
      collector?.notify();
    },
  });
  collector = new Collector(follower);
  try {
    await collector.until(() => collector.events().length === 3, WAIT_MS, "the events, by polling");
    assert.equal(follower.mode, "poll", "UNIMPLEMENTED switched it to polling");
    await collector.until(() => collector.items.at(-1)?.kind === "live", WAIT_MS, "the caught-up signal");
    const during = await createCustomers(crm.client(), 2, "during");
    await collector.until(() => collector.events().length === 5, WAIT_MS, "the events created while polling");

    crm = await restartCrm(crm, []);
    await collector.until(() => follower.mode === "stream", WAIT_MS, "the follower to watch again");
    const streamed = await createCustomers(crm.client(), 2, "streamed");
    await collector.until(() => collector.events().length >= 7, WAIT_MS, "the events created once streaming");

    assertCreatedExactly(collector.events(), [...before, ...during, ...streamed]);
    assert.deepEqual(modes, ["poll", "stream"]);
  } finally {
    follower.close();
    await collector.done;
  }
  assert.equal(collector.error, undefined);
});

test("follower relists every customer when its token has expired, then continues from the snapshot", { timeout: TEST_TIMEOUT_MS }, async () => {
  const crm = await startCrm(["--event-retention", "1s"]);
  const client = crm.client();
  const old = (await client.listCustomers({ pageSize: 1 }, { timeoutMs: 5000 })).resumeToken;
  const pruned = await createCustomers(client, 3, "pruned");

  // Retention deletes events a second old, a tenth of that apart: wait until the token is gone.
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    try {
      await client.listCustomerEvents({ resumeToken: old }, { timeoutMs: 5000 });
    } catch (error) {
      assert.ok(error instanceof ConnectError);
      assert.equal(error.code, Code.FailedPrecondition);
      assert.equal(errorReason(error), RESUME_TOKEN_EXPIRED, "ErrorInfo carries the reason");
      break;
    }
    assert.ok(Date.now() < deadline, "retention never deleted the old events");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const recent = await createCustomers(client, 2, "recent");

  // Two customers a page: the listing spans three pages.
  const follower = followCustomers(client, { ...FAST, token: old, pageSize: 2 });
  const collector = new Collector(follower);
  try {
    await collector.until(() => collector.relisted().length === 5, WAIT_MS, "every customer, relisted");
    const relistTokens = collector.items.map((item) => item.token);
    const later = await createCustomers(client, 2, "later");
    await collector.until(() => collector.events().length >= 2, WAIT_MS, "the events after the relist");

    assert.deepEqual(
      collector.relisted().map((customer) => customer.id),
      [...pruned, ...recent].map((customer) => customer.id),
      "every current customer, once, in creation order",
    );
    // Relisted items come first, and none is a CREATED event.
    assert.deepEqual(
      collector.items.map((item) => item.kind),
      ["relisted", "relisted", "relisted", "relisted", "relisted", "event", "event"],
    );
    assertCreatedExactly(collector.events(), later);
    // Until the listing is complete the saved token stays the old one, so a program that
    // stops part-way relists again rather than skipping customers.
    assert.deepEqual(relistTokens.slice(0, 4), [old, old, old, old]);
    assert.notEqual(relistTokens[4], old);
  } finally {
    follower.close();
    await collector.done;
  }
  assert.equal(collector.error, undefined);
});

test("follower relists when CRM's database is replaced, and follows the new log from its start", { timeout: TEST_TIMEOUT_MS }, async () => {
  let crm = await startCrm([]);
  const old = await createCustomers(crm.client(), 5, "old");
  const follower = followCustomers(crm.client(), FAST);
  const collector = new Collector(follower);
  try {
    await collector.until(() => collector.events().length === 5, WAIT_MS, "the old database's events");

    // Same address, another database: the follower's token names a log this CRM never had.
    await crm.kill();
    crm = await startCrm([], tempDataDir(), Number(crm.address.split(":")[1]));
    const first = await createCustomers(crm.client(), 2, "new");
    const ids = (customers: Customer[]) => customers.map((customer) => customer.id);
    const seenNew = () => [
      ...ids(collector.relisted()),
      ...collector.events().slice(5).map((event) => event.customer?.id),
    ];
    await collector.until(() => seenNew().length >= 2, WAIT_MS, "the new database's customers");
    const second = await createCustomers(crm.client(), 2, "newer");
    await collector.until(() => seenNew().length >= 4, WAIT_MS, "the events after the relist");

    assertCreatedExactly(collector.events().slice(0, 5), old);
    // Whether the follower came back before or after the first two were created, each
    // customer of the new database arrives once: relisted, or as its event.
    assert.deepEqual(seenNew().sort(), ids([...first, ...second]).sort());
    assertCreatedExactly(collector.events().slice(-2), second);
    // The new log numbers its events from 1 again: not dropped as repeats of the old ones.
    assert.ok(collector.events().slice(-1)[0]!.sequence < 5n);
  } finally {
    follower.close();
    await collector.done;
  }
  assert.equal(collector.error, undefined);
});

test("follower signals live once the stream has replayed the backlog", { timeout: TEST_TIMEOUT_MS }, async () => {
  const crm = await startCrm([]);
  const backlog = await createCustomers(crm.client(), 3, "backlog");
  const follower = followCustomers(crm.client(), { ...FAST, signalLive: true });
  const collector = new Collector(follower);
  try {
    // CRM marks the heartbeat it sends right after the backlog `caught_up`.
    await collector.until(() => collector.items.some((item) => item.kind === "live"), WAIT_MS, "the live signal");
  } finally {
    follower.close();
    await collector.done;
  }
  assert.deepEqual(
    collector.items.map((item) => item.kind),
    ["event", "event", "event", "live"],
  );
  assertCreatedExactly(collector.events(), backlog);
  assert.equal(collector.error, undefined);
});

test("follower hands over a permanent error instead of retrying it forever", { timeout: TEST_TIMEOUT_MS }, async () => {
  const crm = await startCrm([]);
  const collector = new Collector(followCustomers(crm.client(), { ...FAST, token: "not-a-token" }));
  await collector.done;
  assert.ok(collector.error instanceof ConnectError);
  assert.equal(collector.error.code, Code.InvalidArgument);
});

test("closing an idle follower ends its iteration promptly", { timeout: TEST_TIMEOUT_MS }, async () => {
  const crm = await startCrm([]);
  const abort = new AbortController();
  const follower = followCustomers(crm.client(), { ...FAST, signal: abort.signal });
  const collector = new Collector(follower);
  await createCustomers(crm.client(), 1, "idle");
  await collector.until(() => collector.events().length === 1, WAIT_MS, "the one event");
  const started = Date.now();
  abort.abort();
  await collector.done;
  assert.ok(Date.now() - started < 1000, `ended ${Date.now() - started} ms after the abort`);
  assert.equal(collector.error, undefined);
  assert.ok(follower.closed);
});
