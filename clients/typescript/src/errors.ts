/**
 * The platform's rich errors, decoded: the `google.rpc` details (BadRequest, ErrorInfo,
 * RetryInfo) that the servers attach to a failed call's status.
 *
 * `ConnectError` already parses the `grpc-status-details-bin` trailer; these helpers pick out
 * the detail types the platform sends, so callers branch on a reason or a field name instead
 * of parsing messages.
 *
 * @module
 */
import { ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
  type BadRequest_FieldViolation,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
import { ErrorReason as CrmErrorReason } from "./gen/crm/v1/error_reason_pb.js";

/**
 * `ErrorInfo.reason` of a resume token that retention has overtaken: relist, then watch.
 * Taken from the contract's enum, so a renamed reason fails the build instead of the relist.
 */
export const RESUME_TOKEN_EXPIRED = CrmErrorReason[CrmErrorReason.RESUME_TOKEN_EXPIRED];
/** `ErrorInfo.reason` of a resume token issued by another CRM database: relist, then watch. */
export const RESUME_TOKEN_UNKNOWN_LOG = CrmErrorReason[CrmErrorReason.RESUME_TOKEN_UNKNOWN_LOG];

/** The details of a failed call that the platform documents. */
export interface ErrorDetails {
  /** For INVALID_ARGUMENT: each invalid field and what is wrong with it. */
  fieldViolations: BadRequest_FieldViolation[];
  /** A machine-readable reason (for example `RESUME_TOKEN_EXPIRED`), when the server sent one. */
  errorInfo: ErrorInfo | undefined;
  /** How long the server asks the caller to wait before retrying, in milliseconds, if it said. */
  retryDelayMs: number | undefined;
}

/** Decodes the details of `error`; an error that is not a gRPC status has none. */
export function errorDetails(error: unknown): ErrorDetails {
  if (!(error instanceof ConnectError)) {
    return { fieldViolations: [], errorInfo: undefined, retryDelayMs: undefined };
  }
  const retry = error.findDetails(RetryInfoSchema)[0]?.retryDelay;
  return {
    fieldViolations: error.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations),
    errorInfo: error.findDetails(ErrorInfoSchema)[0],
    retryDelayMs:
      retry === undefined ? undefined : Number(retry.seconds) * 1000 + retry.nanos / 1_000_000,
  };
}

/**
 * The `ErrorInfo.reason` of `error`, if it carries one: the name of a value of the service's
 * `ErrorReason` enum, for example `CrmErrorReason[CrmErrorReason.EMAIL_TAKEN]`.
 */
export function errorReason(error: unknown): string | undefined {
  return errorDetails(error).errorInfo?.reason;
}
