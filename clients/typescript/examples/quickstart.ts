/**
 * The README's example, compiled with the package so that it stays correct: create a customer
 * idempotently, then follow the feed from a saved token and save the token after each item.
 *
 * Run it with `node dist/examples/quickstart.js` against `mip all`; it follows until Ctrl-C.
 *
 * @module
 */
import { randomUUID } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";

import { createCrmClient, createPlatformTransport, followCustomers } from "../src/index.js";

const crm = createCrmClient(createPlatformTransport("127.0.0.1:50051"));

// Fields are the proto's in lowerCamelCase: `requestId` is `request_id`.
const customer = await crm.createCustomer(
  { name: "Ada Lovelace", email: `ada.${Date.now()}@example.com`, requestId: randomUUID() },
  { timeoutMs: 5000 },
);
console.log(`created ${customer.id}`);

const saved = existsSync("feed.token") ? readFileSync("feed.token", "utf8") : "";
const follower = followCustomers(crm, { token: saved });
process.once("SIGINT", () => follower.close());
for await (const item of follower) {
  if (item.kind === "event") {
    console.log(`${item.event.sequence}: ${item.event.customer?.email}`);
  } else if (item.kind === "relisted") {
    console.log(`relisted: ${item.customer.email}`); // reconcile: the token had expired
  }
  writeFileSync("feed.token", item.token); // resume from here next time
}
