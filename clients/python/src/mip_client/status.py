"""Reading the machine-readable part of a failed call: the `google.rpc.ErrorInfo` reason.

The platform's servers put a `google.rpc.Status` with details in the `grpc-status-details-bin`
trailer (the standard rich error model). Its `ErrorInfo.reason` says what to do, for
example `RESUME_TOKEN_EXPIRED`: relist, then watch from the listing's token. Match on the
reason, never on the message text, which is for people and may change.
"""

from typing import TYPE_CHECKING, Optional

import grpc

if TYPE_CHECKING:
    from google.rpc import error_details_pb2, status_pb2

# The trailer that carries the serialized google.rpc.Status.
DETAILS_KEY = "grpc-status-details-bin"


def rich_status(error: grpc.RpcError) -> Optional["status_pb2.Status"]:
    """The `google.rpc.Status` a failed call carries, or None if it has none."""
    # Imported here, not at the top: the generated modules (mip_client.crm.v1, ...) stay
    # importable where googleapis-common-protos is not installed.
    from google.rpc import status_pb2

    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - a garbled trailer means no details
                return None
    return None


def error_info(error: grpc.RpcError) -> Optional["error_details_pb2.ErrorInfo"]:
    """The first `google.rpc.ErrorInfo` in a failed call's details, or None."""
    from google.rpc import error_details_pb2

    status = rich_status(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_reason(error: grpc.RpcError) -> Optional[str]:
    """`ErrorInfo.reason` of a failed call (for example "RESUME_TOKEN_EXPIRED"), or None."""
    info = error_info(error)
    return info.reason if info and info.reason else None


def retry_delay(error: grpc.RpcError) -> float:
    """Seconds a failed call's `google.rpc.RetryInfo` asks to wait before retrying, or 0."""
    from google.rpc import error_details_pb2

    status = rich_status(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(0.0, info.retry_delay.ToTimedelta().total_seconds())
    return 0.0
