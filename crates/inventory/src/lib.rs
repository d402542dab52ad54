//! The Inventory service: requests for packages (such as a welcome package) to be shipped to
//! customers, tracked from request to delivery.
//!
//! - [`domain`]: package requests, validation, and the status life cycle.
//! - [`store`]: the storage trait, its SQLite and PostgreSQL implementations (idempotent
//!   creates and status moves checked and written in one group-committed write), and
//!   [`store::open`], which picks one from a [`Database`].
//! - [`service`]: the gRPC edge (`inventory.v1.InventoryService`).
//! - [`error`]: every failure, and its gRPC status.
//!
//! [`serve`] runs the service on a listener until a shutdown token is cancelled;
//! [`serve_store`] does the same over a store already opened.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod domain;
pub mod error;
pub mod service;
pub mod store;

use std::sync::Arc;

use mip_proto::inventory::v1::inventory_service_server::InventoryServiceServer;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SharedClock;
use mip_runtime::server::{Health, ServeError, ServerOptions};
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use error::Error;
pub use service::InventoryApi;
pub use store::{InventoryStore, PostgresStore, SqliteStore};

/// Fully-qualified gRPC name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "inventory.v1.InventoryService";

/// Opens the store `database` names and serves Inventory on `listener` until `shutdown` is
/// cancelled. See [`serve_store`] for when health turns SERVING.
pub async fn serve(
    listener: TcpListener,
    database: &Database,
    server: &ServerOptions,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let store = store::open(database, &shutdown).await?;
    serve_store(listener, store, server, clock, shutdown).await
}

/// Serves Inventory over `store` on `listener` until `shutdown` is cancelled. Serving starts
/// at once, with health NOT_SERVING (calls fail as UNAVAILABLE) until the store is ready, so a
/// database that is still starting delays traffic instead of the process. A store that can
/// never be ready (wrong password, missing database, failed migration) stops this with its
/// error.
pub async fn serve_store(
    listener: TcpListener,
    store: Arc<dyn InventoryStore>,
    server: &ServerOptions,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let health = Health::new(&[SERVICE_NAME]).await;
    let api = InventoryApi::new(Arc::clone(&store), clock);
    let routes = Routes::new(mip_runtime::limited!(
        InventoryServiceServer::new(api),
        server
    ));
    let ready = {
        let health = health.clone();
        async move {
            match store.ready().await {
                Ok(()) => health.set_serving().await,
                // Only shutdown ends connecting with a transient error; serving then ends by
                // itself.
                Err(Error::Storage(e)) if e.is_transient() => {}
                Err(e) => return e,
            }
            std::future::pending().await
        }
    };
    let serving = mip_runtime::server::serve(
        listener,
        mip_proto::INVENTORY_DESCRIPTOR_SET,
        routes,
        health,
        server,
        shutdown,
    );
    // Readiness first: a store that is ready at once (SQLite) reports SERVING before the
    // first call can be accepted.
    tokio::select! {
        biased;
        failed = ready => Err(StartError::Store(failed)),
        served = serving => Ok(served?),
    }
}

/// Why Inventory could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("Inventory store")]
    Store(#[from] Error),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}
