//! The client side of the standard gRPC health check, used by `mip health` and tests.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::security::Security;

/// Why a probe did not get a status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The address or the TLS settings are not usable.
    #[error(transparent)]
    Setup(#[from] crate::security::SecurityError),
    /// Nothing answered in time.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The server answered with an error, for example NOT_FOUND for an unknown service.
    #[error("health check failed: {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
}

/// Asks the server at `addr` (`HOST:PORT` or a URL) how `service` is doing; `""` means the
/// server as a whole. `security` says whether to use TLS (health needs no token).
pub async fn check(
    addr: &str,
    service: &str,
    timeout: Duration,
    security: &Security,
) -> Result<ServingStatus, ProbeError> {
    let endpoint = security
        .endpoint(addr)?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ProbeError::Connect(addr.to_owned(), e))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(ProbeError::Rpc)?;
    Ok(response.into_inner().status())
}
