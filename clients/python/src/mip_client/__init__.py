"""Python client of the Mini Integration Platform.

* `mip_client.crm.v1`, `mip_client.inventory.v1`, `mip_client.integration.v1`: the gRPC
  modules generated from proto/ at build time (`crm_pb2` messages, `crm_pb2_grpc` stubs),
  each with a `.pyi` for editors and type checkers, and the proto comments as docstrings.
* `follow_customers`: follows CRM's customer feed for you, resuming, reconnecting, falling
  back to polling and relisting as the platform's own integration service does.
* `error_reason`, `retry_delay`: the `google.rpc.ErrorInfo` reason and the
  `google.rpc.RetryInfo` delay of a failed call.
"""

from mip_client.follower import (
    EVENT,
    LIVE,
    RELISTED,
    CustomerFollower,
    FeedItem,
    FollowerStats,
    follow_customers,
)
from mip_client.status import error_info, error_reason, retry_delay

__all__ = [
    "EVENT",
    "LIVE",
    "RELISTED",
    "CustomerFollower",
    "FeedItem",
    "FollowerStats",
    "error_info",
    "error_reason",
    "follow_customers",
    "retry_delay",
]
