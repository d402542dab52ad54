//! The store's behaviour, the same on every backend: each test runs once on SQLite and once on
//! PostgreSQL (`backend_tests!`), through [`mip_inventory::store::open`] as the service uses it.
//! The concurrency tests open two stores on one database, as two Inventory processes would.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_inventory::domain::{NewPackageRequest, PackageStatus, PackageType};
use mip_inventory::{Error, InventoryStore};
use mip_runtime::CancellationToken;
use mip_runtime::store::Database;
use uuid::Uuid;

/// Longest any test may take; generous, so a slow machine never fails a test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a test body, failing it instead of hanging if it does not finish in time.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time")
}

/// A store on `db`, ready; stops connecting with `shutdown` (PostgreSQL).
async fn open(db: &Database, shutdown: &CancellationToken) -> Arc<dyn InventoryStore> {
    let store = mip_inventory::store::open(db, shutdown)
        .await
        .expect("store opens");
    store.ready().await.expect("store ready");
    store
}

fn new(customer_id: Uuid, package_type: &str, request_id: Option<Uuid>) -> NewPackageRequest {
    NewPackageRequest {
        customer_id,
        package_type: PackageType::parse(package_type).expect("valid package type"),
        request_id,
    }
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
}

/// Every package request, page by page of `limit`, with the cursors the pages carried.
async fn list_all(
    store: &dyn InventoryStore,
    customer_id: Option<Uuid>,
    limit: usize,
) -> (Vec<mip_inventory::domain::PackageRequest>, Vec<u64>) {
    let (mut all, mut cursors, mut after) = (Vec::new(), Vec::new(), 0);
    loop {
        let page = store
            .list_package_requests(customer_id, after, limit)
            .await
            .expect("list");
        assert!(page.package_requests.len() <= limit);
        all.extend(page.package_requests);
        match page.next_after {
            Some(next) => {
                cursors.push(next);
                after = next;
            }
            None => return (all, cursors),
        }
    }
}

mip_testkit::backend_tests! {
    /// A repeated request id with the same parameters answers with the original, timestamps
    /// included, and creates nothing.
    async fn a_retried_create_replays_the_original(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let (customer, request_id) = (Uuid::now_v7(), Uuid::now_v7());
            let first = store
                .create_package_request(new(customer, "welcome_package", Some(request_id)), at(0))
                .await
                .unwrap();
            assert!(!first.replayed);
            assert_eq!(first.package_request.status, PackageStatus::Pending);
            assert_eq!(first.package_request.create_time, at(0));
            assert_eq!(first.package_request.request_id, Some(request_id));

            let retry = store
                .create_package_request(new(customer, "welcome_package", Some(request_id)), at(30))
                .await
                .unwrap();
            assert!(retry.replayed);
            assert_eq!(retry.package_request, first.package_request);
            let page = store.list_package_requests(None, 0, 100).await.unwrap();
            assert_eq!(page.package_requests, vec![first.package_request]);
            shutdown.cancel();
        })
        .await;
    }

    /// A request id used again with another customer or package type is refused, and the
    /// original stays the only row.
    async fn a_reused_request_id_is_refused(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let (customer, request_id) = (Uuid::now_v7(), Uuid::now_v7());
            let original = store
                .create_package_request(new(customer, "welcome_package", Some(request_id)), at(0))
                .await
                .unwrap();
            for changed in [
                new(customer, "birthday_package", Some(request_id)),
                new(Uuid::now_v7(), "welcome_package", Some(request_id)),
            ] {
                let refused = store.create_package_request(changed, at(1)).await;
                assert!(
                    matches!(refused, Err(Error::RequestIdReused(id)) if id == request_id),
                    "{refused:?}"
                );
            }
            let page = store.list_package_requests(None, 0, 100).await.unwrap();
            assert_eq!(page.package_requests, vec![original.package_request]);
            shutdown.cancel();
        })
        .await;
    }

    /// A batch answers each request in order; a reused request id is refused alone, and a
    /// request id repeated within the batch creates one package request.
    async fn a_batch_answers_in_order_with_refusals_of_its_own(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let customers: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
            let taken = Uuid::now_v7();
            let existing = store
                .create_package_request(new(customers[0], "welcome_package", Some(taken)), at(0))
                .await
                .unwrap()
                .package_request;
            let repeated = Uuid::now_v7();
            let results = store
                .create_package_requests(
                    vec![
                        new(customers[1], "welcome_package", None),
                        new(customers[0], "other_package", Some(taken)),
                        new(customers[2], "welcome_package", Some(repeated)),
                        new(customers[2], "welcome_package", Some(repeated)),
                        new(customers[2], "other_package", Some(repeated)),
                        new(customers[0], "welcome_package", Some(taken)),
                    ],
                    at(5),
                )
                .await
                .unwrap();
            assert_eq!(results.len(), 6);
            let created = |n: usize| results[n].as_ref().expect("created").clone();
            assert_eq!(created(0).package_request.customer_id, customers[1]);
            assert!(!created(0).replayed);
            assert!(matches!(results[1], Err(Error::RequestIdReused(id)) if id == taken));
            assert!(!created(2).replayed);
            assert!(created(3).replayed);
            assert_eq!(created(3).package_request, created(2).package_request);
            assert!(matches!(results[4], Err(Error::RequestIdReused(id)) if id == repeated));
            assert!(created(5).replayed);
            assert_eq!(created(5).package_request, existing);

            let (all, _) = list_all(&*store, None, 100).await;
            assert_eq!(
                all,
                vec![existing, created(0).package_request, created(2).package_request]
            );
            shutdown.cancel();
        })
        .await;
    }

    /// A package request reads back as created; an unknown id is not found, for reads and
    /// for status moves.
    async fn reads_find_what_was_created_and_only_that(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let created = store
                .create_package_request(new(Uuid::now_v7(), "welcome_package", None), at(0))
                .await
                .unwrap()
                .package_request;
            assert_eq!(store.get_package_request(created.id).await.unwrap(), created);
            let unknown = Uuid::now_v7();
            let read = store.get_package_request(unknown).await;
            assert!(matches!(read, Err(Error::NotFound(id)) if id == unknown), "{read:?}");
            let moved = store
                .update_status(unknown, PackageStatus::Shipped, at(1))
                .await;
            assert!(matches!(moved, Err(Error::NotFound(id)) if id == unknown), "{moved:?}");
            shutdown.cancel();
        })
        .await;
    }

    /// Listing returns package requests in creation order, page by page, with and without a
    /// customer filter; the last page carries no cursor.
    async fn listing_pages_through_creation_order(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
            let mut created = Vec::new();
            for i in 0..7 {
                let customer = if i % 2 == 0 { alice } else { bob };
                created.push(
                    store
                        .create_package_request(new(customer, &format!("box_{i}"), None), at(i))
                        .await
                        .unwrap()
                        .package_request,
                );
            }
            let (all, cursors) = list_all(&*store, None, 2).await;
            assert_eq!(all, created);
            assert_eq!(cursors.len(), 3, "pages of 2, 2, 2 and a last one of 1");

            let (alices, cursors) = list_all(&*store, Some(alice), 2).await;
            let expected: Vec<_> = created
                .iter()
                .filter(|r| r.customer_id == alice)
                .cloned()
                .collect();
            assert_eq!(alices, expected);
            assert_eq!(cursors.len(), 1, "4 requests: a full page, then the last");

            let exact = store.list_package_requests(Some(bob), 0, 3).await.unwrap();
            assert_eq!(exact.package_requests.len(), 3);
            assert_eq!(exact.next_after, None, "nothing follows a page that ends the list");
            let nobody = store
                .list_package_requests(Some(Uuid::now_v7()), 0, 2)
                .await
                .unwrap();
            assert!(nobody.package_requests.is_empty());
            assert_eq!(nobody.next_after, None);
            shutdown.cancel();
        })
        .await;
    }

    /// Status moves follow the life cycle: allowed moves change status and update time,
    /// repeating the current status changes nothing, and every other move is refused and
    /// leaves the row as it was.
    async fn status_moves_follow_the_life_cycle(db: Database) {
        use PackageStatus::{Cancelled, Delivered, Pending, Shipped};
        bounded(async {
            let shutdown = CancellationToken::new();
            let store = open(&db, &shutdown).await;
            let package = store
                .create_package_request(new(Uuid::now_v7(), "welcome_package", None), at(0))
                .await
                .unwrap()
                .package_request;
            let shipped = store.update_status(package.id, Shipped, at(60)).await.unwrap();
            assert_eq!(shipped.previous, Pending);
            assert_eq!(shipped.package_request.status, Shipped);
            assert_eq!(shipped.package_request.update_time, at(60));
            assert_eq!(shipped.package_request.create_time, at(0));
            let again = store.update_status(package.id, Shipped, at(120)).await.unwrap();
            assert_eq!(again.previous, Shipped);
            assert_eq!(again.package_request, shipped.package_request);
            let delivered = store.update_status(package.id, Delivered, at(180)).await.unwrap();
            assert_eq!(
                store.get_package_request(package.id).await.unwrap(),
                delivered.package_request
            );

            let cases: [(&[PackageStatus], PackageStatus); 9] = [
                (&[], Delivered),
                (&[Shipped], Pending),
                (&[Shipped], Cancelled),
                (&[Shipped, Delivered], Pending),
                (&[Shipped, Delivered], Shipped),
                (&[Shipped, Delivered], Cancelled),
                (&[Cancelled], Pending),
                (&[Cancelled], Shipped),
                (&[Cancelled], Delivered),
            ];
            for (path, to) in cases {
                let id = store
                    .create_package_request(new(Uuid::now_v7(), "welcome_package", None), at(0))
                    .await
                    .unwrap()
                    .package_request
                    .id;
                for step in path {
                    store.update_status(id, *step, at(1)).await.unwrap();
                }
                let before = store.get_package_request(id).await.unwrap();
                let refused = store.update_status(id, to, at(2)).await;
                assert!(
                    matches!(refused, Err(Error::IllegalMove { from, to: t, .. }) if from == before.status && t == to),
                    "{refused:?}"
                );
                assert_eq!(store.get_package_request(id).await.unwrap(), before);
            }
            shutdown.cancel();
        })
        .await;
    }

    /// Two stores on one database (two processes) creating overlapping request ids at the
    /// same moment: one row per request id, every caller gets that row (replayed for all but
    /// one), and a request id sent with other parameters is refused.
    async fn racing_stores_create_each_request_id_once(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let stores = [open(&db, &shutdown).await, open(&db, &shutdown).await];
            let customer = Uuid::now_v7();
            let request_ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
            let mut tasks = tokio::task::JoinSet::new();
            for round in 0..4 {
                for (n, request_id) in request_ids.iter().copied().enumerate() {
                    let store = Arc::clone(&stores[(n + round) % 2]);
                    tasks.spawn(async move {
                        let result = store
                            .create_package_request(
                                new(customer, "welcome_package", Some(request_id)),
                                at(0),
                            )
                            .await;
                        (request_id, result)
                    });
                }
            }
            // The same request ids with another package type, through both stores, batched.
            let mut batches = tokio::task::JoinSet::new();
            for store in &stores {
                let store = Arc::clone(store);
                let others: Vec<_> = request_ids
                    .iter()
                    .map(|r| new(customer, "other_package", Some(*r)))
                    .collect();
                batches.spawn(async move { store.create_package_requests(others, at(0)).await });
            }
            let mut answers: HashMap<Uuid, Vec<_>> = HashMap::new();
            for (request_id, result) in tasks.join_all().await {
                answers.entry(request_id).or_default().push(result);
            }
            let batches: Vec<_> = batches
                .join_all()
                .await
                .into_iter()
                .map(|results| results.expect("the batch is written"))
                .collect();
            let (all, _) = list_all(&*stores[0], None, 1000).await;
            assert_eq!(all.len(), request_ids.len(), "one row per request id");
            for request_id in &request_ids {
                let row = all
                    .iter()
                    .find(|r| r.request_id == Some(*request_id))
                    .expect("a row for every request id");
                let answers = &answers[request_id];
                if row.package_type == "welcome_package" {
                    // Every caller with these parameters got the row; at most one created it.
                    let created: Vec<_> = answers
                        .iter()
                        .map(|a| a.as_ref().expect("same parameters succeed"))
                        .collect();
                    assert!(created.iter().all(|c| c.package_request == *row));
                    assert!(created.iter().filter(|c| !c.replayed).count() <= 1);
                } else {
                    // A batch won this request id: every single create was refused.
                    assert!(
                        answers
                            .iter()
                            .all(|a| matches!(a, Err(Error::RequestIdReused(_)))),
                        "{answers:?}"
                    );
                }
                // Each batch got the row where the batches won, and a refusal where not.
                let at = request_ids.iter().position(|r| r == request_id).unwrap();
                for results in &batches {
                    match &results[at] {
                        Ok(created) => {
                            assert_eq!(row.package_type, "other_package");
                            assert_eq!(created.package_request, *row);
                        }
                        Err(Error::RequestIdReused(_)) => {
                            assert_eq!(row.package_type, "welcome_package");
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
            shutdown.cancel();
        })
        .await;
    }

    /// Two stores writing at once hand out positions 1..=N without gaps or repeats, and the
    /// listing returns every row exactly once, from either store.
    async fn positions_from_two_writers_are_unique_and_gap_free(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let stores = [open(&db, &shutdown).await, open(&db, &shutdown).await];
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..120 {
                let store = Arc::clone(&stores[n % 2]);
                tasks.spawn(async move {
                    if n % 10 == 0 {
                        let batch = (0..5)
                            .map(|_| new(Uuid::now_v7(), "welcome_package", None))
                            .collect();
                        store
                            .create_package_requests(batch, at(0))
                            .await
                            .unwrap()
                            .into_iter()
                            .map(|r| r.unwrap().package_request.id)
                            .collect::<Vec<_>>()
                    } else {
                        let one = new(Uuid::now_v7(), "welcome_package", Some(Uuid::now_v7()));
                        vec![store.create_package_request(one, at(0)).await.unwrap().package_request.id]
                    }
                });
            }
            let created: HashSet<Uuid> = tasks.join_all().await.into_iter().flatten().collect();
            let total = created.len();
            assert_eq!(total, 12 * 5 + 108);

            for store in &stores {
                // Pages of one: each cursor is the position of the row before it.
                let (all, cursors) = list_all(&**store, None, 1).await;
                let listed: HashSet<Uuid> = all.iter().map(|r| r.id).collect();
                assert_eq!(all.len(), total, "no row listed twice");
                assert_eq!(listed, created, "every row listed");
                let expected: Vec<u64> = (1..u64::try_from(total).unwrap()).collect();
                assert_eq!(cursors, expected, "positions 1..N-1 without gaps");
                // And nothing past N: the N rows hold exactly the positions 1..=N.
                let last = u64::try_from(total).unwrap();
                let tail = store.list_package_requests(None, last - 1, 10).await.unwrap();
                assert_eq!(tail.package_requests.len(), 1);
                let past = store.list_package_requests(None, last, 10).await.unwrap();
                assert!(past.package_requests.is_empty());
            }
            shutdown.cancel();
        })
        .await;
    }

    /// Two stores moving the same packages at once cannot both make a move that is only legal
    /// from the state the other left: each package ends SHIPPED or CANCELLED, and exactly
    /// one of the two moves of each was accepted.
    async fn racing_status_moves_cannot_both_win(db: Database) {
        bounded(async {
            let shutdown = CancellationToken::new();
            let stores = [open(&db, &shutdown).await, open(&db, &shutdown).await];
            let mut ids = Vec::new();
            for _ in 0..20 {
                ids.push(
                    stores[0]
                        .create_package_request(new(Uuid::now_v7(), "welcome_package", None), at(0))
                        .await
                        .unwrap()
                        .package_request
                        .id,
                );
            }
            let mut tasks = tokio::task::JoinSet::new();
            for id in ids.iter().copied() {
                for (store, to) in [(0, PackageStatus::Shipped), (1, PackageStatus::Cancelled)] {
                    let store = Arc::clone(&stores[store]);
                    tasks.spawn(async move { (id, to, store.update_status(id, to, at(1)).await) });
                }
            }
            let results = tasks.join_all().await;
            for id in ids {
                let row = stores[1].get_package_request(id).await.unwrap();
                let won: Vec<_> = results
                    .iter()
                    .filter(|(i, _, r)| *i == id && r.is_ok())
                    .collect();
                assert_eq!(won.len(), 1, "{results:?}");
                assert_eq!(won[0].1, row.status);
                let lost = results
                    .iter()
                    .find(|(i, _, r)| *i == id && r.is_err())
                    .expect("one move refused");
                assert!(matches!(lost.2, Err(Error::IllegalMove { .. })), "{lost:?}");
            }
            shutdown.cancel();
        })
        .await;
    }
}
