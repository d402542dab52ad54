/**
 * Decoding the rich error details a server attaches to a status, through a real gRPC-style
 * round trip (Connect's in-memory router): BadRequest, ErrorInfo and RetryInfo.
 *
 * @module
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";

import { errorDetails, errorReason } from "../src/index.js";
import { CrmService } from "../src/gen/crm/v1/crm_pb.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";

function crmFailingWith(error: ConnectError) {
  const transport = createRouterTransport(({ service }) => {
    service(CrmService, {
      createCustomer: () => {
        throw error;
      },
    });
  });
  return createClient(CrmService, transport);
}

async function failure(error: ConnectError): Promise<unknown> {
  try {
    await crmFailingWith(error).createCustomer({ name: "", email: "x" });
  } catch (caught) {
    return caught;
  }
  assert.fail("the call succeeded");
}

test("field violations, the reason and the retry delay are decoded from a failed call", async () => {
  const caught = await failure(
    new ConnectError("bad customer", Code.InvalidArgument, undefined, [
      {
        desc: BadRequestSchema,
        value: {
          fieldViolations: [
            { field: "name", description: "must not be empty" },
            { field: "email", description: "is not an email address" },
          ],
        },
      },
      { desc: ErrorInfoSchema, value: { reason: "INVALID_CUSTOMER", domain: "crm.mip", metadata: { field: "email" } } },
      { desc: RetryInfoSchema, value: { retryDelay: { seconds: 1n, nanos: 500_000_000 } } },
    ]),
  );
  const details = errorDetails(caught);
  assert.deepEqual(
    details.fieldViolations.map((violation) => [violation.field, violation.description]),
    [
      ["name", "must not be empty"],
      ["email", "is not an email address"],
    ],
  );
  assert.equal(details.errorInfo?.reason, "INVALID_CUSTOMER");
  assert.equal(details.errorInfo?.domain, "crm.mip");
  assert.deepEqual(details.errorInfo?.metadata, { field: "email" });
  assert.equal(details.retryDelayMs, 1500);
  assert.equal(errorReason(caught), "INVALID_CUSTOMER");
});

test("an error without details, or not a gRPC status, decodes to nothing", async () => {
  const caught = await failure(new ConnectError("down", Code.Unavailable));
  assert.deepEqual(errorDetails(caught), { fieldViolations: [], errorInfo: undefined, retryDelayMs: undefined });
  assert.equal(errorReason(new Error("not a status")), undefined);
});
