//! The load generator's client side: a few shared HTTP/2 connections, customer creation with
//! retries, and the two drivers: closed loop (C callers, each waiting for its reply) and open
//! loop (calls sent on a fixed schedule, whether or not earlier ones have been answered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use mip_proto::crm::v1::create_customer_result::Result as CreateResult;
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::crm::v1::{
    BatchCreateCustomersRequest, CreateCustomerRequest, Customer, ListCustomersRequest,
};
use mip_proto::integration::v1::integration_service_client::IntegrationServiceClient;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::report::{histogram, record_duration};
use crate::{RequestIds, Settings};

/// A CRM client on one connection.
pub type CrmClient = CrmServiceClient<Channel>;
/// An Inventory client.
pub type InventoryClient = InventoryServiceClient<Channel>;
/// An integration admin client.
pub type IntegrationClient = IntegrationServiceClient<Channel>;

/// Deadline of one CreateCustomer attempt: long, so an overloaded server shows up as latency
/// rather than as failures.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts per customer on transient errors. A retry reuses the request id, so it can never
/// create a second customer.
const MAX_ATTEMPTS: u32 = 5;

/// Most open-loop calls in flight at once. Past it the schedule slips (and the slip is
/// reported) instead of the load generator's memory growing without bound.
const MAX_IN_FLIGHT: usize = 20_000;

/// Largest response the listing calls accept (a page of 1000 package requests is ~200 KB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Display name of every created customer.
const CUSTOMER_NAME: &str = "Bench Customer";

/// One eagerly connected HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))
}

/// A client of the integration service's admin API.
pub async fn integration_client(addr: SocketAddr) -> anyhow::Result<IntegrationClient> {
    Ok(IntegrationServiceClient::new(connect(addr).await?))
}

/// The CRM side of the load: `--connections` HTTP/2 connections, and how customers are made.
/// The no-op servers of the ceiling are driven through the same type, so every figure comes
/// from the same client code.
pub struct CrmClients {
    /// One CRM client per connection. Calls are spread over them because one HTTP/2
    /// connection is one socket, read and written by one task on each side.
    clients: Vec<CrmClient>,
    /// How CreateCustomer's request ids are made.
    request_ids: RequestIds,
    /// Customers per call in the closed loop: 1 for CreateCustomer, more for
    /// BatchCreateCustomers.
    batch: usize,
}

impl CrmClients {
    /// Opens `--connections` connections, spread over `addrs` (at least one each), creating
    /// customers as `settings` say.
    pub async fn connect(addrs: &[SocketAddr], settings: &Settings) -> anyhow::Result<Self> {
        anyhow::ensure!(!addrs.is_empty(), "no CRM address to connect to");
        let connections = settings.connections.max(addrs.len()).max(1);
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            clients.push(CrmServiceClient::new(
                connect(addrs[i % addrs.len()]).await?,
            ));
        }
        Ok(Self {
            clients,
            request_ids: settings.request_ids,
            batch: settings.batch.max(1),
        })
    }

    /// The client for call or worker `i`: round-robin over the connections.
    pub fn get(&self, i: usize) -> CrmClient {
        self.clients[i % self.clients.len()].clone()
    }
}

/// The clients one scenario shares: every call reuses these connections.
pub struct Clients {
    /// CRM, for the load and the log's head.
    pub crm: CrmClients,
    /// Inventory, for the checks (listing only, so one connection).
    pub inventory: InventoryClient,
}

impl Clients {
    /// Opens `--connections` connections to CRM, spread over its replicas (at least one
    /// each), and one to Inventory, creating customers as `settings` say.
    pub async fn connect(
        crm: &[SocketAddr],
        inventory: SocketAddr,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            crm: CrmClients::connect(crm, settings).await?,
            inventory: InventoryServiceClient::new(connect(inventory).await?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// CRM's newest change-log sequence number.
    pub async fn crm_head(&self) -> anyhow::Result<i64> {
        Ok(self.crm_head_token().await?.0)
    }

    /// CRM's newest change-log sequence number and a resume token at it (ListCustomers hands
    /// out the same tokens as the feeds).
    pub async fn crm_head_token(&self) -> anyhow::Result<(i64, String)> {
        let page = self
            .crm
            .get(0)
            .list_customers(ListCustomersRequest {
                page_size: 1,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        Ok((page.resume_sequence, page.resume_token))
    }
}

/// A customer the load created.
#[derive(Debug, Clone, Copy)]
pub struct Created {
    /// Its id.
    pub id: Uuid,
    /// Its `create_time`, in microseconds since the epoch (CRM's clock).
    pub create_us: i64,
}

/// A protobuf timestamp in microseconds since the epoch.
pub fn micros(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
}

/// Whether a failed create may be retried: the request id makes a retry of a create that did
/// commit return the same customer.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

/// Creates customer number `i` (its email is derived from `i`, unique in a fresh platform),
/// retrying transient failures; counts retries in `retries`.
async fn create_customer(
    mut crm: CrmClient,
    i: u64,
    request_id: Uuid,
    retries: &AtomicU64,
) -> Result<Created, Status> {
    let mut attempt = 1;
    loop {
        // Built afresh per attempt: tonic consumes the request, and retries are rare.
        let mut request = Request::new(CreateCustomerRequest {
            name: CUSTOMER_NAME.to_owned(),
            email: format!("bench-{i}@example.com"),
            request_id: request_id.to_string(),
        });
        request.set_timeout(CALL_TIMEOUT);
        match crm.create_customer(request).await {
            Ok(response) => return created(&response.into_inner()),
            Err(status) if retryable(status.code()) && attempt < MAX_ATTEMPTS => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

/// A created customer, as the checks need it.
fn created(customer: &Customer) -> Result<Created, Status> {
    let id = Uuid::parse_str(&customer.id)
        .map_err(|e| Status::internal(format!("CRM returned a bad id {:?}: {e}", customer.id)))?;
    Ok(Created {
        id,
        create_us: micros(customer.create_time.as_ref()),
    })
}

/// Creates customers number `first..first + n` in one BatchCreateCustomers call, retrying the
/// whole call on transient failures, of the call or of any request in it (the request ids
/// make that safe). Any other refusal fails the run: a fresh platform has no reason for one.
async fn create_customers(
    mut crm: CrmClient,
    first: u64,
    n: u64,
    request_ids: RequestIds,
    retries: &AtomicU64,
) -> Result<Vec<Created>, Status> {
    let requests: Vec<CreateCustomerRequest> = (first..first + n)
        .map(|i| CreateCustomerRequest {
            name: CUSTOMER_NAME.to_owned(),
            email: format!("bench-{i}@example.com"),
            request_id: request_ids.make().to_string(),
        })
        .collect();
    let mut attempt = 1;
    loop {
        let mut request = Request::new(BatchCreateCustomersRequest {
            requests: requests.clone(),
        });
        request.set_timeout(CALL_TIMEOUT);
        match crm.batch_create_customers(request).await {
            // A transient refusal of any one request: send the whole batch again (the request
            // ids make the repeat of the others harmless).
            Ok(response)
                if attempt < MAX_ATTEMPTS
                    && response.get_ref().results.iter().any(|r| {
                        matches!(&r.result, Some(CreateResult::Error(e)) if retryable(Code::from(e.code)))
                    }) =>
            {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                attempt += 1;
            }
            Ok(response) => {
                return response
                    .into_inner()
                    .results
                    .iter()
                    .map(|r| match &r.result {
                        Some(CreateResult::Customer(customer)) => created(customer),
                        Some(CreateResult::Error(e)) => Err(Status::new(
                            Code::from(e.code),
                            format!("a request of the batch failed: {}", e.message),
                        )),
                        None => Err(Status::internal("CRM returned an empty result")),
                    })
                    .collect();
            }
            Err(status) if retryable(status.code()) && attempt < MAX_ATTEMPTS => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

/// What a closed-loop run did.
pub struct ClosedLoop {
    /// Every customer created, in no particular order.
    pub created: Vec<Created>,
    /// Latency of each create call as its caller saw it, in microseconds.
    pub latency: Histogram<u64>,
    /// From the first call to the last reply.
    pub elapsed: Duration,
    /// Transient failures retried.
    pub retries: u64,
}

/// Creates `n` customers with `concurrency` callers, each sending its next call when the
/// previous one is answered.
pub async fn closed_loop(
    clients: &CrmClients,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<ClosedLoop> {
    closed_loop_from(clients, 0, n, concurrency).await
}

/// [`closed_loop`] for customers number `first..first + n`, so a scenario can grow one
/// platform's customers in steps without reusing an email.
pub async fn closed_loop_from(
    clients: &CrmClients,
    first: usize,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<ClosedLoop> {
    let end = first + n;
    let next = Arc::new(AtomicUsize::new(first));
    let retries = Arc::new(AtomicU64::new(0));
    let workers = concurrency.clamp(1, n.max(1));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for worker in 0..workers {
        // Each caller keeps to one connection, so the load spreads evenly with no per-call
        // choice; each keeps its own histogram and list, merged at the end, so callers never
        // contend on a lock.
        let (crm, next, retries) = (clients.get(worker), Arc::clone(&next), Arc::clone(&retries));
        let (request_ids, batch) = (clients.request_ids, clients.batch);
        tasks.spawn(async move {
            let mut created = Vec::with_capacity(n / workers + 1);
            let mut latency = histogram();
            loop {
                let i = next.fetch_add(batch, Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, Status>((created, latency));
                }
                let sent = Instant::now();
                if batch == 1 {
                    let request_id = request_ids.make();
                    created
                        .push(create_customer(crm.clone(), i as u64, request_id, &retries).await?);
                } else {
                    let n = batch.min(end - i) as u64;
                    created.extend(
                        create_customers(crm.clone(), i as u64, n, request_ids, &retries).await?,
                    );
                }
                record_duration(&mut latency, sent.elapsed());
            }
        });
    }
    let mut created = Vec::with_capacity(n);
    let mut latency = histogram();
    while let Some(joined) = tasks.join_next().await {
        // The first failure ends the run; dropping `tasks` aborts the other callers.
        let (part, part_latency) = joined?.context("CreateCustomer failed")?;
        created.extend(part);
        latency.add(&part_latency)?;
    }
    Ok(ClosedLoop {
        created,
        latency,
        elapsed: start.elapsed(),
        retries: retries.load(Ordering::Relaxed),
    })
}

/// What an open-loop run did.
pub struct OpenLoop {
    /// Every customer created, in no particular order.
    pub created: Vec<Created>,
    /// From each call's scheduled send time to its reply, in microseconds. Measured from the
    /// schedule, not from the actual send, so a load generator that falls behind shows up
    /// as latency instead of hiding it (coordinated omission).
    pub response: Histogram<u64>,
    /// From the first scheduled send to the last actual send.
    pub send_elapsed: Duration,
    /// Largest delay of an actual send behind its schedule.
    pub max_send_lag: Duration,
    /// Most calls in flight at once.
    pub max_in_flight: usize,
    /// Transient failures retried.
    pub retries: u64,
}

/// Creates customers at `rate` per second for `duration`: call `k` is sent at `start + k /
/// rate`, whatever happened to the calls before it.
pub async fn open_loop(
    clients: &CrmClients,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<OpenLoop> {
    let total = ((rate * duration.as_secs_f64()).round() as u64).max(1);
    let period = Duration::from_secs_f64(1.0 / rate);
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let mut created = Vec::with_capacity(total as usize);
    let mut response = histogram();
    let (mut max_send_lag, mut max_in_flight) = (Duration::ZERO, 0);
    let start = Instant::now();
    let mut last_send = start;
    let mut k: u64 = 0;
    loop {
        let due = start + period.mul_f64(k as f64);
        tokio::select! {
            // The schedule first: replies can wait a moment to be counted, sends cannot.
            biased;
            () = tokio::time::sleep_until(due), if k < total && tasks.len() < MAX_IN_FLIGHT => {
                last_send = Instant::now();
                max_send_lag = max_send_lag.max(last_send - due);
                let (crm, retries) = (clients.get(k as usize), Arc::clone(&retries));
                let request_id = clients.request_ids.make();
                tasks.spawn(async move {
                    let result = create_customer(crm, k, request_id, &retries).await;
                    (result, due.elapsed())
                });
                max_in_flight = max_in_flight.max(tasks.len());
                k += 1;
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let (result, since_due) = joined?;
                created.push(result.context("CreateCustomer failed")?);
                record_duration(&mut response, since_due);
            }
            else => break,
        }
    }
    Ok(OpenLoop {
        created,
        response,
        send_elapsed: last_send - start,
        max_send_lag,
        max_in_flight,
        retries: retries.load(Ordering::Relaxed),
    })
}
