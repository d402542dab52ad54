//! Replicas behind one address list: with several `--inventory-addr` or `--crm-addr`
//! addresses, the integration service keeps delivering, exactly once per customer, while one
//! replica is stopped. Replicas share one PostgreSQL database, as they do in a cluster; the
//! tests are skipped where PostgreSQL is not installed.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    CONVERGE_TIMEOUT, Crm, Dirs, Integration, Inventory, bounded, create_customers, crm_options,
    integration_options, system_clock, wait_for_exactly_one_package_each,
};
use mip_integration::{IntegrationOptions, Mode};
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::server::ServerOptions;
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// Customers created in each phase of a test.
const CUSTOMERS: usize = 40;

/// Which service a replica runs.
#[derive(Clone, Copy)]
enum Service {
    Crm,
    Inventory,
}

/// One replica of CRM or Inventory on a shared database, stoppable and restartable on the
/// same port.
struct Replica {
    /// Where it listens, the same after a restart.
    addr: SocketAddr,
    /// What it runs.
    service: Service,
    /// The database it shares with the other replicas.
    database: Database,
    /// Cancels it, while it runs.
    shutdown: Option<CancellationToken>,
    /// The server, while it runs.
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Replica {
    async fn start(service: Service, database: &Database) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind replica");
        let mut replica = Self {
            addr: listener.local_addr().expect("replica address"),
            service,
            database: database.clone(),
            shutdown: None,
            task: None,
        };
        replica.run(listener);
        replica
    }

    fn run(&mut self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let (token, database, service) = (shutdown.clone(), self.database.clone(), self.service);
        let server = ServerOptions {
            shutdown_grace: Duration::from_secs(1),
            ..ServerOptions::default()
        };
        self.task = Some(tokio::spawn(async move {
            match service {
                Service::Crm => mip_crm::serve(
                    listener,
                    &database,
                    crm_options(),
                    &server,
                    system_clock(),
                    token,
                )
                .await
                .map_err(|e| e.to_string()),
                Service::Inventory => {
                    mip_inventory::serve(listener, &database, &server, system_clock(), token)
                        .await
                        .map_err(|e| e.to_string())
                }
            }
        }));
        self.shutdown = Some(shutdown);
    }

    /// Stops it gracefully: open streams end, and its port refuses connections.
    async fn stop(&mut self) {
        self.shutdown.take().expect("replica is running").cancel();
        let task = self.task.take().expect("replica is running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("replica stops in time")
            .expect("replica task")
            .expect("replica stops cleanly");
    }

    /// Starts it again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind replica");
        self.run(listener);
    }

    fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy()
    }
}

/// Both replicas' addresses as one flag value.
fn addr_list(a: &Replica, b: &Replica) -> String {
    format!("{},{}", a.addr, b.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_are_created_while_one_inventory_replica_is_stopped() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut first = Replica::start(Service::Inventory, &database).await;
        let second = Replica::start(Service::Inventory, &database).await;
        let options = IntegrationOptions {
            inventory_addr: addr_list(&first, &second),
            ..integration_options(crm.addr, first.addr, Mode::Auto)
        };
        let mut integration = Integration::start(&dirs.integration_db(), options).await;
        let inventory = InventoryServiceClient::new(second.channel());

        let mut customers = create_customers(&crm.client(), CUSTOMERS).await;
        wait_for_exactly_one_package_each(&inventory, &customers, CONVERGE_TIMEOUT).await;

        first.stop().await;
        customers.extend(create_customers(&crm.client(), CUSTOMERS).await);
        wait_for_exactly_one_package_each(&inventory, &customers, CONVERGE_TIMEOUT).await;

        integration.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_continues_when_the_watched_crm_replica_stops() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let inventory = Inventory::start(&dirs.inventory()).await;
        let mut first = Replica::start(Service::Crm, &database).await;
        let mut second = Replica::start(Service::Crm, &database).await;
        // Stream only: the watch itself must move to the live replica, not a poll fallback.
        let options = IntegrationOptions {
            crm_addr: addr_list(&first, &second),
            ..integration_options(first.addr, inventory.addr, Mode::Stream)
        };
        let mut integration = Integration::start(&dirs.integration_db(), options).await;
        let first_crm = CrmServiceClient::new(first.channel());
        let second_crm = CrmServiceClient::new(second.channel());

        let mut customers = create_customers(&first_crm, CUSTOMERS).await;
        wait_for_exactly_one_package_each(&inventory.client(), &customers, CONVERGE_TIMEOUT).await;

        // Whichever replica the watch follows, one of these two stops is its replica's.
        first.stop().await;
        customers.extend(create_customers(&second_crm, CUSTOMERS).await);
        wait_for_exactly_one_package_each(&inventory.client(), &customers, CONVERGE_TIMEOUT).await;

        first.restart().await;
        second.stop().await;
        customers.extend(create_customers(&first_crm, CUSTOMERS).await);
        wait_for_exactly_one_package_each(&inventory.client(), &customers, CONVERGE_TIMEOUT).await;

        integration.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_empty_or_bad_address_in_a_list_stops_start_up_naming_it() {
    let dirs = Dirs::new();
    for (list, named) in [
        ("127.0.0.1:1,,127.0.0.1:2", "127.0.0.1:1,,127.0.0.1:2"),
        ("127.0.0.1:1, ", "127.0.0.1:1, "),
        ("127.0.0.1:1,not an address", "not an address"),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let options = IntegrationOptions {
            inventory_addr: list.to_owned(),
            ..IntegrationOptions::default()
        };
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            mip_integration::serve(
                listener,
                &dirs.integration_db(),
                options,
                &ServerOptions::default(),
                system_clock(),
                std::sync::Arc::new(mip_integration::deliver::RandomJitter),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("start-up fails at once");
        let error = result
            .expect_err("a bad address list is refused")
            .to_string();
        assert!(
            error.contains(named),
            "{list:?}: the error {error:?} should name {named:?}"
        );
    }
}
