//! The integration service's guarantee, end to end: CRM, Inventory and the integration
//! service each run on a real loopback socket, and whatever happens to them (streaming or
//! polling, restarts, crashes, outages, rejections, expired checkpoints) every customer ends
//! up with exactly one welcome package request.
//!
//! The core scenarios run twice (`backend_tests!`): with the integration service's store in
//! SQLite and in PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{
    CONVERGE_TIMEOUT, Crm, Dirs, Integration, InventoryClient, Load, Platform, all_customer_ids,
    bounded, create_customers, crm_head, crm_options, eventually, integration_options,
    system_clock, wait_for_exactly_one_package_each, welcome_packages_per_customer,
};
use mip_crm::CrmOptions;
use mip_integration::Mode;
use mip_integration::store::Move;
use mip_integration::tracker::Mark;
use mip_proto::crm::v1::ListCustomerEventsRequest;
use mip_proto::integration::v1::{
    FeedMode, ListDeadLettersRequest, ListDeadLettersResponse, RetryDeadLettersRequest,
};
use mip_proto::inventory::v1 as inventory;
use mip_proto::inventory::v1::inventory_service_server::{
    InventoryService, InventoryServiceServer,
};
use mip_runtime::clock::ManualClock;
use mip_runtime::store::Database;
use mip_testkit::backend_tests;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

/// Customers per test, unless a test needs a different number.
const CUSTOMERS: usize = 200;

backend_tests! {
    async fn every_customer_gets_exactly_one_package_when_streaming(db: Database) {
        bounded(async {
            let platform = Platform::start_on(Mode::Stream, &db).await;
            let ids = create_customers(&platform.crm.client(), CUSTOMERS).await;
            wait_for_exactly_one_package_each(
                &platform.inventory.client(),
                &ids,
                CONVERGE_TIMEOUT,
            )
            .await;
            let head = crm_head(&platform.crm.client()).await;
            let status = platform.integration.wait_for_checkpoint(head).await;
            assert_eq!(status.mode(), FeedMode::Stream);
            assert_eq!(status.dead_lettered, 0);
            assert!(status.delivered >= CUSTOMERS as i64, "{status:?}");
            platform.stop().await;
        })
        .await;
    }

    async fn every_customer_gets_exactly_one_package_when_polling(db: Database) {
        bounded(async {
            let platform = Platform::start_on(Mode::Poll, &db).await;
            let ids = create_customers(&platform.crm.client(), CUSTOMERS).await;
            wait_for_exactly_one_package_each(
                &platform.inventory.client(),
                &ids,
                CONVERGE_TIMEOUT,
            )
            .await;
            let head = crm_head(&platform.crm.client()).await;
            let status = platform.integration.wait_for_checkpoint(head).await;
            assert_eq!(status.mode(), FeedMode::Poll);
            assert_eq!(status.mode_switches, 0, "{status:?}");
            assert!(!status.stream_connected);
            platform.stop().await;
        })
        .await;
    }

    async fn restart_of_integration_service_mid_run_loses_and_duplicates_nothing(db: Database) {
        bounded(async {
            let mut platform = Platform::start_on(Mode::Auto, &db).await;
            let load = Load::start(&platform.crm.client(), 8);
            load.wait_for(100).await;
            platform.integration.crash().await;
            load.wait_for(200).await;
            platform.integration.restart().await;
            load.wait_for(300).await;
            let ids = load.finish().await;
            assert_eq!(
                sorted(all_customer_ids(&platform.crm.client()).await),
                sorted(ids.clone()),
                "CRM holds exactly the customers the test created"
            );
            wait_for_exactly_one_package_each(
                &platform.inventory.client(),
                &ids,
                CONVERGE_TIMEOUT,
            )
            .await;
            let head = crm_head(&platform.crm.client()).await;
            platform.integration.wait_for_checkpoint(head).await;
            platform.stop().await;
        })
        .await;
    }

    async fn crash_with_deliveries_in_flight_redelivers_them_after_restart(db: Database) {
        bounded(async {
            let mut platform = Platform::start_on(Mode::Stream, &db).await;
            let crm = platform.crm.client();
            // With Inventory down every delivery keeps retrying, so the crash below is sure to
            // interrupt deliveries in flight: the checkpoint must not have passed any of them.
            platform.inventory.stop().await;
            let ids = create_customers(&crm, CUSTOMERS).await;
            eventually("deliveries to be retrying", CONVERGE_TIMEOUT, || async {
                let status = platform.integration.status().await;
                (status.retried >= CUSTOMERS as i64).then_some(())
            })
            .await;
            platform.integration.crash().await;
            platform.inventory.restart().await;
            platform.integration.restart().await;
            wait_for_exactly_one_package_each(
                &platform.inventory.client(),
                &ids,
                CONVERGE_TIMEOUT,
            )
            .await;
            let status = platform.integration.status().await;
            assert_eq!(status.dead_lettered, 0, "{status:?}");
            platform.stop().await;
        })
        .await;
    }

    async fn rejected_package_is_dead_lettered_and_redriven_after_fix(db: Database) {
        bounded(rejected_package_is_dead_lettered_and_redriven(true, &db)).await;
    }

    async fn start_position_latest_skips_existing_customers_and_pins_the_head_at_once(
        db: Database
    ) {
        bounded(start_position_latest_skips_existing_customers(&db)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_falls_back_to_polling_when_watch_is_disabled() {
    bounded(async {
        let dirs = Dirs::new();
        let options = CrmOptions {
            disable_watch: true,
            ..crm_options()
        };
        let mut crm = Crm::start(&dirs.crm(), options, system_clock()).await;
        let mut inventory = common::Inventory::start(&dirs.inventory()).await;
        let mut integration = Integration::start(
            &dirs.integration_db(),
            integration_options(crm.addr, inventory.addr, Mode::Auto),
        )
        .await;
        let ids = create_customers(&crm.client(), CUSTOMERS).await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        let status = integration.status().await;
        assert_eq!(status.mode(), FeedMode::Poll, "{status:?}");
        assert!(status.mode_switches >= 1, "{status:?}");
        assert!(!status.stream_connected);
        assert_eq!(status.configured_mode, "auto");
        integration.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_customers_get_packages_on_first_start() {
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = common::Inventory::start(&dirs.inventory()).await;
        let ids = create_customers(&crm.client(), CUSTOMERS).await;
        // No checkpoint yet, and the default start position is the earliest event.
        let mut integration = Integration::start(
            &dirs.integration_db(),
            integration_options(crm.addr, inventory.addr, Mode::Auto),
        )
        .await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        integration.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_outage_backlog_drains_without_loss_or_duplicates() {
    bounded(async {
        let mut platform = Platform::start(Mode::Stream).await;
        let crm = platform.crm.client();
        let mut ids = create_customers(&crm, 50).await;
        wait_for_exactly_one_package_each(&platform.inventory.client(), &ids, CONVERGE_TIMEOUT)
            .await;

        platform.inventory.stop().await;
        ids.extend(create_customers(&crm, 150).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        platform.inventory.restart().await;

        wait_for_exactly_one_package_each(&platform.inventory.client(), &ids, CONVERGE_TIMEOUT)
            .await;
        let head = crm_head(&crm).await;
        let status = platform.integration.wait_for_checkpoint(head).await;
        assert!(status.retried > 0, "the outage caused retries: {status:?}");
        assert_eq!(status.dead_lettered, 0, "{status:?}");
        platform.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_restart_mid_stream_resumes_without_gap() {
    bounded(async {
        let mut platform = Platform::start(Mode::Stream).await;
        let load = Load::start(&platform.crm.client(), 8);
        load.wait_for(100).await;
        platform.crm.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        platform.crm.restart().await;
        load.wait_for(250).await;
        let ids = load.finish().await;
        assert_eq!(
            sorted(all_customer_ids(&platform.crm.client()).await),
            sorted(ids.clone()),
            "CRM holds exactly the customers the test created"
        );
        wait_for_exactly_one_package_each(&platform.inventory.client(), &ids, CONVERGE_TIMEOUT)
            .await;
        let head = crm_head(&platform.crm.client()).await;
        let status = platform.integration.wait_for_checkpoint(head).await;
        assert_eq!(status.mode(), FeedMode::Stream);
        platform.stop().await;
    })
    .await;
}

/// An Inventory in front of the real one that rejects one customer's package request (or
/// everyone's) as invalid while `reject` is set, and forwards everything else. Without `batches` it is an
/// Inventory from before `BatchCreatePackageRequests` (UNIMPLEMENTED).
struct RejectingInventory {
    /// The real Inventory.
    real: InventoryClient,
    /// Whether to reject now.
    reject: Arc<AtomicBool>,
    /// The customer to reject.
    /// The customer to reject; `None` rejects every customer.
    customer_id: Option<String>,
    /// Whether it serves `BatchCreatePackageRequests`.
    batches: bool,
}

impl RejectingInventory {
    /// Whether `customer_id`'s package request is rejected now.
    fn rejects(&self, customer_id: &str) -> bool {
        self.reject.load(Ordering::SeqCst)
            && self.customer_id.as_deref().is_none_or(|c| c == customer_id)
    }
}

#[tonic::async_trait]
impl InventoryService for RejectingInventory {
    async fn create_package_request(
        &self,
        request: Request<inventory::CreatePackageRequestRequest>,
    ) -> Result<Response<inventory::PackageRequest>, Status> {
        let request = request.into_inner();
        if self.rejects(&request.customer_id) {
            return Err(Status::invalid_argument(
                "customer_id: rejected by the test",
            ));
        }
        let response = self.real.clone().create_package_request(request).await?;
        Ok(Response::new(response.into_inner()))
    }

    async fn batch_create_package_requests(
        &self,
        request: Request<inventory::BatchCreatePackageRequestsRequest>,
    ) -> Result<Response<inventory::BatchCreatePackageRequestsResponse>, Status> {
        if !self.batches {
            return Err(Status::unimplemented("an Inventory from before batches"));
        }
        let mut request = request.into_inner();
        let rejected: Vec<bool> = request
            .requests
            .iter()
            .map(|r| self.rejects(&r.customer_id))
            .collect();
        request.requests.retain(|r| !self.rejects(&r.customer_id));
        let mut forwarded = if request.requests.is_empty() {
            Vec::new()
        } else {
            self.real
                .clone()
                .batch_create_package_requests(request)
                .await?
                .into_inner()
                .results
        }
        .into_iter();
        let results = rejected
            .into_iter()
            .map(|rejected| {
                if rejected {
                    inventory::CreatePackageRequestResult {
                        result: Some(inventory::create_package_request_result::Result::Error(
                            inventory::BatchItemError {
                                code: Code::InvalidArgument as i32,
                                message: "customer_id: rejected by the test".into(),
                                field_violations: Vec::new(),
                                reason: "INVALID_FIELD".into(),
                            },
                        )),
                    }
                } else {
                    forwarded.next().expect("one result per forwarded request")
                }
            })
            .collect();
        Ok(Response::new(
            inventory::BatchCreatePackageRequestsResponse { results },
        ))
    }

    async fn get_package_request(
        &self,
        request: Request<inventory::GetPackageRequestRequest>,
    ) -> Result<Response<inventory::PackageRequest>, Status> {
        let response = self
            .real
            .clone()
            .get_package_request(request.into_inner())
            .await?;
        Ok(Response::new(response.into_inner()))
    }

    async fn list_package_requests(
        &self,
        request: Request<inventory::ListPackageRequestsRequest>,
    ) -> Result<Response<inventory::ListPackageRequestsResponse>, Status> {
        let response = self
            .real
            .clone()
            .list_package_requests(request.into_inner())
            .await?;
        Ok(Response::new(response.into_inner()))
    }

    async fn update_package_request_status(
        &self,
        request: Request<inventory::UpdatePackageRequestStatusRequest>,
    ) -> Result<Response<inventory::PackageRequest>, Status> {
        let response = self
            .real
            .clone()
            .update_package_request_status(request.into_inner())
            .await?;
        Ok(Response::new(response.into_inner()))
    }
}

async fn dead_letters(integration: &Integration) -> ListDeadLettersResponse {
    integration
        .client()
        .list_dead_letters(ListDeadLettersRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("ListDeadLetters")
        .into_inner()
}

/// The same guarantees against an Inventory from before `BatchCreatePackageRequests`: the
/// service falls back to one `CreatePackageRequest` per package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_without_batches_gets_the_same_guarantees_one_call_at_a_time() {
    let dirs = Dirs::new();
    bounded(rejected_package_is_dead_lettered_and_redriven(
        false,
        &dirs.integration_db(),
    ))
    .await;
}

/// A [`RejectingInventory`] serving on a loopback port.
struct Proxy {
    /// Where it listens.
    addr: std::net::SocketAddr,
    /// Clear it to stop rejecting.
    reject: Arc<AtomicBool>,
    /// The server.
    served: common::Served,
}

impl Proxy {
    /// A proxy in front of `real` that rejects `customer_id`'s package (every customer's if
    /// `None`) until told not to.
    async fn start(real: InventoryClient, customer_id: Option<String>, batches: bool) -> Self {
        let reject = Arc::new(AtomicBool::new(true));
        let proxy = RejectingInventory {
            real,
            reject: Arc::clone(&reject),
            customer_id,
            batches,
        };
        let served = common::Served::start(
            Server::builder().add_service(InventoryServiceServer::new(proxy)),
        )
        .await;
        Self {
            addr: served.addr,
            reject,
            served,
        }
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}

async fn rejected_package_is_dead_lettered_and_redriven(batches: bool, database: &Database) {
    let dirs = Dirs::new();
    let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
    let mut real_inventory = common::Inventory::start(&dirs.inventory()).await;
    let inventory = real_inventory.client();
    // The customer to reject exists before the integration service starts, so the proxy
    // knows its id before any delivery is attempted.
    let rejected = create_customers(&crm.client(), 1).await.remove(0);
    let proxy = Proxy::start(inventory.clone(), Some(rejected.clone()), batches).await;
    let mut integration = Integration::start(
        database,
        integration_options(crm.addr, proxy.addr, Mode::Stream),
    )
    .await;

    // It is dead-lettered at once, as a permanent failure.
    let letters = eventually("the dead letter", CONVERGE_TIMEOUT, || async {
        let letters = dead_letters(&integration).await;
        (!letters.dead_letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.dead_letters.len(), 1, "{letters:?}");
    let letter = &letters.dead_letters[0];
    assert_eq!(letter.customer_id, rejected);
    assert!(
        letter.reason.contains("InvalidArgument"),
        "reason: {}",
        letter.reason
    );
    assert_eq!(letter.attempts, 1, "permanent failures are not retried");
    let status = integration.status().await;
    assert_eq!(status.dead_lettered, 1, "{status:?}");
    assert_eq!(status.dead_letters_pending, 1, "{status:?}");

    // It does not hold back anyone else: later customers get their packages and the
    // checkpoint moves past it to the head.
    let later = create_customers(&crm.client(), 100).await;
    wait_for_exactly_one_package_each(&inventory, &later, CONVERGE_TIMEOUT).await;
    let head = crm_head(&crm.client()).await;
    integration.wait_for_checkpoint(head).await;
    let counts = welcome_packages_per_customer(&inventory).await.unwrap();
    assert!(!counts.contains_key(&rejected));

    // Once the cause is fixed, a re-drive delivers it.
    proxy.reject.store(false, Ordering::SeqCst);
    let retried = integration
        .client()
        .retry_dead_letters(RetryDeadLettersRequest { event_ids: vec![] })
        .await
        .expect("RetryDeadLetters")
        .into_inner();
    assert_eq!(retried.delivered, 1, "{retried:?}");
    assert_eq!(retried.still_failing, 0, "{retried:?}");
    let letters = dead_letters(&integration).await;
    assert!(letters.dead_letters.is_empty(), "{letters:?}");
    assert_eq!(integration.status().await.dead_letters_pending, 0);
    let mut everyone = later;
    everyone.push(rejected);
    wait_for_exactly_one_package_each(&inventory, &everyone, CONVERGE_TIMEOUT).await;

    integration.stop().await;
    proxy.stop().await;
    real_inventory.stop().await;
    crm.stop().await;
}

/// Two integration services on one PostgreSQL database see one dead-letter list: the one
/// holding the customer's partition dead-letters it, the other lists it too, and a re-drive
/// through either clears it for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_on_one_postgres_database_share_the_dead_letters() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut real_inventory = common::Inventory::start(&dirs.inventory()).await;
        let inventory = real_inventory.client();
        let proxy = Proxy::start(inventory.clone(), None, true).await;
        let options = integration_options(crm.addr, proxy.addr, Mode::Stream);
        let mut first = Integration::start(&database, options.clone()).await;
        let mut second = Integration::start(&database, options).await;
        // Created once the two have split the partitions, so exactly one of them tries it.
        common::wait_for_split(&[&first, &second]).await;
        let rejected = create_customers(&crm.client(), 1).await.remove(0);

        let letters = eventually(
            "the owner's attempt on the dead letter",
            CONVERGE_TIMEOUT,
            || async {
                let letters = dead_letters(&second).await;
                letters
                    .dead_letters
                    .first()
                    .is_some_and(|letter| letter.attempts == 1)
                    .then_some(letters)
            },
        )
        .await;
        assert_eq!(letters.dead_letters.len(), 1, "{letters:?}");
        assert_eq!(letters.dead_letters[0].customer_id, rejected);
        assert_eq!(
            dead_letters(&first).await.dead_letters,
            letters.dead_letters
        );
        // Only the worker holding the customer's partition tried it.
        assert_eq!(
            first.status().await.dead_lettered + second.status().await.dead_lettered,
            1
        );

        proxy.reject.store(false, Ordering::SeqCst);
        let retried = first
            .client()
            .retry_dead_letters(RetryDeadLettersRequest { event_ids: vec![] })
            .await
            .expect("RetryDeadLetters")
            .into_inner();
        assert_eq!(retried.delivered, 1, "{retried:?}");
        assert!(dead_letters(&second).await.dead_letters.is_empty());
        assert_eq!(second.status().await.dead_letters_pending, 0);
        wait_for_exactly_one_package_each(&inventory, &[rejected], CONVERGE_TIMEOUT).await;

        second.stop().await;
        first.stop().await;
        proxy.stop().await;
        real_inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

/// The idempotency key depends on the customer id alone: two services that share nothing but
/// CRM and Inventory (separate stores: a SQLite data directory, and a PostgreSQL database
/// where PostgreSQL is installed, else a second data directory) both deliver every customer,
/// and Inventory still holds one package each, because both sent the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_on_separate_stores_derive_the_same_key_for_each_customer() {
    bounded(async {
        let dirs = Dirs::new();
        let other_dir = tempfile::tempdir().unwrap();
        let other = mip_testkit::postgres_database().unwrap_or_else(|| Database::Sqlite {
            dir: other_dir.path().to_path_buf(),
            durability: mip_runtime::sqlite::Durability::Normal,
        });
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = common::Inventory::start(&dirs.inventory()).await;
        let ids = create_customers(&crm.client(), CUSTOMERS).await;
        let options = integration_options(crm.addr, inventory.addr, Mode::Auto);
        let mut first = Integration::start(&dirs.integration_db(), options.clone()).await;
        let mut second = Integration::start(&other, options).await;
        let head = crm_head(&crm.client()).await;
        for service in [&first, &second] {
            let status = service.wait_for_checkpoint(head).await;
            assert!(status.delivered >= CUSTOMERS as i64, "{status:?}");
            assert_eq!(status.dead_lettered, 0, "{status:?}");
        }
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        second.stop().await;
        first.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_checkpoint_triggers_relist() {
    bounded(async {
        let dirs = Dirs::new();
        // CRM's clock only moves when the test says so: events expire exactly when it jumps.
        let clock = ManualClock::new(SystemTime::now());
        let options = CrmOptions {
            event_retention: Some(Duration::from_millis(200)),
            ..crm_options()
        };
        let mut crm = Crm::start(&dirs.crm(), options, Arc::new(clock.clone())).await;
        let mut inventory = common::Inventory::start(&dirs.inventory()).await;
        let mut integration = Integration::start(
            &dirs.integration_db(),
            integration_options(crm.addr, inventory.addr, Mode::Stream),
        )
        .await;
        let mut ids = create_customers(&crm.client(), 50).await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        let head = crm_head(&crm.client()).await;
        let saved = integration.wait_for_checkpoint(head).await.checkpoint;
        integration.stop().await;

        // While it is stopped, customers are created and then every event expires, so its
        // checkpoint no longer points into the log.
        ids.extend(create_customers(&crm.client(), 50).await);
        clock.advance(Duration::from_secs(3600));
        let client = crm.client();
        eventually("the checkpoint to expire", CONVERGE_TIMEOUT, || {
            let mut client = client.clone();
            let saved = saved.clone();
            async move {
                let result = client
                    .list_customer_events(ListCustomerEventsRequest {
                        resume_token: saved,
                        start_position: 0,
                        page_size: 1,
                        partition_filter: None,
                    })
                    .await;
                matches!(result, Err(status) if status.code() == Code::FailedPrecondition)
                    .then_some(())
            }
        })
        .await;

        // After a restart it relists, and the customers whose events expired get packages too.
        integration.restart().await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        // And it keeps following the feed from the listing's snapshot.
        ids.extend(create_customers(&crm.client(), 20).await);
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        let head = crm_head(&crm.client()).await;
        integration.wait_for_checkpoint(head).await;

        integration.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

async fn start_position_latest_skips_existing_customers(database: &Database) {
    let dirs = Dirs::new();
    let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
    let mut inventory = common::Inventory::start(&dirs.inventory()).await;
    let existing = create_customers(&crm.client(), 20).await;
    let head = common::crm_head(&crm.client()).await;
    let mut options = integration_options(crm.addr, inventory.addr, Mode::Auto);
    options.start_position = mip_integration::StartPosition::Latest;
    let mut integration = Integration::start(database, options).await;
    // The head is saved as the first checkpoint before anything is read, so a crash before
    // the first event cannot move "latest" on past customers created meanwhile.
    integration.wait_for_checkpoint(head).await;
    integration.crash().await;
    let created_while_down = create_customers(&crm.client(), 10).await;
    integration.restart().await;
    let new = create_customers(&crm.client(), 10).await;
    let mut expected = created_while_down;
    expected.extend(new);
    wait_for_exactly_one_package_each(&inventory.client(), &expected, CONVERGE_TIMEOUT).await;
    let counts = common::welcome_packages_per_customer(&inventory.client())
        .await
        .unwrap();
    for id in &existing {
        assert!(
            !counts.contains_key(id),
            "customer {id} predates the first start"
        );
    }
    integration.stop().await;
    inventory.stop().await;
    crm.stop().await;
}

backend_tests! {
    /// CRM's database is replaced by an empty one (a new change log, numbered from 1 again):
    /// the integration service relists, and the snapshot replaces its checkpoint although the
    /// old log's checkpoint is numbered higher. A checkpoint left on the old log would make
    /// every restart relist again, and the new log's positions would not be saved until they
    /// passed the old ones.
    async fn a_replaced_crm_database_moves_the_checkpoint_onto_the_new_log(db: Database) {
        bounded(async {
            let dirs = Dirs::new();
            let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
            let mut inventory = common::Inventory::start(&dirs.inventory()).await;
            let mut integration = Integration::start(
                &db,
                integration_options(crm.addr, inventory.addr, Mode::Stream),
            )
            .await;
            let mut ids = create_customers(&crm.client(), 30).await;
            let old_head = crm_head(&crm.client()).await;
            integration.wait_for_checkpoint(old_head).await;

            crm.stop().await;
            std::fs::remove_dir_all(dirs.crm()).expect("remove CRM's data");
            std::fs::create_dir_all(dirs.crm()).expect("recreate CRM's data directory");
            crm.restart().await;
            ids.extend(create_customers(&crm.client(), 5).await);
            wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
            let new_head = crm_head(&crm.client()).await;
            assert!(new_head < old_head, "the new log starts again from 1");
            let status = eventually(
                "the checkpoint to move onto the new log",
                CONVERGE_TIMEOUT,
                || async {
                    let status = integration.status().await;
                    (status.checkpoint_sequence == new_head).then_some(status)
                },
            )
            .await;
            assert_eq!(status.dead_lettered, 0, "{status:?}");
            // The old database's customers are missing from the new one, but that is no
            // proof they were deleted (an empty volume, a mistaken address): their packages
            // stay as they were.
            let packages = inventory
                .client()
                .list_package_requests(inventory::ListPackageRequestsRequest {
                    customer_id: String::new(),
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await
                .expect("ListPackageRequests")
                .into_inner()
                .package_requests;
            assert_eq!(packages.len(), ids.len());
            assert!(
                packages.iter().all(|p| p.status() == inventory::PackageStatus::Pending),
                "{packages:?}"
            );

            // After a restart it resumes on the new log, and follows it on.
            integration.stop().await;
            integration.restart().await;
            ids.extend(create_customers(&crm.client(), 5).await);
            wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
            integration.wait_for_checkpoint(new_head + 5).await;

            integration.stop().await;
            inventory.stop().await;
            crm.stop().await;
        })
        .await;
    }

    /// A worker that died holding every partition (here: leases taken straight in the store,
    /// as its process left them) is restarted under the same `--worker-id`: it takes them back
    /// at once instead of waiting out a lease far longer than the test may take.
    async fn a_worker_restarted_under_its_name_resumes_without_waiting_for_its_old_leases(db: Database) {
        bounded(async {
            let dirs = Dirs::new();
            let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
            let mut inventory = common::Inventory::start(&dirs.inventory()).await;
            let options = mip_integration::IntegrationOptions {
                worker_id: Some("worker-a".to_owned()),
                lease_ttl: CONVERGE_TIMEOUT * 2,
                ..integration_options(crm.addr, inventory.addr, Mode::Stream)
            };
            let store = common::staged_store(&db, options.partitions).await;
            store.heartbeat("worker-a", SystemTime::now()).await.unwrap();
            let held = store
                .acquire("worker-a", options.partitions, options.lease_ttl, SystemTime::now())
                .await
                .unwrap();
            assert_eq!(held.len(), options.partitions as usize);

            let mut integration = Integration::start(&db, options).await;
            let ids = create_customers(&crm.client(), 20).await;
            wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
            let status = integration.status().await;
            assert_eq!(status.worker_id, "worker-a");
            assert_eq!(status.partitions.len(), held.len(), "{status:?}");

            integration.stop().await;
            inventory.stop().await;
            crm.stop().await;
        })
        .await;
    }

    /// CRM's database was replaced and one worker relisted onto the new log while another,
    /// down, kept its partitions' checkpoints on the old one. A worker that then follows
    /// partitions from both logs cannot compare their positions: it relists, so the old
    /// log's partitions miss none of the new database's customers.
    async fn partitions_with_checkpoints_from_two_change_logs_are_relisted(db: Database) {
        bounded(async {
            let dirs = Dirs::new();
            let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
            let mut inventory = common::Inventory::start(&dirs.inventory()).await;
            let ids = create_customers(&crm.client(), 30).await;
            let head = crm
                .client()
                .list_customer_events(ListCustomerEventsRequest {
                    resume_token: String::new(),
                    start_position: mip_proto::crm::v1::StartPosition::Latest.into(),
                    page_size: 1,
                    partition_filter: None,
                })
                .await
                .expect("CRM's head")
                .into_inner();
            let options = integration_options(crm.addr, inventory.addr, Mode::Stream);

            // Half the partitions are past every customer on this log (as if relisted onto
            // it); the other half are far ahead on a log this CRM never had.
            let store = common::staged_store(&db, options.partitions).await;
            let taken = store
                .acquire("setup", options.partitions, Duration::from_secs(60), SystemTime::now())
                .await
                .unwrap();
            let leases: Vec<(u32, i64)> = taken.iter().map(|l| (l.partition, l.epoch)).collect();
            let (relisted, old) = leases.split_at(leases.len() / 2);
            let current = Mark { sequence: head.next_sequence, token: head.next_resume_token };
            let old_log = mip_runtime::token::crm_resume_log(&current.token).unwrap() + 1;
            let foreign = Mark {
                sequence: current.sequence + 1000,
                token: mip_runtime::token::encode(
                    mip_runtime::token::CRM_RESUME,
                    &[old_log, current.sequence.unsigned_abs() + 1000],
                ),
            };
            for (part, mark) in [(relisted, &current), (old, &foreign)] {
                let fenced = store
                    .save_checkpoints("setup", part, mark, Move::Forward, SystemTime::now())
                    .await
                    .unwrap();
                assert!(fenced.is_empty());
            }
            store.retire("setup", &leases).await.unwrap();

            let in_old_log = ids
                .iter()
                .filter(|id| {
                    let id = uuid::Uuid::parse_str(id).expect("a UUID");
                    let partition = mip_runtime::partition::of(&id, options.partitions);
                    old.iter().any(|(p, _)| *p == partition)
                })
                .count();
            assert!(in_old_log > 0, "some customers fall in the old log's partitions");
            let mut integration = Integration::start(&db, options).await;
            // A relist delivers for every customer; those of the old log's partitions would
            // get none without it.
            wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
            // One relist, then it follows the feed: with no new writes its snapshot is the
            // checkpoint it started from, which must not make it relist again and again.
            eventually("the worker to follow the feed", CONVERGE_TIMEOUT, || async {
                integration.status().await.stream_connected.then_some(())
            })
            .await;

            integration.stop().await;
            inventory.stop().await;
            crm.stop().await;
        })
        .await;
    }
}
