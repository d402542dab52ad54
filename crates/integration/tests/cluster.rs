//! Several integration workers on one PostgreSQL database split CRM's feed by partition: they
//! share the partitions evenly as workers join, a stalled worker is fenced and its partitions
//! taken over, and in every case each customer still gets exactly one welcome package. These
//! tests need PostgreSQL (`MIP_REQUIRE_POSTGRES=1` makes its absence a failure).

// Each test binary uses a part of the shared harness.
#[allow(dead_code)]
mod common;

use std::time::{Duration, SystemTime};

use common::{
    CONVERGE_TIMEOUT, Crm, Dirs, Integration, Inventory, Load, bounded, create_customers,
    crm_options, eventually, integration_options, system_clock, wait_for_exactly_one_package_each,
    wait_for_split,
};
use mip_integration::deliver::RandomJitter;
use mip_integration::{IntegrationOptions, Mode, StartPosition};
use mip_runtime::CancellationToken;
use mip_runtime::server::ServerOptions;
use mip_testkit::backend_tests;
use tokio::net::TcpListener;

/// Few partitions and short leases, so hand-overs happen within a test.
fn cluster_options(crm: &Crm, inventory: &Inventory) -> IntegrationOptions {
    IntegrationOptions {
        partitions: 16,
        lease_ttl: Duration::from_millis(600),
        ..integration_options(crm.addr, inventory.addr, Mode::Stream)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_partitions_evenly_and_deliver_each_customer_once() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = Inventory::start(&dirs.inventory()).await;
        let options = cluster_options(&crm, &inventory);
        let mut first = Integration::start(&database, options.clone()).await;
        let mut second = Integration::start(&database, options).await;
        let load = Load::start(&crm.client(), 4);
        let statuses = wait_for_split(&[&first, &second]).await;
        assert!(
            statuses.iter().all(|s| s.partitions.len() == 8),
            "{statuses:?}"
        );
        assert_ne!(statuses[0].worker_id, statuses[1].worker_id);
        load.wait_for(200).await;
        let ids = load.finish().await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        let (a, b) = (first.status().await, second.status().await);
        assert!(a.delivered > 0 && b.delivered > 0, "{a:?} {b:?}");
        assert_eq!(a.checkpoint_writes_fenced + b.checkpoint_writes_fenced, 0);
        second.stop().await;
        first.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_worker_started_mid_load_takes_its_share_and_nothing_is_lost() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = Inventory::start(&dirs.inventory()).await;
        let options = cluster_options(&crm, &inventory);
        let mut first = Integration::start(&database, options.clone()).await;
        let mut second = Integration::start(&database, options.clone()).await;
        let load = Load::start(&crm.client(), 4);
        wait_for_split(&[&first, &second]).await;
        load.wait_for(100).await;
        let mut third = Integration::start(&database, options).await;
        let statuses = wait_for_split(&[&first, &second, &third]).await;
        assert!(!statuses[2].partitions.is_empty(), "{statuses:?}");
        load.wait_for(300).await;
        let ids = load.finish().await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        third.stop().await;
        second.stop().await;
        first.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_is_fenced_and_its_partitions_taken_over_without_duplicates() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = Inventory::start(&dirs.inventory()).await;
        let options = cluster_options(&crm, &inventory);
        let stalled_options = options.clone();
        let pause = stalled_options.lease_pause.clone();
        let mut stalled = Integration::start(&database, stalled_options).await;
        // A pause switch of its own: cloned options share one.
        let healthy_options = IntegrationOptions {
            lease_pause: Default::default(),
            ..options
        };
        let mut healthy = Integration::start(&database, healthy_options).await;
        let load = Load::start(&crm.client(), 4);
        wait_for_split(&[&stalled, &healthy]).await;
        load.wait_for(100).await;

        // Its renewals stop, as if the process were paused; it still delivers and writes
        // checkpoints with the epochs it had.
        pause.pause();
        let taken = eventually(
            "the healthy worker to take every partition",
            CONVERGE_TIMEOUT,
            || async {
                let status = healthy.status().await;
                (status.partitions.len() == 16).then_some(status)
            },
        )
        .await;
        assert!(taken.workers.len() == 1, "{taken:?}");
        let fenced = eventually(
            "the stalled worker's stale checkpoint write to be refused",
            CONVERGE_TIMEOUT,
            || async {
                let status = stalled.status().await;
                (status.checkpoint_writes_fenced > 0 && status.partitions.is_empty())
                    .then_some(status)
            },
        )
        .await;
        assert!(fenced.checkpoint_writes_fenced <= 16, "{fenced:?}");

        // Back from its pause, it joins again and gets its share back.
        pause.resume();
        wait_for_split(&[&stalled, &healthy]).await;
        load.wait_for(300).await;
        let ids = load.finish().await;
        wait_for_exactly_one_package_each(&inventory.client(), &ids, CONVERGE_TIMEOUT).await;
        healthy.stop().await;
        stalled.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}

backend_tests! {
    async fn a_restart_with_another_partition_count_is_refused_naming_both(db: Database) {
        bounded(async {
            let dirs = Dirs::new();
            let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
            let mut inventory = Inventory::start(&dirs.inventory()).await;
            let options = cluster_options(&crm, &inventory);
            let mut first = Integration::start(&db, options.clone()).await;
            first.stop().await;

            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let refused = tokio::time::timeout(
                CONVERGE_TIMEOUT,
                mip_integration::serve(
                    listener,
                    &db,
                    IntegrationOptions { partitions: 32, ..options },
                    &ServerOptions::default(),
                    system_clock(),
                    std::sync::Arc::new(RandomJitter),
                    CancellationToken::new(),
                ),
            )
            .await
            .expect("serve stops by itself")
            .expect_err("another partition count is refused");
            let message = format!("{refused}: {}", std::error::Error::source(&refused).unwrap());
            assert!(message.contains("16") && message.contains("32"), "{message}");
            inventory.stop().await;
            crm.stop().await;
        })
        .await;
    }
}

/// With `--start-position latest`, a partition first leased long after the first worker
/// started (here: while a worker that has since vanished still counted as live) starts at the
/// cluster's start mark, not at the head of the moment it is leased: the customers created in
/// between still get their package, and those from before the start do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leased_late_starts_at_the_clusters_start_mark() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    bounded(async {
        let dirs = Dirs::new();
        let mut crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let mut inventory = Inventory::start(&dirs.inventory()).await;
        let before = create_customers(&crm.client(), 20).await;
        assert_eq!(before.len(), 20);

        // A worker that heartbeat once and died: it counts as live for one lease TTL, so the
        // first real worker takes only its fair share of the partitions at first.
        let options = IntegrationOptions {
            start_position: StartPosition::Latest,
            lease_ttl: Duration::from_secs(3),
            ..cluster_options(&crm, &inventory)
        };
        let store = common::staged_store(&database, options.partitions).await;
        store
            .heartbeat("vanished", SystemTime::now())
            .await
            .unwrap();

        let mut worker = Integration::start(&database, options).await;
        let half = eventually(
            "the worker to start its share of the partitions",
            CONVERGE_TIMEOUT,
            || async {
                let status = worker.status().await;
                let started = status.partitions.iter().all(|p| p.checkpoint_sequence > 0);
                (status.partitions.len() == 8 && started).then_some(status)
            },
        )
        .await;
        assert_eq!(half.workers.len(), 2, "{half:?}");

        let after = create_customers(&crm.client(), 40).await;
        eventually(
            "the worker to take the vanished worker's partitions",
            CONVERGE_TIMEOUT,
            || async { (worker.status().await.partitions.len() == 16).then_some(()) },
        )
        .await;
        wait_for_exactly_one_package_each(&inventory.client(), &after, CONVERGE_TIMEOUT).await;

        worker.stop().await;
        inventory.stop().await;
        crm.stop().await;
    })
    .await;
}
