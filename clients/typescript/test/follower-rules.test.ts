/**
 * The follower's rules against a scripted CRM in memory (Connect's router transport): the
 * cases a real CRM does not produce on demand, such as a relist over several pages, a server
 * that sends an event again, or streams that keep failing.
 *
 * @module
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport, type HandlerContext } from "@connectrpc/connect";

import { followCustomers, RESUME_TOKEN_EXPIRED, type FollowOptions } from "../src/index.js";
import {
  CrmService,
  CustomerEventSchema,
  CustomerEventType,
  CustomerSchema,
  HeartbeatSchema,
  ListCustomerEventsResponseSchema,
  WatchCustomersResponseSchema,
  type CustomerEvent,
  type ListCustomerEventsRequest,
  type ListCustomerEventsResponseSchema as ListCustomerEventsResponseDesc,
  type ListCustomersRequest,
  type ListCustomersResponseSchema as ListCustomersResponseDesc,
  type WatchCustomersRequest,
  type WatchCustomersResponse,
} from "../src/gen/crm/v1/crm_pb.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { Collector } from "./support/collect.js";

const TEST_TIMEOUT_MS = 10_000;
const WAIT_MS = 5000;
const QUICK: FollowOptions = {
  initialBackoffMs: 1,
  maxBackoffMs: 5,
  pollIntervalMs: 5,
  streamProbeIntervalMs: 60_000,
};

type Watch = (request: WatchCustomersRequest, context: HandlerContext) => AsyncIterable<WatchCustomersResponse>;

/** A CRM whose answers each test scripts; unscripted calls are UNIMPLEMENTED. */
function fakeCrm(handlers: {
  watch?: Watch;
  list?: (request: ListCustomersRequest) => MessageInitShape<typeof ListCustomersResponseDesc>;
  events?: (request: ListCustomerEventsRequest) => MessageInitShape<typeof ListCustomerEventsResponseDesc>;
}) {
  const transport = createRouterTransport(({ service }) => {
    service(CrmService, {
      watchCustomers:
        handlers.watch ??
        async function* () {
          throw new ConnectError("watching is disabled", Code.Unimplemented);
        },
      listCustomers: (request) => {
        if (handlers.list === undefined) throw new ConnectError("no", Code.Unimplemented);
        return handlers.list(request);
      },
      listCustomerEvents: (request) => {
        if (handlers.events === undefined) throw new ConnectError("no", Code.Unimplemented);
        return handlers.events(request);
      },
    });
  });
  return createClient(CrmService, transport);
}

function event(sequence: number): CustomerEvent {
  return create(CustomerEventSchema, {
    eventId: `event-${sequence}`,
    type: CustomerEventType.CREATED,
    customer: create(CustomerSchema, { id: `customer-${sequence}` }),
    resumeToken: `token-${sequence}`,
    sequence: BigInt(sequence),
  });
}

function message(value: CustomerEvent): WatchCustomersResponse {
  return create(WatchCustomersResponseSchema, { kind: { case: "event", value } });
}

function heartbeat(sequence: number, caughtUp = false): WatchCustomersResponse {
  const value = create(HeartbeatSchema, { resumeToken: `beat-${sequence}`, sequence: BigInt(sequence), caughtUp });
  return create(WatchCustomersResponseSchema, { kind: { case: "heartbeat", value } });
}

/** Never ends by itself: the stream stays open until the follower cancels it. */
async function openUntilCancelled(context: HandlerContext): Promise<never> {
  return new Promise((_, reject) => {
    context.signal.addEventListener("abort", () => reject(new ConnectError("cancelled", Code.Canceled)));
  });
}

test("a relist continues from the first page's resume token, and its last customer carries it", { timeout: TEST_TIMEOUT_MS }, async () => {
  const watched: string[] = [];
  const crm = fakeCrm({
    watch: async function* (request, context) {
      watched.push(request.resumeToken);
      if (request.resumeToken === "expired") {
        throw new ConnectError("pruned", Code.FailedPrecondition, undefined, [
          { desc: ErrorInfoSchema, value: { reason: RESUME_TOKEN_EXPIRED, domain: "crm.mip" } },
        ]);
      }
      yield message(event(11));
      await openUntilCancelled(context);
    },
    list: (request) =>
      request.pageToken === ""
        ? { customers: [create(CustomerSchema, { id: "a" })], nextPageToken: "page-2", resumeToken: "snapshot", resumeSequence: 10n }
        : // Later pages carry a later position; continuing from it would skip event 11.
          { customers: [create(CustomerSchema, { id: "b" })], nextPageToken: "", resumeToken: "later", resumeSequence: 12n },
  });
  const follower = followCustomers(crm, { ...QUICK, token: "expired" });
  const collector = new Collector(follower);
  try {
    await collector.until(() => collector.items.length === 3, WAIT_MS, "two relisted customers and an event");
  } finally {
    follower.close();
    await collector.done;
  }

  assert.deepEqual(watched, ["expired", "snapshot"]);
  assert.deepEqual(
    collector.items.map((item) => [item.kind, item.token]),
    [
      ["relisted", "expired"],
      ["relisted", "snapshot"],
      ["event", "token-11"],
    ],
  );
  assert.equal(collector.error, undefined);
});

test("an event sent again after a reconnect is handed over once", { timeout: TEST_TIMEOUT_MS }, async () => {
  const watched: string[] = [];
  const crm = fakeCrm({
    watch: async function* (request, context) {
      watched.push(request.resumeToken);
      if (watched.length === 1) {
        yield* [1, 2, 3].map((sequence) => message(event(sequence)));
        throw new ConnectError("connection reset", Code.Unavailable);
      }
      // A server that replays from further back than asked.
      yield* [2, 3, 4].map((sequence) => message(event(sequence)));
      await openUntilCancelled(context);
    },
  });
  const follower = followCustomers(crm, QUICK);
  const collector = new Collector(follower);
  try {
    await collector.until(() => collector.events().length === 4, WAIT_MS, "four events");
  } finally {
    follower.close();
    await collector.done;
  }

  assert.deepEqual(collector.events().map((e) => e.sequence), [1n, 2n, 3n, 4n]);
  assert.deepEqual(watched, ["", "token-3"], "resumed from the last event's token");
  assert.equal(follower.token, "token-4");
});

test("heartbeats move the token on without handing anything over", { timeout: TEST_TIMEOUT_MS }, async () => {
  const watched: string[] = [];
  let collector: Collector | undefined;
  const crm = fakeCrm({
    watch: async function* (request, context) {
      watched.push(request.resumeToken);
      collector?.notify();
      if (watched.length === 1) {
        yield message(event(1));
        yield heartbeat(5);
        throw new ConnectError("connection reset", Code.Unavailable);
      }
      await openUntilCancelled(context);
    },
  });
  const follower = followCustomers(crm, QUICK);
  collector = new Collector(follower);
  try {
    await collector.until(() => watched.length === 2, WAIT_MS, "the reconnect");
  } finally {
    follower.close();
    await collector.done;
  }
  assert.deepEqual(watched, ["", "beat-5"], "resumed from the heartbeat's token");
  assert.equal(follower.token, "beat-5");
  assert.deepEqual(collector.items.map((item) => item.kind), ["event"]);
});

test("UNIMPLEMENTED switches to polling at once, and polling pages until caught up", { timeout: TEST_TIMEOUT_MS }, async () => {
  let watches = 0;
  const polled: string[] = [];
  let collector: Collector | undefined;
  const crm = fakeCrm({
    watch: async function* () {
      watches += 1;
      throw new ConnectError("watching is disabled", Code.Unimplemented);
    },
    events: (request) => {
      polled.push(request.resumeToken);
      collector?.notify();
      const after = request.resumeToken === "" ? 0 : Number(request.resumeToken.split("-")[1]);
      const events = after < 4 ? [event(after + 1), event(after + 2)] : [];
      const last = after + events.length;
      return create(ListCustomerEventsResponseSchema, {
        events,
        nextResumeToken: `token-${last}`,
        nextSequence: BigInt(last),
        remainingEvents: BigInt(Math.max(0, 4 - last)),
      });
    },
  });
  const follower = followCustomers(crm, QUICK);
  collector = new Collector(follower);
  try {
    await collector.until(() => polled.length >= 4, WAIT_MS, "a poll after catching up");
  } finally {
    follower.close();
    await collector.done;
  }

  assert.equal(watches, 1);
  assert.equal(follower.mode, "poll");
  assert.deepEqual(polled.slice(0, 4), ["", "token-2", "token-4", "token-4"]);
  assert.deepEqual(collector.events().map((e) => e.sequence), [1n, 2n, 3n, 4n]);
});

test("three failed streams in a row switch to polling", { timeout: TEST_TIMEOUT_MS }, async () => {
  let watches = 0;
  const modes: string[] = [];
  const crm = fakeCrm({
    watch: async function* () {
      watches += 1;
      throw new ConnectError("CRM is restarting", Code.Unavailable);
    },
    events: () => create(ListCustomerEventsResponseSchema, { nextResumeToken: "token-0" }),
  });
  let collector: Collector | undefined;
  const follower = followCustomers(crm, { ...QUICK, onModeChange: (mode) => (modes.push(mode), collector?.notify()) });
  collector = new Collector(follower);
  try {
    await collector.until(() => follower.mode === "poll", WAIT_MS, "polling");
  } finally {
    follower.close();
    await collector.done;
  }
  assert.equal(watches, 3);
  assert.deepEqual(modes, ["poll"]);
});

test(
  "a caught-up heartbeat is handed over as a live signal, once per connection",
  { timeout: TEST_TIMEOUT_MS },
  async () => {
    const crm = fakeCrm({
      watch: async function* (_request, context) {
        yield message(event(1));
        yield heartbeat(1, true);
        yield message(event(2));
        yield heartbeat(2, true);
        yield heartbeat(2);
        await openUntilCancelled(context);
      },
    });
    const follower = followCustomers(crm, { ...QUICK, signalLive: true });
    const collector = new Collector(follower);
    try {
      await collector.until(() => collector.events().length === 2, WAIT_MS, "two events");
    } finally {
      follower.close();
      await collector.done;
    }
    assert.deepEqual(
      collector.items.map((item) => [item.kind, item.token]),
      [
        ["event", "token-1"],
        ["live", "beat-1"],
        ["event", "token-2"],
      ],
    );
  },
);
