//! Coalescing concurrent package-request creates into `BatchCreatePackageRequests` calls.
//!
//! Deliveries still run one per customer, with their own retries and dead letters; only the
//! call underneath is shared. The batching adds no delay: a batch is whatever queued up while
//! the previous calls were in flight (the same idea as the stores' group commit), so at low
//! load every batch holds one request and goes out at once, and under load a few calls carry
//! hundreds of requests each, one round trip and one Inventory disk flush per call.
//!
//! An Inventory that predates the batch method answers UNIMPLEMENTED; from then on each request
//! goes out as its own `CreatePackageRequest`, so a newer integration service works with an
//! older Inventory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mip_proto::inventory::v1 as pb;
use mip_proto::inventory::v1::create_package_request_result::Result as ItemResult;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::security::AuthenticatedChannel;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Request, Status};
use tracing::{info, warn};

/// Most requests per call: Inventory's limit.
pub const MAX_BATCH: usize = 1000;

/// Batch calls in flight at once. More than one, so that a new batch can form and go out
/// while the previous one is being written; few, so that batches stay large under load.
const CALLS_IN_FLIGHT: usize = 4;

/// Requests waiting for a batch. Deliveries are bounded by `--max-in-flight` already; this
/// only has to hold them.
const QUEUE: usize = 4 * MAX_BATCH;

/// One create waiting for its batch.
struct Pending {
    /// What to create.
    request: pb::CreatePackageRequestRequest,
    /// Where its result goes.
    reply: oneshot::Sender<Result<pb::PackageRequest, Status>>,
}

/// Creates package requests in Inventory, batching concurrent calls.
#[derive(Debug, Clone)]
pub struct Creator {
    /// The batching task's queue.
    queue: mpsc::Sender<Pending>,
}

impl Creator {
    /// A creator over `client`; spawns the task that forms and sends batches, which ends when
    /// the last clone of the creator is dropped.
    pub fn new(
        client: InventoryServiceClient<AuthenticatedChannel>,
        call_timeout: Duration,
    ) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run(client, pending, call_timeout));
        Self { queue }
    }

    /// Creates one package request, in whatever batch it joins.
    pub async fn create(
        &self,
        request: pb::CreatePackageRequestRequest,
    ) -> Result<pb::PackageRequest, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { request, reply })
            .await
            .map_err(|_| Status::unavailable("the integration service is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the integration service is shutting down"))?
    }
}

/// Forms batches from the queue and sends them, at most [`CALLS_IN_FLIGHT`] at once.
async fn run(
    client: InventoryServiceClient<AuthenticatedChannel>,
    mut pending: mpsc::Receiver<Pending>,
    call_timeout: Duration,
) {
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    let unsupported = Arc::new(AtomicBool::new(false));
    loop {
        // Waiting for a free call first lets the queue fill meanwhile: that is the batching.
        let call = Arc::clone(&calls)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = pending.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A delivery that timed out (or was cancelled by shutdown) while its request waited
        // here no longer wants it sent: its retry, if any, is already queued behind.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let client = client.clone();
        let unsupported = Arc::clone(&unsupported);
        tokio::spawn(async move {
            let _call = call;
            send(client, batch, call_timeout, &unsupported).await;
        });
    }
}

/// Sends one batch and answers each of its requests.
async fn send(
    mut client: InventoryServiceClient<AuthenticatedChannel>,
    batch: Vec<Pending>,
    call_timeout: Duration,
    unsupported: &AtomicBool,
) {
    metrics::histogram!("mip_integration_package_batch_size").record(batch.len() as f64);
    if batch.len() == 1 || unsupported.load(Ordering::Relaxed) {
        return send_one_by_one(client, batch, call_timeout).await;
    }
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let mut request = Request::new(pb::BatchCreatePackageRequestsRequest {
        requests: requests.clone(),
    });
    request.set_timeout(call_timeout);
    let result = tokio::time::timeout(call_timeout, client.batch_create_package_requests(request))
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("call timed out")));
    match result {
        Ok(response) => {
            let results = response.into_inner().results;
            if results.len() != replies.len() {
                let status = Status::internal(format!(
                    "Inventory answered {} results for {} requests",
                    results.len(),
                    replies.len()
                ));
                warn!(%status, "malformed batch response");
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(item_result(result));
            }
        }
        Err(status) if status.code() == Code::Unimplemented => {
            info!("Inventory has no BatchCreatePackageRequests; creating one request per call");
            unsupported.store(true, Ordering::Relaxed);
            let batch = requests
                .into_iter()
                .zip(replies)
                .map(|(request, reply)| Pending { request, reply })
                .collect();
            send_one_by_one(client, batch, call_timeout).await;
        }
        // Nothing is known of any request: each delivery decides, as for a failed single
        // call, whether to retry (with the same request id) or give up.
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// `CreatePackageRequest` for each, concurrently.
async fn send_one_by_one(
    client: InventoryServiceClient<AuthenticatedChannel>,
    batch: Vec<Pending>,
    call_timeout: Duration,
) {
    let calls = batch.into_iter().map(|Pending { request, reply }| {
        let mut client = client.clone();
        async move {
            let mut request = Request::new(request);
            request.set_timeout(call_timeout);
            let result = tokio::time::timeout(call_timeout, client.create_package_request(request))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("call timed out")))
                .map(tonic::Response::into_inner);
            let _ = reply.send(result);
        }
    });
    futures::future::join_all(calls).await;
}

/// One item of a batch response, as the single call would have answered it.
fn item_result(result: pb::CreatePackageRequestResult) -> Result<pb::PackageRequest, Status> {
    match result.result {
        Some(ItemResult::PackageRequest(package_request)) => Ok(package_request),
        Some(ItemResult::Error(error)) => Err(Status::new(Code::from(error.code), error.message)),
        None => Err(Status::internal("Inventory sent an empty batch result")),
    }
}
