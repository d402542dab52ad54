/**
 * Connections to the platform's services.
 *
 * The transport speaks the gRPC protocol over HTTP/2 (`@connectrpc/connect-node`'s
 * `createGrpcTransport`), which is what the platform's servers speak, so no proxy or
 * gRPC-Web bridge is needed. The clients are typed from the generated service descriptors:
 * request fields are the protos' fields in lowerCamelCase (`requestId` for `request_id`), and
 * a misspelt field is a compile error rather than a silently dropped value.
 *
 * @module
 */
import { readFileSync } from "node:fs";

import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { CrmService } from "./gen/crm/v1/crm_pb.js";
import { Health } from "./gen/health/v1/health_pb.js";
import { IntegrationService } from "./gen/integration/v1/integration_pb.js";
import { InventoryService } from "./gen/inventory/v1/inventory_pb.js";

/** A typed CRM client. */
export type CrmClient = Client<typeof CrmService>;
/** A typed Inventory client. */
export type InventoryClient = Client<typeof InventoryService>;
/** A typed client of the integration service's admin API. */
export type IntegrationClient = Client<typeof IntegrationService>;
/** A typed client of the standard gRPC health service, which every server of the platform runs. */
export type HealthClient = Client<typeof Health>;

/** How to reach a server of the platform. */
export interface ConnectOptions {
  /**
   * PEM file of the CA that signed the servers' certificates (see `mip dev-certs`). Set: TLS.
   * Unset: plain text, as `mip all` serves by default.
   */
  caFile?: string;
  /** PEM client certificate, for servers that require mutual TLS. Needs `keyFile`. */
  certFile?: string;
  /** PEM private key of `certFile`. */
  keyFile?: string;
  /**
   * Bearer token sent as `authorization: Bearer <token>` on every call, for servers started
   * with `--auth-token-file`. Only sent over TLS, so it never crosses the network in clear.
   */
  token?: string;
}

/**
 * A gRPC transport to one server, given as `HOST:PORT` or a URL (`http://…`, `https://…`).
 * HTTP/2 connections are opened lazily and reused by every call through the transport.
 */
export function createPlatformTransport(address: string, options: ConnectOptions = {}): Transport {
  const tls = options.caFile !== undefined;
  if (options.token !== undefined && !tls) {
    throw new Error("a bearer token needs TLS (caFile): gRPC sends tokens only over TLS");
  }
  const baseUrl = /^https?:\/\//.test(address) ? address : `${tls ? "https" : "http"}://${address}`;
  const interceptors: Interceptor[] = [];
  const token = options.token;
  if (token !== undefined) {
    interceptors.push((next) => async (request) => {
      request.header.set("authorization", `Bearer ${token}`);
      return next(request);
    });
  }
  const read = (path: string | undefined) => (path === undefined ? undefined : readFileSync(path));
  return createGrpcTransport({
    baseUrl,
    interceptors,
    nodeOptions: tls
      ? { ca: read(options.caFile), cert: read(options.certFile), key: read(options.keyFile) }
      : {},
  });
}

/** A CRM client over `transport`. */
export function createCrmClient(transport: Transport): CrmClient {
  return createClient(CrmService, transport);
}

/** An Inventory client over `transport`. */
export function createInventoryClient(transport: Transport): InventoryClient {
  return createClient(InventoryService, transport);
}

/** An integration service admin client over `transport`. */
export function createIntegrationClient(transport: Transport): IntegrationClient {
  return createClient(IntegrationService, transport);
}

/** A `grpc.health.v1.Health` client over `transport`. */
export function createHealthClient(transport: Transport): HealthClient {
  return createClient(Health, transport);
}
