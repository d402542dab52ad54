//! The integration service follows a customer's whole life: a customer deleted in CRM while
//! its welcome package is still PENDING gets the package cancelled, whatever happens around
//! it (a create still in flight, Inventory down, a restart that redelivers old events, a relist
//! after the events expired, a cancel Inventory refuses until fixed). A package that has
//! shipped is left as it is.
//!
//! Real CRM, Inventory and integration services on loopback ports, as in `delivery.rs`; the
//! scenarios that touch the integration store run on SQLite and on PostgreSQL
//! (`backend_tests!`).

// This file uses part of the shared harness.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{
    CONVERGE_TIMEOUT, Crm, CrmClient, Dirs, Integration, InventoryClient, bounded,
    create_customers, crm_head, crm_options, eventually, integration_options, system_clock,
};
use mip_crm::CrmOptions;
use mip_integration::Mode;
use mip_integration::deliver::PACKAGE_TYPE;
use mip_proto::crm::v1 as crm;
use mip_proto::crm::v1::crm_service_server::{CrmService, CrmServiceServer};
use mip_proto::crm::v1::{DeleteCustomerRequest, ListCustomerEventsRequest};
use mip_proto::integration::v1::{
    DeadLetterAction, ListDeadLettersRequest, RetryDeadLettersRequest,
};
use mip_proto::inventory::v1 as inventory;
use mip_proto::inventory::v1::inventory_service_server::{
    InventoryService, InventoryServiceServer,
};
use mip_proto::inventory::v1::{
    ListPackageRequestsRequest, PackageStatus, UpdatePackageRequestStatusRequest,
};
use mip_runtime::clock::ManualClock;
use mip_runtime::store::Database;
use mip_testkit::backend_tests;
use tokio::sync::Notify;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

/// Deletes a customer in CRM.
async fn delete_customer(crm: &CrmClient, id: &str) {
    crm.clone()
        .delete_customer(DeleteCustomerRequest { id: id.to_owned() })
        .await
        .expect("DeleteCustomer");
}

/// The status of every welcome package, by customer; fails if a customer has two.
async fn package_statuses(inventory: &InventoryClient) -> HashMap<String, PackageStatus> {
    let mut inventory = inventory.clone();
    let mut statuses = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = inventory
            .list_package_requests(ListPackageRequestsRequest {
                customer_id: String::new(),
                page_size: 1000,
                page_token,
            })
            .await
            .expect("ListPackageRequests")
            .into_inner();
        for package in page.package_requests {
            if package.package_type == PACKAGE_TYPE {
                let status = package.status();
                let earlier = statuses.insert(package.customer_id.clone(), status);
                assert!(
                    earlier.is_none(),
                    "customer {} has two welcome packages",
                    package.customer_id
                );
            }
        }
        if page.next_page_token.is_empty() {
            return statuses;
        }
        page_token = page.next_page_token;
    }
}

/// Waits until every customer of `expected` has exactly one welcome package in the status
/// given, and nobody else has one.
async fn wait_for_statuses(inventory: &InventoryClient, expected: &HashMap<String, PackageStatus>) {
    eventually(
        "every customer's package to be in its expected status",
        CONVERGE_TIMEOUT,
        || async {
            let statuses = package_statuses(inventory).await;
            let unexpected: Vec<_> = statuses
                .keys()
                .filter(|c| !expected.contains_key(*c))
                .collect();
            assert!(unexpected.is_empty(), "packages for {unexpected:?}");
            (statuses == *expected).then_some(())
        },
    )
    .await;
}

/// `ids` all expected in `status`.
fn all(ids: &[String], status: PackageStatus) -> HashMap<String, PackageStatus> {
    ids.iter().map(|id| (id.clone(), status)).collect()
}

/// The id of `customer_id`'s welcome package, once it exists.
async fn package_id(inventory: &InventoryClient, customer_id: &str) -> String {
    eventually("the welcome package", CONVERGE_TIMEOUT, || async {
        let page = inventory
            .clone()
            .list_package_requests(ListPackageRequestsRequest {
                customer_id: customer_id.to_owned(),
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .ok()?
            .into_inner();
        page.package_requests.into_iter().next().map(|p| p.id)
    })
    .await
}

/// CRM, Inventory and an integration service whose Inventory address is `inventory_addr`
/// (the real one, or a proxy in front of it).
struct Services {
    crm: Crm,
    inventory: common::Inventory,
    /// Kept until the end so the data directories outlive the servers.
    dirs: Dirs,
}

impl Services {
    async fn start(crm_options: CrmOptions, clock: mip_runtime::clock::SharedClock) -> Self {
        let dirs = Dirs::new();
        let crm = Crm::start(&dirs.crm(), crm_options, clock).await;
        let inventory = common::Inventory::start(&dirs.inventory()).await;
        Self {
            crm,
            inventory,
            dirs,
        }
    }

    async fn stop(mut self) {
        self.inventory.stop().await;
        self.crm.stop().await;
        drop(self.dirs);
    }
}

backend_tests! {
    async fn a_deleted_customers_pending_package_is_cancelled_and_the_others_stay_pending(
        db: Database
    ) {
        bounded(async {
            let services = Services::start(crm_options(), system_clock()).await;
            let (crm, inventory) = (services.crm.client(), services.inventory.client());
            let mut integration = Integration::start(
                &db,
                integration_options(services.crm.addr, services.inventory.addr, Mode::Stream),
            )
            .await;
            let ids = create_customers(&crm, 20).await;
            wait_for_statuses(&inventory, &all(&ids, PackageStatus::Pending)).await;
            let (deleted, kept) = ids.split_at(8);
            for id in deleted {
                delete_customer(&crm, id).await;
            }
            let mut expected = all(deleted, PackageStatus::Cancelled);
            expected.extend(all(kept, PackageStatus::Pending));
            wait_for_statuses(&inventory, &expected).await;
            let head = crm_head(&crm).await;
            let status = integration.wait_for_checkpoint(head).await;
            assert_eq!(status.dead_lettered, 0, "{status:?}");
            assert_eq!(status.cancelled, 8, "{status:?}");
            assert_eq!(status.cancel_left_as_is, 0, "{status:?}");
            integration.stop().await;
            services.stop().await;
        })
        .await;
    }

    async fn a_cancel_inventory_refuses_is_dead_lettered_and_redriven_as_a_cancel(db: Database) {
        bounded(async {
            let services = Services::start(crm_options(), system_clock()).await;
            let (crm, inventory) = (services.crm.client(), services.inventory.client());
            let proxy = Proxy::start(inventory.clone()).await;
            proxy.gate.refuse_cancels.store(true, Ordering::SeqCst);
            let mut integration = Integration::start(
                &db,
                integration_options(services.crm.addr, proxy.addr, Mode::Stream),
            )
            .await;
            let ids = create_customers(&crm, 2).await;
            wait_for_statuses(&inventory, &all(&ids, PackageStatus::Pending)).await;
            delete_customer(&crm, &ids[0]).await;

            // Refused for good (INVALID_ARGUMENT): dead-lettered at once, and the checkpoint
            // moves past the delete.
            let letters = eventually("the dead letter", CONVERGE_TIMEOUT, || async {
                let letters = integration
                    .client()
                    .list_dead_letters(ListDeadLettersRequest {
                        page_size: 10,
                        page_token: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .dead_letters;
                (!letters.is_empty()).then_some(letters)
            })
            .await;
            assert_eq!(letters.len(), 1, "{letters:?}");
            assert_eq!(letters[0].customer_id, ids[0]);
            assert!(letters[0].reason.contains("InvalidArgument"), "{letters:?}");
            assert_eq!(letters[0].action(), DeadLetterAction::Cancel, "{letters:?}");
            let head = crm_head(&crm).await;
            let status = integration.wait_for_checkpoint(head).await;
            assert_eq!(status.dead_lettered, 1, "{status:?}");
            assert_eq!(package_statuses(&inventory).await[&ids[0]], PackageStatus::Pending);

            // A restart in between: the letter's action is read back from the store.
            integration.stop().await;
            integration.restart().await;
            proxy.gate.refuse_cancels.store(false, Ordering::SeqCst);
            let retried = integration
                .client()
                .retry_dead_letters(RetryDeadLettersRequest { event_ids: vec![] })
                .await
                .expect("RetryDeadLetters")
                .into_inner();
            assert_eq!((retried.delivered, retried.still_failing), (1, 0), "{retried:?}");
            let mut expected = all(&ids[..1], PackageStatus::Cancelled);
            expected.extend(all(&ids[1..], PackageStatus::Pending));
            wait_for_statuses(&inventory, &expected).await;
            assert_eq!(integration.status().await.dead_letters_pending, 0);

            integration.stop().await;
            proxy.stop().await;
            services.stop().await;
        })
        .await;
    }

    async fn a_relist_cancels_the_packages_of_customers_deleted_while_the_service_was_down(
        db: Database
    ) {
        bounded(async {
            // CRM's clock only moves when the test says so: events expire exactly when it jumps.
            let clock = ManualClock::new(SystemTime::now());
            let options = CrmOptions {
                event_retention: Some(Duration::from_millis(200)),
                ..crm_options()
            };
            let services = Services::start(options, Arc::new(clock.clone())).await;
            let (crm, inventory) = (services.crm.client(), services.inventory.client());
            let mut integration = Integration::start(
                &db,
                integration_options(services.crm.addr, services.inventory.addr, Mode::Stream),
            )
            .await;
            let mut ids = create_customers(&crm, 10).await;
            wait_for_statuses(&inventory, &all(&ids, PackageStatus::Pending)).await;
            let head = crm_head(&crm).await;
            let saved = integration.wait_for_checkpoint(head).await.checkpoint;
            integration.stop().await;

            // While it is down, customers are deleted and created, and then every event
            // expires: the DELETED events are gone before it could read them.
            let deleted: Vec<String> = ids.drain(..4).collect();
            for id in &deleted {
                delete_customer(&crm, id).await;
            }
            ids.extend(create_customers(&crm, 3).await);
            clock.advance(Duration::from_secs(3600));
            eventually("the checkpoint to expire", CONVERGE_TIMEOUT, || {
                let (mut client, saved) = (crm.clone(), saved.clone());
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

            integration.restart().await;
            let mut expected = all(&deleted, PackageStatus::Cancelled);
            expected.extend(all(&ids, PackageStatus::Pending));
            wait_for_statuses(&inventory, &expected).await;
            // And it follows the feed from the snapshot: a delete from now on is cancelled too.
            delete_customer(&crm, &ids[0]).await;
            expected.insert(ids[0].clone(), PackageStatus::Cancelled);
            wait_for_statuses(&inventory, &expected).await;
            let head = crm_head(&crm).await;
            let status = integration.wait_for_checkpoint(head).await;
            assert_eq!(status.dead_lettered, 0, "{status:?}");

            integration.stop().await;
            services.stop().await;
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_deleted_while_inventory_is_down_ends_cancelled_not_pending() {
    bounded(async {
        let mut services = Services::start(crm_options(), system_clock()).await;
        let crm = services.crm.client();
        let mut integration = Integration::start(
            &services.dirs.integration_db(),
            integration_options(services.crm.addr, services.inventory.addr, Mode::Stream),
        )
        .await;
        // The create cannot land, so it is still retrying when the delete is read: both run
        // at once, and whichever reaches Inventory first once it is back, the package must
        // end CANCELLED.
        services.inventory.stop().await;
        let ids = create_customers(&crm, 5).await;
        eventually("the creates to be retrying", CONVERGE_TIMEOUT, || async {
            (integration.status().await.retried >= 5).then_some(())
        })
        .await;
        for id in &ids {
            delete_customer(&crm, id).await;
        }
        let retried = integration.status().await.retried;
        eventually(
            "the cancels to be retrying too",
            CONVERGE_TIMEOUT,
            || async { (integration.status().await.retried >= retried + 5).then_some(()) },
        )
        .await;
        services.inventory.restart().await;
        let inventory = services.inventory.client();
        wait_for_statuses(&inventory, &all(&ids, PackageStatus::Cancelled)).await;
        let head = crm_head(&crm).await;
        let status = integration.wait_for_checkpoint(head).await;
        assert_eq!(status.dead_lettered, 0, "{status:?}");
        // Every create and cancel has finished: nothing is left to move a package back.
        assert_eq!(
            package_statuses(&inventory).await,
            all(&ids, PackageStatus::Cancelled)
        );
        integration.stop().await;
        services.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_create_still_in_flight_wins_and_the_late_create_makes_nothing() {
    bounded(async {
        let services = Services::start(crm_options(), system_clock()).await;
        let (crm, inventory) = (services.crm.client(), services.inventory.client());
        let proxy = Proxy::start(inventory.clone()).await;
        proxy.gate.hold_first_create.store(true, Ordering::SeqCst);
        let mut options = integration_options(services.crm.addr, proxy.addr, Mode::Stream);
        // Long enough that the held create is not given up and retried meanwhile.
        options.call_timeout = Duration::from_secs(60);
        let mut integration = Integration::start(&services.dirs.integration_db(), options).await;

        let id = create_customers(&crm, 1).await.remove(0);
        // The customer's create reaches Inventory's door and waits there...
        tokio::time::timeout(CONVERGE_TIMEOUT, proxy.gate.held.notified())
            .await
            .expect("the create to be held");
        // ...while the delete's cancel runs; the held create goes on only after the cancel.
        delete_customer(&crm, &id).await;
        let head = crm_head(&crm).await;
        let status = integration.wait_for_checkpoint(head).await;
        assert_eq!(status.dead_lettered, 0, "{status:?}");
        assert_eq!(
            proxy.gate.calls(),
            ["create held", "create", "cancel", "create released"],
            "the cancel ran while the customer's create was in flight"
        );
        assert_eq!(
            package_statuses(&inventory).await,
            all(&[id], PackageStatus::Cancelled)
        );
        integration.stop().await;
        proxy.stop().await;
        services.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_package_is_left_shipped_when_its_customer_is_deleted() {
    bounded(async {
        let services = Services::start(crm_options(), system_clock()).await;
        let (crm, inventory) = (services.crm.client(), services.inventory.client());
        let mut integration = Integration::start(
            &services.dirs.integration_db(),
            integration_options(services.crm.addr, services.inventory.addr, Mode::Stream),
        )
        .await;
        let ids = create_customers(&crm, 2).await;
        let shipped = package_id(&inventory, &ids[0]).await;
        inventory
            .clone()
            .update_package_request_status(UpdatePackageRequestStatusRequest {
                id: shipped,
                status: PackageStatus::Shipped.into(),
            })
            .await
            .expect("ship it");
        wait_for_statuses(&inventory, &{
            let mut expected = all(&ids[..1], PackageStatus::Shipped);
            expected.extend(all(&ids[1..], PackageStatus::Pending));
            expected
        })
        .await;
        for id in &ids {
            delete_customer(&crm, id).await;
        }
        let head = crm_head(&crm).await;
        let status = integration.wait_for_checkpoint(head).await;
        // Not a failure: nothing dead-lettered, and the shipped one kept its status.
        assert_eq!(status.dead_lettered, 0, "{status:?}");
        assert_eq!(status.dead_letters_pending, 0, "{status:?}");
        assert_eq!(status.cancel_left_as_is, 1, "{status:?}");
        let mut expected = all(&ids[..1], PackageStatus::Shipped);
        expected.extend(all(&ids[1..], PackageStatus::Cancelled));
        assert_eq!(package_statuses(&inventory).await, expected);
        integration.stop().await;
        services.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_redelivered_from_an_old_checkpoint_change_nothing() {
    bounded(async {
        let services = Services::start(crm_options(), system_clock()).await;
        let (crm, inventory) = (services.crm.client(), services.inventory.client());
        let options = integration_options(services.crm.addr, services.inventory.addr, Mode::Stream);
        let mut first = Integration::start(&services.dirs.integration_db(), options.clone()).await;
        let ids = create_customers(&crm, 10).await;
        let (deleted, kept) = ids.split_at(4);
        wait_for_statuses(&inventory, &all(&ids, PackageStatus::Pending)).await;
        for id in deleted {
            delete_customer(&crm, id).await;
        }
        let mut expected = all(deleted, PackageStatus::Cancelled);
        expected.extend(all(kept, PackageStatus::Pending));
        wait_for_statuses(&inventory, &expected).await;
        let head = crm_head(&crm).await;
        first.wait_for_checkpoint(head).await;
        first.stop().await;

        // A service with no checkpoint at all (the oldest there can be) reads every create
        // and every delete again: each create finds its package, each cancel finds it
        // cancelled, and nothing changes.
        let fresh = tempfile::tempdir().unwrap();
        let again = Database::Sqlite {
            dir: fresh.path().to_path_buf(),
            durability: mip_runtime::sqlite::Durability::Normal,
        };
        let mut second = Integration::start(&again, options).await;
        let status = second.wait_for_checkpoint(head).await;
        assert_eq!(status.dead_lettered, 0, "{status:?}");
        assert!(status.delivered >= ids.len() as i64, "{status:?}");
        assert_eq!(package_statuses(&inventory).await, expected);
        second.stop().await;
        services.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_leaves_the_package_of_a_customer_it_did_not_list_but_crm_still_has() {
    bounded(async {
        let clock = ManualClock::new(SystemTime::now());
        let options = CrmOptions {
            event_retention: Some(Duration::from_millis(200)),
            ..crm_options()
        };
        let services = Services::start(options, Arc::new(clock.clone())).await;
        let (crm, inventory) = (services.crm.client(), services.inventory.client());
        let listing = ListingCrm::start(crm.clone()).await;
        let mut integration = Integration::start(
            &services.dirs.integration_db(),
            integration_options(listing.addr, services.inventory.addr, Mode::Stream),
        )
        .await;
        let ids = create_customers(&crm, 3).await;
        wait_for_statuses(&inventory, &all(&ids, PackageStatus::Pending)).await;
        let head = crm_head(&crm).await;
        let saved = integration.wait_for_checkpoint(head).await.checkpoint;
        integration.stop().await;

        // The first customer is deleted; the second is left out of the listing, as a customer
        // created just after the listing's snapshot would be. Then every event expires.
        delete_customer(&crm, &ids[0]).await;
        listing.hidden.lock().unwrap().push(ids[1].clone());
        clock.advance(Duration::from_secs(3600));
        eventually("the checkpoint to expire", CONVERGE_TIMEOUT, || {
            let (mut client, saved) = (crm.clone(), saved.clone());
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

        // Neither is listed, but only the deleted one's package is cancelled: CRM still has
        // the other.
        integration.restart().await;
        let expected: HashMap<_, _> = [
            (ids[0].clone(), PackageStatus::Cancelled),
            (ids[1].clone(), PackageStatus::Pending),
            (ids[2].clone(), PackageStatus::Pending),
        ]
        .into();
        wait_for_statuses(&inventory, &expected).await;
        let head = crm_head(&crm).await;
        integration.wait_for_checkpoint(head).await;
        assert_eq!(package_statuses(&inventory).await, expected);
        assert!(
            listing.asked.lock().unwrap().contains(&ids[1]),
            "the relist asked CRM about the customer it did not list"
        );

        integration.stop().await;
        listing.stop().await;
        services.stop().await;
    })
    .await;
}

/// A CRM in front of the real one that leaves some customers out of `ListCustomers` and
/// records whom `GetCustomer` was asked about; everything else is forwarded as is.
struct ListingProxy {
    /// The real CRM.
    real: CrmClient,
    /// Customers left out of the listing.
    hidden: Arc<Mutex<Vec<String>>>,
    /// Customers `GetCustomer` was asked about.
    asked: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl CrmService for ListingProxy {
    async fn create_customer(
        &self,
        request: Request<crm::CreateCustomerRequest>,
    ) -> Result<Response<crm::Customer>, Status> {
        self.real
            .clone()
            .create_customer(request.into_inner())
            .await
    }

    async fn batch_create_customers(
        &self,
        request: Request<crm::BatchCreateCustomersRequest>,
    ) -> Result<Response<crm::BatchCreateCustomersResponse>, Status> {
        self.real
            .clone()
            .batch_create_customers(request.into_inner())
            .await
    }

    async fn get_customer(
        &self,
        request: Request<crm::GetCustomerRequest>,
    ) -> Result<Response<crm::Customer>, Status> {
        let request = request.into_inner();
        self.asked.lock().unwrap().push(request.id.clone());
        self.real.clone().get_customer(request).await
    }

    async fn update_customer(
        &self,
        request: Request<crm::UpdateCustomerRequest>,
    ) -> Result<Response<crm::Customer>, Status> {
        self.real
            .clone()
            .update_customer(request.into_inner())
            .await
    }

    async fn delete_customer(
        &self,
        request: Request<crm::DeleteCustomerRequest>,
    ) -> Result<Response<crm::DeleteCustomerResponse>, Status> {
        self.real
            .clone()
            .delete_customer(request.into_inner())
            .await
    }

    async fn list_customers(
        &self,
        request: Request<crm::ListCustomersRequest>,
    ) -> Result<Response<crm::ListCustomersResponse>, Status> {
        let mut page = self
            .real
            .clone()
            .list_customers(request.into_inner())
            .await?
            .into_inner();
        let hidden = self.hidden.lock().unwrap().clone();
        page.customers.retain(|c| !hidden.contains(&c.id));
        Ok(Response::new(page))
    }

    type WatchCustomersStream = tonic::Streaming<crm::WatchCustomersResponse>;

    async fn watch_customers(
        &self,
        request: Request<crm::WatchCustomersRequest>,
    ) -> Result<Response<Self::WatchCustomersStream>, Status> {
        self.real
            .clone()
            .watch_customers(request.into_inner())
            .await
    }

    async fn list_customer_events(
        &self,
        request: Request<crm::ListCustomerEventsRequest>,
    ) -> Result<Response<crm::ListCustomerEventsResponse>, Status> {
        self.real
            .clone()
            .list_customer_events(request.into_inner())
            .await
    }
}

/// A [`ListingProxy`] serving on a loopback port.
struct ListingCrm {
    /// Where it listens.
    addr: std::net::SocketAddr,
    /// Customers left out of the listing.
    hidden: Arc<Mutex<Vec<String>>>,
    /// Customers `GetCustomer` was asked about.
    asked: Arc<Mutex<Vec<String>>>,
    /// The server.
    served: common::Served,
}

impl ListingCrm {
    async fn start(real: CrmClient) -> Self {
        let (hidden, asked) = (Arc::default(), Arc::default());
        let proxy = ListingProxy {
            real,
            hidden: Arc::clone(&hidden),
            asked: Arc::clone(&asked),
        };
        let served =
            common::Served::start(Server::builder().add_service(CrmServiceServer::new(proxy)))
                .await;
        Self {
            addr: served.addr,
            hidden,
            asked,
            served,
        }
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}

/// What a [`GatedInventory`] does to the calls it forwards, set by the test.
#[derive(Debug, Default)]
struct Gate {
    /// Refuse every cancel (UpdatePackageRequestStatus to CANCELLED) as INVALID_ARGUMENT.
    refuse_cancels: AtomicBool,
    /// Hold the next create until a cancel has gone through (cleared once used).
    hold_first_create: AtomicBool,
    /// Notified when a create is being held.
    held: Notify,
    /// Notified when a cancel went through.
    cancelled: Notify,
    /// The calls seen, in order, for the test to check.
    log: Mutex<Vec<&'static str>>,
}

impl Gate {
    fn note(&self, call: &'static str) {
        self.log.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }
}

/// An Inventory in front of the real one that forwards every call but does what its
/// [`Gate`] says. It has no `BatchCreatePackageRequests` (UNIMPLEMENTED), so every create
/// arrives as its own call.
struct GatedInventory {
    /// The real Inventory.
    real: InventoryClient,
    /// What to do.
    gate: Arc<Gate>,
}

#[tonic::async_trait]
impl InventoryService for GatedInventory {
    async fn create_package_request(
        &self,
        request: Request<inventory::CreatePackageRequestRequest>,
    ) -> Result<Response<inventory::PackageRequest>, Status> {
        if self.gate.hold_first_create.swap(false, Ordering::SeqCst) {
            // Registered before announcing the hold, so a cancel that follows at once is seen.
            let cancelled = self.gate.cancelled.notified();
            self.gate.note("create held");
            self.gate.held.notify_one();
            // Bounded: an implementation that made the cancel wait for this create would
            // otherwise hang; then the call order shows it.
            let _ = tokio::time::timeout(Duration::from_secs(20), cancelled).await;
            self.gate.note("create released");
        } else {
            self.gate.note("create");
        }
        let response = self
            .real
            .clone()
            .create_package_request(request.into_inner())
            .await?;
        Ok(Response::new(response.into_inner()))
    }

    async fn batch_create_package_requests(
        &self,
        _request: Request<inventory::BatchCreatePackageRequestsRequest>,
    ) -> Result<Response<inventory::BatchCreatePackageRequestsResponse>, Status> {
        Err(Status::unimplemented("an Inventory from before batches"))
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
        let request = request.into_inner();
        let cancel = request.status == PackageStatus::Cancelled as i32;
        if cancel && self.gate.refuse_cancels.load(Ordering::SeqCst) {
            return Err(Status::invalid_argument("status: refused by the test"));
        }
        let response = self
            .real
            .clone()
            .update_package_request_status(request)
            .await?;
        if cancel {
            self.gate.note("cancel");
            self.gate.cancelled.notify_one();
        }
        Ok(Response::new(response.into_inner()))
    }
}

/// A [`GatedInventory`] serving on a loopback port.
struct Proxy {
    /// Where it listens.
    addr: std::net::SocketAddr,
    /// What it does.
    gate: Arc<Gate>,
    /// The server.
    served: common::Served,
}

impl Proxy {
    async fn start(real: InventoryClient) -> Self {
        let gate = Arc::new(Gate::default());
        let proxy = GatedInventory {
            real,
            gate: Arc::clone(&gate),
        };
        let served = common::Served::start(
            Server::builder().add_service(InventoryServiceServer::new(proxy)),
        )
        .await;
        Self {
            addr: served.addr,
            gate,
            served,
        }
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}
