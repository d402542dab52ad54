//! The Inventory service: requests for packages (such as a welcome package) to be shipped to
//! customers, tracked from request to delivery.
//!
//! - [`domain`]: package requests, validation, and the status life cycle.
//! - [`store`]: the storage trait and its SQLite implementation (idempotent creates and status
//!   moves checked and written in one group-committed write).
//! - [`service`]: the gRPC edge (`inventory.v1.InventoryService`).
//! - [`error`]: every failure, and its gRPC status.
//!
//! [`serve`] runs the service on a listener until a shutdown token is cancelled.
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
use mip_runtime::store::{Database, DbError};
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use error::Error;
pub use service::InventoryApi;
pub use store::{InventoryStore, SqliteStore};

/// Fully-qualified gRPC name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "inventory.v1.InventoryService";

/// Opens the store `database` names and serves Inventory on `listener` until `shutdown` is
/// cancelled.
pub async fn serve(
    listener: TcpListener,
    database: &Database,
    server: &ServerOptions,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let health = Health::new(&[SERVICE_NAME]).await;
    let store = match database {
        Database::Sqlite { dir, durability } => {
            Arc::new(SqliteStore::open(dir, *durability).await?)
        }
        Database::Postgres(pg) => {
            return Err(StartError::Store(Error::Storage(DbError::Open {
                database: pg.name().to_owned(),
                reason: "this build keeps Inventory in SQLite only".into(),
            })));
        }
    };
    let api = InventoryApi::new(store, clock);
    let routes = Routes::new(mip_runtime::limited!(
        InventoryServiceServer::new(api),
        server
    ));
    health.set_serving().await;
    mip_runtime::server::serve(
        listener,
        mip_proto::INVENTORY_DESCRIPTOR_SET,
        routes,
        health,
        server,
        shutdown,
    )
    .await?;
    Ok(())
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
