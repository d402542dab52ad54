//! What every Mini Integration Platform server does the same way.
//!
//! - [`server`]: binds, serves a set of gRPC routes with health and reflection, applies the
//!   shared transport limits, and shuts down gracefully in bounded time.
//! - [`telemetry`]: `tracing` set-up with `RUST_LOG` and text or JSON output.
//! - [`sqlite`]: the embedded store's plumbing: WAL, migrations, one writer thread that
//!   group-commits concurrent writes, and a pool of read connections.
//! - [`token`]: opaque, checksummed page and resume tokens.
//! - [`status`]: building rich `tonic::Status` errors (field violations, error info).
//! - [`clock`]: an injectable wall clock.
//! - [`metrics`]: the Prometheus exporter and the per-RPC metrics layer.
//! - [`probe`]: the client side of the standard health check, for `mip health`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod sqlite;
pub mod status;
pub mod telemetry;
pub mod token;

pub use tokio_util::sync::CancellationToken;
