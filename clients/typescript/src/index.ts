/**
 * TypeScript client of the Mini Integration Platform: typed gRPC clients of CRM, Inventory and
 * the integration service (generated from the platform's protos at build time), decoding of
 * the platform's rich errors, and a follower of CRM's customer feed.
 *
 * @module
 */
export * from "./clients.js";
export * from "./errors.js";
export * from "./backoff.js";
export * from "./follower.js";

/** Generated messages, enums and service descriptors, one namespace per proto package. */
export * as crm from "./gen/crm/v1/crm_pb.js";
export * as inventory from "./gen/inventory/v1/inventory_pb.js";
export * as integration from "./gen/integration/v1/integration_pb.js";
export * as health from "./gen/health/v1/health_pb.js";
export * as errorDetailsPb from "./gen/google/rpc/error_details_pb.js";

/** Every `ErrorInfo.reason` each service sends, with when it happens and what to do. */
export { ErrorReason as CrmErrorReason } from "./gen/crm/v1/error_reason_pb.js";
export { ErrorReason as InventoryErrorReason } from "./gen/inventory/v1/error_reason_pb.js";
export { ErrorReason as IntegrationErrorReason } from "./gen/integration/v1/error_reason_pb.js";
