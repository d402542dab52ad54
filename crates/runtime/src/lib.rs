//! What every Mini Integration Platform server does the same way.
//!
//! - [`server`]: binds, serves a set of gRPC routes with health and reflection, applies the
//!   shared transport limits, and shuts down gracefully in bounded time.
//! - [`telemetry`]: `tracing` set-up with `RUST_LOG` and text or JSON output.
//! - [`store`]: what every store shares whatever its backend: the `--database-url` choice
//!   ([`store::Database`]) and backend-neutral storage errors ([`store::DbError`]).
//! - [`postgres`]: the PostgreSQL backend's plumbing: pool, migrations under an advisory lock,
//!   error classification, group commit, connecting in the background.
//! - [`sqlite`]: the embedded store's plumbing: WAL, migrations, one writer thread that
//!   group-commits concurrent writes, and a pool of read connections.
//! - [`token`]: opaque, checksummed page and resume tokens.
//! - [`status`]: building rich `tonic::Status` errors (field violations, error info).
//! - [`clock`]: an injectable wall clock.
//! - [`partition`]: a customer's partition of the id space, as `crm.v1.PartitionFilter`
//!   defines it.
//! - [`metrics`]: the Prometheus exporter and the per-RPC metrics layer.
//! - [`probe`]: the client side of the standard health check, for `mip health`.
//! - [`security`]: TLS (optionally mutual) for servers and channels, and bearer tokens.
//! - [`admission`]: the gate in front of every handler: token check and in-flight limit.
//! - [`batch`]: the shared part of the batch create methods.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod batch;
pub mod clock;
pub mod metrics;
pub mod partition;
pub mod postgres;
pub mod probe;
pub mod security;
pub mod server;
pub mod sqlite;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod token;

pub use tokio_util::sync::CancellationToken;

/// Parses a flag's duration (`500ms`, `5s`, `2m`, `7d`) that must not be zero: a zero
/// interval or deadline would spin or fail every call.
pub fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_positive_duration;

    #[test]
    fn zero_durations_are_refused() {
        assert_eq!(
            parse_positive_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("soon").is_err());
    }
}
