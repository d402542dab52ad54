//! The store's behaviour, the same on every backend: each test runs against SQLite and
//! PostgreSQL through `store::open`, the way `serve` opens it. The PostgreSQL-only tests at the
//! end pin what only a shared server allows: several store instances writing at once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_crm::Error;
use mip_crm::domain::{CustomerPatch, Email, Name, NewCustomer, Position};
use mip_crm::store::{self, CrmStore};
use mip_runtime::CancellationToken;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::store::Database;
use uuid::Uuid;

/// Longest any test may take; generous, so a slow machine never fails a test.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

/// A store on `db`, ready; its background tasks stop with the returned token.
async fn open(db: &Database) -> (Arc<dyn CrmStore>, CancellationToken) {
    let shutdown = CancellationToken::new();
    let store = store::open(db, &shutdown).await.expect("store opens");
    store.ready().await.expect("store gets ready");
    (store, shutdown)
}

/// Now, at the store's precision.
fn now() -> SystemTime {
    from_micros(to_micros(SystemTime::now()))
}

fn new_customer(name: &str, email: &str, request_id: Option<Uuid>) -> NewCustomer {
    NewCustomer {
        name: Name::parse(name).unwrap(),
        email: Email::parse(email).unwrap(),
        request_id,
    }
}

fn seqs(events: &[Arc<mip_crm::domain::CustomerEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

mip_testkit::backend_tests! {
    /// AIP-154: updates that name the version they were based on race, and exactly one wins;
    /// every other is refused with the version that won, however the writes interleave.
    async fn conditional_updates_of_one_version_let_exactly_one_win(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let ada = store
                .create_customer(new_customer("Ada", "ada@example.com", None), now())
                .await
                .unwrap();
            let racers = 8;
            let updates: Vec<_> = (0..racers).map(|n| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let patch = CustomerPatch {
                        name: Some(Name::parse(&format!("Ada {n}")).unwrap()),
                        expected_version: Some(ada.version),
                        ..CustomerPatch::default()
                    };
                    store.update_customer(ada.id, patch, now()).await
                })
            }).collect();
            let mut won = Vec::new();
            for update in updates {
                match update.await.unwrap() {
                    Ok(customer) => won.push(customer),
                    Err(Error::VersionMismatch {
                        id,
                        expected,
                        current,
                    }) => {
                        assert_eq!((id, expected, current), (ada.id, ada.version, ada.version + 1));
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            assert_eq!(won.len(), 1, "exactly one update of version {}", ada.version);
            let stored = store.get_customer(ada.id).await.unwrap();
            assert_eq!(stored, won[0]);
            assert_eq!(stored.version, ada.version + 1);

            // The winner's version is current now; an unconditional update still applies.
            let fresh = CustomerPatch {
                name: Some(Name::parse("Ada Lovelace").unwrap()),
                expected_version: Some(stored.version),
                ..CustomerPatch::default()
            };
            let updated = store.update_customer(ada.id, fresh, now()).await.unwrap();
            assert_eq!(updated.version, stored.version + 1);
            let unconditional = CustomerPatch {
                name: Some(Name::parse("Ada King").unwrap()),
                ..CustomerPatch::default()
            };
            let updated = store
                .update_customer(ada.id, unconditional, now())
                .await
                .unwrap();
            assert_eq!(updated.version, stored.version + 2);
        })
        .await;
    }

    async fn customers_are_created_read_updated_and_deleted(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let t0 = now();
            let ada = store
                .create_customer(new_customer("Ada", "ada@example.com", None), t0)
                .await
                .unwrap();
            assert_eq!((ada.version, ada.create_time), (1, t0));
            assert_eq!(store.get_customer(ada.id).await.unwrap(), ada);

            let t1 = t0 + Duration::from_secs(5);
            let patch = CustomerPatch {
                name: Some(Name::parse("Ada King").unwrap()),
                email: Some(Email::parse("ada.king@example.com").unwrap()),
                expected_version: None,
            };
            let updated = store.update_customer(ada.id, patch, t1).await.unwrap();
            assert_eq!(updated.name, "Ada King");
            assert_eq!(updated.email, "ada.king@example.com");
            assert_eq!((updated.version, updated.update_time), (2, t1));
            assert_eq!(store.get_customer(ada.id).await.unwrap(), updated);

            // The old address is free again once the customer moved off it.
            store
                .create_customer(new_customer("Other", "ADA@example.com", None), t1)
                .await
                .unwrap();

            let position = store.delete_customer(ada.id, t1).await.unwrap();
            assert_eq!(position, Position(4));
            assert!(matches!(store.get_customer(ada.id).await, Err(Error::NotFound(_))));
            assert!(matches!(
                store.delete_customer(ada.id, t1).await,
                Err(Error::NotFound(_))
            ));
            let events = store.events_after(Position(0), 10).await.unwrap();
            assert_eq!(seqs(&events), [1, 2, 3, 4]);
            assert_eq!(events[3].customer, updated, "DELETED carries the last state");
        })
        .await;
    }

    async fn a_repeated_request_id_returns_the_original_or_is_refused(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let request_id = Uuid::new_v4();
            let request = new_customer("Ada", "ada@example.com", Some(request_id));
            let first = store.create_customer(request.clone(), now()).await.unwrap();
            let retry = store.create_customer(request.clone(), now()).await.unwrap();
            assert_eq!(retry, first);

            let changed = new_customer("Grace", "ada@example.com", Some(request_id));
            assert!(matches!(
                store.create_customer(changed, now()).await,
                Err(Error::RequestIdReused(id)) if id == request_id
            ));

            store.delete_customer(first.id, now()).await.unwrap();
            assert!(matches!(
                store.create_customer(request, now()).await,
                Err(Error::CreatedThenDeleted { customer_id, .. }) if customer_id == first.id
            ));
            assert_eq!(store.bounds().unwrap().head, 2, "one CREATED, one DELETED");
        })
        .await;
    }

    async fn an_email_is_taken_whatever_its_case(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let ada = store
                .create_customer(new_customer("Ada", "ada@example.com", None), now())
                .await
                .unwrap();
            let request_id = Uuid::new_v4();
            assert!(matches!(
                store
                    .create_customer(new_customer("Ada 2", "ADA@Example.com", Some(request_id)), now())
                    .await,
                Err(Error::EmailTaken(_))
            ));
            let grace = store
                .create_customer(new_customer("Grace", "grace@example.com", None), now())
                .await
                .unwrap();
            let onto_ada = CustomerPatch {
                email: Some(Email::parse("Ada@EXAMPLE.com").unwrap()),
                ..CustomerPatch::default()
            };
            assert!(matches!(
                store.update_customer(grace.id, onto_ada, now()).await,
                Err(Error::EmailTaken(_))
            ));
            // Recasing one's own address is not a conflict.
            let recased = CustomerPatch {
                email: Some(Email::parse("ADA@example.com").unwrap()),
                ..CustomerPatch::default()
            };
            let ada = store.update_customer(ada.id, recased, now()).await.unwrap();
            assert_eq!(ada.email, "ADA@example.com");

            // The refused create left no claim on its request id.
            let freed = new_customer("Ada 2", "ada2@example.com", Some(request_id));
            store.create_customer(freed, now()).await.unwrap();
            assert_eq!(store.bounds().unwrap().head, 4);
        })
        .await;
    }

    async fn a_batch_creates_in_order_and_refuses_items_on_their_own(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let earlier = store
                .create_customer(new_customer("Earlier", "earlier@example.com", None), now())
                .await
                .unwrap();
            let replayed_id = Uuid::new_v4();
            store
                .create_customer(new_customer("Replayed", "replayed@example.com", Some(replayed_id)), now())
                .await
                .unwrap();
            let results = store
                .create_customers(
                    vec![
                        new_customer("One", "one@example.com", None),
                        new_customer("Taken", "EARLIER@example.com", None),
                        new_customer("Two", "two@example.com", None),
                        new_customer("Again", "one@example.com", None),
                        new_customer("Replayed", "replayed@example.com", Some(replayed_id)),
                        new_customer("Three", "three@example.com", None),
                    ],
                    now(),
                )
                .await
                .unwrap();
            assert_eq!(results.len(), 6);
            assert!(matches!(results[1], Err(Error::EmailTaken(_))));
            assert!(matches!(results[3], Err(Error::EmailTaken(_))), "taken earlier in the batch");
            let replayed = results[4].as_ref().unwrap();
            assert_eq!(replayed.name, "Replayed");
            let events = store.events_after(Position(2), 10).await.unwrap();
            let names: Vec<&str> = events.iter().map(|e| e.customer.name.as_str()).collect();
            assert_eq!(names, ["One", "Two", "Three"]);
            assert_eq!(seqs(&events), [3, 4, 5]);
            let listed = store.list_customers(0, 100, None).await.unwrap();
            let listed: Vec<&str> = listed.customers.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(listed, ["Earlier", "Replayed", "One", "Two", "Three"]);
            assert_ne!(earlier.id, replayed.id);
        })
        .await;
    }

    async fn events_come_in_order_and_expire_with_retention(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            let old = now() - Duration::from_secs(3600);
            for i in 0..5 {
                store
                    .create_customer(new_customer("Old", &format!("old{i}@example.com"), None), old)
                    .await
                    .unwrap();
            }
            let recent = now();
            store
                .create_customer(new_customer("New", "new@example.com", None), recent)
                .await
                .unwrap();
            assert_eq!(seqs(&store.events_after(Position(0), 100).await.unwrap()), [1, 2, 3, 4, 5, 6]);
            assert_eq!(seqs(&store.events_after(Position(2), 2).await.unwrap()), [3, 4]);

            let deleted = store.prune_events(recent - Duration::from_secs(60)).await.unwrap();
            assert_eq!(deleted, 5);
            let bounds = store.bounds().unwrap();
            assert_eq!((bounds.pruned_through, bounds.head), (5, 6));
            assert!(matches!(
                store.events_after(Position(3), 10).await,
                Err(Error::TokenExpired { position: 3, pruned_through: 5 })
            ));
            assert_eq!(seqs(&store.events_after(Position(5), 10).await.unwrap()), [6]);
            assert_eq!(store.prune_events(recent - Duration::from_secs(60)).await.unwrap(), 0);
            // Every customer is still listed.
            assert_eq!(store.list_customers(0, 100, None).await.unwrap().customers.len(), 6);
        })
        .await;
    }

    async fn customer_pages_share_one_snapshot(db: Database) {
        bounded(async {
            let (store, _stop) = open(&db).await;
            for i in 0..5 {
                store
                    .create_customer(new_customer("C", &format!("c{i}@example.com"), None), now())
                    .await
                    .unwrap();
            }
            let first = store.list_customers(0, 2, None).await.unwrap();
            assert_eq!(first.snapshot, Position(5));
            assert_eq!(first.customers.len(), 2);
            // Created after the snapshot: a watch from it brings this one, not the listing.
            store
                .create_customer(new_customer("Late", "late@example.com", None), now())
                .await
                .unwrap();
            let mut seen: Vec<_> = first.customers.clone();
            let mut page = first;
            while let Some(after) = page.next_after {
                page = store.list_customers(after, 2, Some(page.snapshot)).await.unwrap();
                assert_eq!(page.snapshot, Position(5));
                seen.extend(page.customers.iter().cloned());
            }
            let emails: Vec<&str> = seen.iter().map(|c| c.email.as_str()).collect();
            assert_eq!(
                emails,
                ["c0@example.com", "c1@example.com", "c2@example.com", "c3@example.com", "c4@example.com"]
            );
            let later = store.events_after(Position(5), 10).await.unwrap();
            assert_eq!(later.len(), 1);
            assert_eq!(later[0].customer.name, "Late");
        })
        .await;
    }
}

/// Two CRM processes share one database: two stores opened on it.
async fn two_stores() -> Option<(
    Arc<dyn CrmStore>,
    Arc<dyn CrmStore>,
    Database,
    CancellationToken,
)> {
    let db = mip_testkit::postgres_database()?;
    let (a, stop) = open(&db).await;
    let shutdown = stop.clone();
    let b = store::open(&db, &shutdown).await.unwrap();
    b.ready().await.unwrap();
    Some((a, b, db, stop))
}

/// The same request ids and emails from two stores at the same moment: one customer each, the
/// same answer to the same request, and ALREADY_EXISTS codes for the losers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_stores_create_each_customer_once() {
    bounded(async {
        let Some((a, b, _db, _stop)) = two_stores().await else {
            return;
        };
        const KEYS: usize = 40;
        let request_ids: Vec<Uuid> = (0..KEYS).map(|_| Uuid::new_v4()).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, request_id) in request_ids.iter().copied().enumerate() {
            for (side, store) in [(0, &a), (1, &b)] {
                let store = Arc::clone(store);
                tasks.spawn(async move {
                    // Same request id, same parameters, from both stores.
                    let same =
                        new_customer("Same", &format!("same{i}@example.com"), Some(request_id));
                    let same = store.create_customer(same, now()).await;
                    // A different request id per side for one email: one of them wins.
                    let email = new_customer(
                        &format!("Side {side}"),
                        &format!("contested{i}@example.com"),
                        Some(Uuid::new_v4()),
                    );
                    let email = store.create_customer(email, now()).await;
                    (i, same, email)
                });
            }
        }
        let mut same = vec![Vec::new(); KEYS];
        let mut contested: Vec<Vec<_>> = (0..KEYS).map(|_| Vec::new()).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, one, other) = joined.unwrap();
            same[i].push(one.unwrap());
            contested[i].push(other);
        }
        for i in 0..KEYS {
            assert_eq!(same[i][0], same[i][1], "both callers get the one customer");
            let won = contested[i].iter().filter(|r| r.is_ok()).count();
            let lost = contested[i]
                .iter()
                .filter(|r| matches!(r, Err(Error::EmailTaken(_))))
                .count();
            assert_eq!((won, lost), (1, 1), "{:?}", contested[i]);
        }
        let listed = a.list_customers(0, 1000, None).await.unwrap().customers;
        assert_eq!(
            listed.len(),
            2 * KEYS,
            "one row per request id and per email"
        );
        let emails: HashSet<String> = listed.iter().map(|c| c.email.to_lowercase()).collect();
        assert_eq!(emails.len(), 2 * KEYS);
        // Store b learns of a's commits from its tail, within moments: wait for that, then
        // the log holds every create once, in one gap-free run.
        let mut bounds = b.subscribe().unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            bounds.wait_for(|bounds| bounds.head >= 2 * KEYS as u64),
        )
        .await
        .expect("b's feed caught up with a's commits")
        .unwrap();
        let events = b.events_after(Position(0), 1000).await.unwrap();
        assert_eq!(seqs(&events), (1..=2 * KEYS as u64).collect::<Vec<_>>());
    })
    .await;
}

/// Conditional updates of one customer from two stores (two CRM processes) at once: the
/// database, not a process, decides, so of each round of updates based on one version exactly
/// one commits and the others are told which version won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_stores_apply_one_conditional_update_per_version() {
    bounded(async {
        let Some((a, b, _db, _stop)) = two_stores().await else {
            return;
        };
        let ada = a
            .create_customer(new_customer("Ada", "ada@example.com", None), now())
            .await
            .unwrap();
        let mut version = ada.version;
        for round in 0..10 {
            let mut tasks = tokio::task::JoinSet::new();
            for (side, store) in [(0, &a), (1, &b), (2, &a), (3, &b)] {
                let store = Arc::clone(store);
                tasks.spawn(async move {
                    let patch = CustomerPatch {
                        name: Some(Name::parse(&format!("Ada {round}.{side}")).unwrap()),
                        expected_version: Some(version),
                        ..CustomerPatch::default()
                    };
                    store.update_customer(ada.id, patch, now()).await
                });
            }
            let mut won = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined.unwrap() {
                    Ok(customer) => won.push(customer),
                    Err(Error::VersionMismatch {
                        expected, current, ..
                    }) => assert_eq!((expected, current), (version, version + 1)),
                    Err(other) => panic!("round {round}: {other}"),
                }
            }
            assert_eq!(won.len(), 1, "round {round}: {won:?}");
            assert_eq!(won[0].version, version + 1);
            version += 1;
        }
        assert_eq!(b.get_customer(ada.id).await.unwrap().version, version);
    })
    .await;
}

/// 20,000 events committed from two stores at once, read by a third as they commit: it sees
/// each position exactly once, in order, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_event_of_two_writing_stores_in_order() {
    bounded(async {
        let Some((a, b, db, _stop)) = two_stores().await else {
            return;
        };
        let (watcher, _watcher_stop) = open(&db).await;
        const PER_STORE: usize = 10_000;
        const BATCH: usize = 100;
        let total = (2 * PER_STORE) as u64;
        let reader = tokio::spawn(async move {
            let mut seen = Vec::with_capacity(total as usize);
            let mut bounds = watcher.subscribe().unwrap();
            let mut cursor = Position(0);
            while cursor.0 < total {
                let events = watcher.events_after(cursor, 512).await.unwrap();
                if events.is_empty() {
                    bounds.changed().await.unwrap();
                    continue;
                }
                for event in &events {
                    seen.push(event.seq);
                }
                cursor = Position(events.last().unwrap().seq);
            }
            seen
        });
        let mut writers = tokio::task::JoinSet::new();
        for (side, store) in [("a", a), ("b", b)] {
            // Batches and single creates mixed, several in flight, so groups interleave.
            for lane in 0..4 {
                let store = Arc::clone(&store);
                writers.spawn(async move {
                    let per_lane = PER_STORE / 4;
                    let mut i = 0;
                    for round in 0.. {
                        if i == per_lane {
                            break;
                        }
                        let n = if round % 10 == 0 {
                            1
                        } else {
                            BATCH.min(per_lane - i)
                        };
                        let batch = (i..i + n)
                            .map(|k| {
                                new_customer("W", &format!("{side}{lane}-{k}@example.com"), None)
                            })
                            .collect();
                        let results = store.create_customers(batch, now()).await.unwrap();
                        assert!(results.iter().all(Result::is_ok));
                        i += n;
                    }
                });
            }
        }
        writers.join_all().await;
        let seen = reader.await.unwrap();
        assert_eq!(seen.len(), total as usize);
        assert!(
            seen.iter().copied().eq(1..=total),
            "positions were not 1..={total} in order"
        );
    })
    .await;
}

/// Retention running on two stores of one database at the same moment: both succeed, the
/// expired events are deleted once, and both learn where the log now starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_pruning_at_once_both_succeed() {
    bounded(async {
        let Some((a, b, _db, _stop)) = two_stores().await else {
            return;
        };
        let old = now() - Duration::from_secs(3600);
        for i in 0..20 {
            let store = if i % 2 == 0 { &a } else { &b };
            store
                .create_customer(
                    new_customer("Old", &format!("old{i}@example.com"), None),
                    old,
                )
                .await
                .unwrap();
        }
        a.create_customer(new_customer("New", "new@example.com", None), now())
            .await
            .unwrap();
        let cutoff = now() - Duration::from_secs(60);
        for _ in 0..5 {
            let (from_a, from_b) = tokio::join!(a.prune_events(cutoff), b.prune_events(cutoff));
            let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
            assert!(from_a + from_b <= 20, "each event is deleted once");
        }
        for store in [&a, &b] {
            let mut bounds = store.subscribe().unwrap();
            tokio::time::timeout(
                Duration::from_secs(10),
                bounds.wait_for(|bounds| bounds.pruned_through == 20 && bounds.head == 21),
            )
            .await
            .expect("the store learned the new bounds")
            .unwrap();
            assert!(matches!(
                store.events_after(Position(3), 10).await,
                Err(Error::TokenExpired {
                    position: 3,
                    pruned_through: 20
                })
            ));
            assert_eq!(
                seqs(&store.events_after(Position(20), 10).await.unwrap()),
                [21]
            );
        }
    })
    .await;
}
