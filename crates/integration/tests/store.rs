//! The store's behaviour, the same on every backend: `backend_tests!` runs each scenario on
//! SQLite (a temporary directory) and on PostgreSQL (a fresh database).

use std::time::{Duration, SystemTime};

use mip_integration::deliver::Action;
use mip_integration::store::{self, DeadLetter, IntegrationStore, Move};
use mip_integration::tracker::Mark;
use mip_runtime::CancellationToken;
use mip_runtime::store::Database;
use mip_testkit::backend_tests;

/// Longest any scenario may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The store `database` names, ready for calls.
async fn opened(database: &Database) -> std::sync::Arc<dyn IntegrationStore> {
    let store = store::open(database, &CancellationToken::new())
        .await
        .expect("store opens");
    tokio::time::timeout(TIMEOUT, store.ready())
        .await
        .expect("store ready in time")
        .expect("store ready");
    store
}

/// A time both backends keep exactly (whole microseconds).
fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

fn letter(event_id: &str, attempts: u32, seconds: u64) -> DeadLetter {
    DeadLetter {
        event_id: event_id.to_owned(),
        customer_id: format!("customer of {event_id}"),
        action: Action::Create,
        reason: format!("InvalidArgument: try {seconds}"),
        attempts,
        create_time: at(seconds),
        update_time: at(seconds),
    }
}

/// The event ids of a listing, in order.
fn event_ids(rows: &[(i64, DeadLetter)]) -> Vec<&str> {
    rows.iter().map(|(_, l)| l.event_id.as_str()).collect()
}

backend_tests! {
    async fn the_partition_count_is_recorded_once_and_another_is_refused(db: Database) {
        let store = opened(&db).await;
        store.init_partitions(8).await.unwrap();
        store.init_partitions(8).await.unwrap();
        assert_eq!(store.checkpoints().await.unwrap().len(), 8);
        let refused = opened(&db).await.init_partitions(16).await.unwrap_err();
        let message = refused.to_string();
        assert!(message.contains(" 8 ") && message.contains("16"), "{message}");
    }

    async fn a_checkpoint_written_after_the_lease_moved_on_is_refused(db: Database) {
        let store = opened(&db).await;
        store.init_partitions(4).await.unwrap();
        let ttl = Duration::from_millis(50);
        let taken = store.acquire("a", 10, ttl, SystemTime::now()).await.unwrap();
        assert_eq!(taken.iter().map(|l| l.partition).collect::<Vec<_>>(), [0, 1, 2, 3]);
        let a: Vec<(u32, i64)> = taken.iter().map(|l| (l.partition, l.epoch)).collect();
        let first = Mark { token: "t5".to_owned(), sequence: 5 };
        assert_eq!(store.save_checkpoints("a", &a, &first, Move::Forward, at(1)).await.unwrap(), Vec::<u32>::new());
        // Nothing is free until the leases run out; then "b" takes them at a higher epoch.
        assert!(store.acquire("b", 10, ttl, SystemTime::now()).await.unwrap().is_empty());
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let stolen = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let stolen = store.acquire("b", 10, Duration::from_secs(60), SystemTime::now())
                .await
                .unwrap();
            if !stolen.is_empty() {
                break stolen;
            }
            assert!(tokio::time::Instant::now() < deadline, "the leases never ran out");
        };
        assert_eq!(stolen.len(), 4);
        assert!(stolen.iter().all(|l| l.epoch == a[0].1 + 1 && l.checkpoint == Some(first.clone())));
        let late = Mark { token: "t9".to_owned(), sequence: 9 };
        let mut fenced = store.save_checkpoints("a", &a, &late, Move::Forward, at(2)).await.unwrap();
        fenced.sort_unstable();
        assert_eq!(fenced, [0, 1, 2, 3]);
        assert!(store.renew("a", &a, ttl, SystemTime::now()).await.unwrap().is_empty());
        let b: Vec<(u32, i64)> = stolen.iter().map(|l| (l.partition, l.epoch)).collect();
        // The successor is not refused, and a checkpoint never moves back.
        assert_eq!(store.save_checkpoints("b", &b, &late, Move::Forward, at(3)).await.unwrap(), Vec::<u32>::new());
        assert_eq!(store.save_checkpoints("b", &b, &first, Move::Forward, at(4)).await.unwrap(), Vec::<u32>::new());
        let saved = store.checkpoints().await.unwrap();
        assert!(saved.iter().all(|(_, m)| m.as_ref() == Some(&late)), "{saved:?}");
    }

    async fn the_first_start_mark_recorded_is_the_one_every_worker_gets(db: Database) {
        let store = opened(&db).await;
        store.init_partitions(4).await.unwrap();
        let first = Mark { token: "t5".to_owned(), sequence: 5 };
        let later = Mark { token: "t9".to_owned(), sequence: 9 };
        assert_eq!(store.start_mark(&first).await.unwrap(), first);
        assert_eq!(opened(&db).await.start_mark(&later).await.unwrap(), first);
    }

    async fn a_restart_under_the_same_name_takes_its_partitions_back_and_fences_the_old_process(db: Database) {
        let store = opened(&db).await;
        store.init_partitions(4).await.unwrap();
        let ttl = Duration::from_secs(60);
        let old = store.acquire("a", 2, ttl, SystemTime::now()).await.unwrap();
        let other = store.acquire("b", 2, ttl, SystemTime::now()).await.unwrap();
        let old: Vec<(u32, i64)> = old.iter().map(|l| (l.partition, l.epoch)).collect();
        let back = store.reclaim("a", ttl, SystemTime::now()).await.unwrap();
        assert_eq!(back.iter().map(|l| l.partition).collect::<Vec<_>>(), [0, 1]);
        assert!(back.iter().zip(&old).all(|(l, (_, epoch))| l.epoch == epoch + 1), "{back:?}");
        // The old process's late write is refused; "b"'s partitions were not touched.
        let late = Mark { token: "t3".to_owned(), sequence: 3 };
        let mut fenced = store.save_checkpoints("a", &old, &late, Move::Forward, at(1)).await.unwrap();
        fenced.sort_unstable();
        assert_eq!(fenced, [0, 1]);
        let b: Vec<(u32, i64)> = other.iter().map(|l| (l.partition, l.epoch)).collect();
        assert_eq!(store.save_checkpoints("b", &b, &late, Move::Forward, at(2)).await.unwrap(), Vec::<u32>::new());
        assert!(store.reclaim("c", ttl, SystemTime::now()).await.unwrap().is_empty());
        // The old process's clean shutdown frees nothing of the new one's, nor hides it.
        store.heartbeat("a", SystemTime::now()).await.unwrap();
        store.retire("a", &old).await.unwrap();
        let workers = store.live_workers(ttl, SystemTime::now()).await.unwrap();
        let a = workers.iter().find(|w| w.worker_id == "a").expect("a is still a worker");
        assert_eq!(a.partitions, 2, "{workers:?}");
    }

    async fn workers_are_listed_with_their_partitions_until_they_retire(db: Database) {
        let store = opened(&db).await;
        store.init_partitions(4).await.unwrap();
        let ttl = Duration::from_secs(60);
        let now = SystemTime::now();
        store.heartbeat("a", now).await.unwrap();
        store.heartbeat("b", now).await.unwrap();
        let taken = store.acquire("a", 3, ttl, now).await.unwrap();
        assert_eq!(taken.len(), 3);
        let workers = store.live_workers(ttl, now).await.unwrap();
        let owned: Vec<(&str, u32)> =
            workers.iter().map(|w| (w.worker_id.as_str(), w.partitions)).collect();
        assert_eq!(owned, [("a", 3), ("b", 0)]);
        store.release("a", &[(taken[0].partition, taken[0].epoch)]).await.unwrap();
        assert_eq!(store.acquire("b", 10, ttl, now).await.unwrap().len(), 2);
        let rest: Vec<(u32, i64)> = taken[1..].iter().map(|l| (l.partition, l.epoch)).collect();
        store.retire("a", &rest).await.unwrap();
        let workers = store.live_workers(ttl, now).await.unwrap();
        assert_eq!(workers.len(), 1);
        assert_eq!((workers[0].worker_id.as_str(), workers[0].partitions), ("b", 2));
    }

    async fn a_dead_letter_put_twice_keeps_its_place_and_adds_up_its_attempts(db: Database) {
        let store = opened(&db).await;
        store.put_dead_letter(letter("a", 3, 1)).await.unwrap();
        store.put_dead_letter(letter("b", 1, 2)).await.unwrap();
        store.put_dead_letter(letter("a", 2, 5)).await.unwrap();
        let rows = store.dead_letters(0, 10).await.unwrap();
        assert_eq!(event_ids(&rows), ["a", "b"]);
        let again = &rows[0].1;
        assert_eq!(again.attempts, 5);
        assert_eq!(again.reason, "InvalidArgument: try 5");
        assert_eq!(again.create_time, at(1), "first failure time is kept");
        assert_eq!(again.update_time, at(5));
        assert_eq!(rows[1].1, letter("b", 1, 2));
        assert_eq!(store.count_dead_letters().await.unwrap(), 2);
    }

    async fn a_dead_letter_keeps_whether_it_was_a_create_or_a_cancel(db: Database) {
        let store = opened(&db).await;
        store.put_dead_letter(letter("created", 1, 1)).await.unwrap();
        let cancel = DeadLetter { action: Action::Cancel, ..letter("deleted", 1, 2) };
        store.put_dead_letter(cancel.clone()).await.unwrap();
        // A second failure of the same cancel adds up, and it stays a cancel.
        store.put_dead_letter(DeadLetter { attempts: 2, ..cancel.clone() }).await.unwrap();
        let rows = store.dead_letters(0, 10).await.unwrap();
        let actions: Vec<_> = rows.iter().map(|(_, l)| (l.event_id.as_str(), l.action)).collect();
        assert_eq!(actions, [("created", Action::Create), ("deleted", Action::Cancel)]);
        assert_eq!(rows[1].1.attempts, 3);
    }

    async fn dead_letters_list_in_insertion_order_page_by_page(db: Database) {
        let store = opened(&db).await;
        let names = ["e1", "e2", "e3", "e4", "e5"];
        for (n, name) in (0..).zip(names) {
            store.put_dead_letter(letter(name, 1, n)).await.unwrap();
        }
        let mut listed = Vec::new();
        let mut after = 0;
        loop {
            let page = store.dead_letters(after, 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some((last, _)) = page.last() else { break };
            assert!(*last > after, "positions only grow");
            after = *last;
            listed.extend(page.into_iter().map(|(_, l)| l.event_id));
        }
        assert_eq!(listed, names);
        assert!(store.dead_letters(after, 2).await.unwrap().is_empty());
    }

    async fn a_removed_dead_letter_is_gone_and_the_rest_stay(db: Database) {
        let store = opened(&db).await;
        for (n, name) in (0..).zip(["x", "y", "z"]) {
            store.put_dead_letter(letter(name, 1, n)).await.unwrap();
        }
        store.remove_dead_letter("y").await.unwrap();
        // Removing what is not there is not an error: a re-drive may race another's.
        store.remove_dead_letter("y").await.unwrap();
        store.remove_dead_letter("never-there").await.unwrap();
        let rows = store.dead_letters(0, 10).await.unwrap();
        assert_eq!(event_ids(&rows), ["x", "z"]);
        assert_eq!(store.count_dead_letters().await.unwrap(), 2);
        // A letter put again after removal goes to the end.
        store.put_dead_letter(letter("y", 1, 9)).await.unwrap();
        let rows = store.dead_letters(0, 10).await.unwrap();
        assert_eq!(event_ids(&rows), ["x", "z", "y"]);
        assert_eq!(rows[2].1.attempts, 1);
    }
}

/// Workers starting together on an empty database all agree on the recorded count: none sees
/// "no row" because another's insert committed after its statement began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_starts_racing_on_an_empty_database_all_record_the_same_count() {
    let Some(db) = mip_testkit::postgres_database() else {
        return;
    };
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let db = db.clone();
        starts.spawn(async move { opened(&db).await.init_partitions(8).await });
    }
    while let Some(started) = starts.join_next().await {
        started.unwrap().expect("every racing first start succeeds");
    }
}

/// A takeover that commits while a stale worker's checkpoint write waits for the partition's
/// row is reported as a refusal: the write decides on the lease it waited for, not on the one
/// its statement first saw, so the stale worker learns at once that it lost the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_committing_while_a_checkpoint_write_waits_is_reported_as_fenced() {
    let Some(server) = mip_testkit::postgres::PgServer::shared() else {
        return;
    };
    let url = server.create_database();
    let store = opened(&Database::from_url(&url, 8).expect("URL parses")).await;
    store.init_partitions(2).await.unwrap();
    let taken = store
        .acquire("a", 10, Duration::from_secs(60), SystemTime::now())
        .await
        .unwrap();
    let a: Vec<(u32, i64)> = taken.iter().map(|l| (l.partition, l.epoch)).collect();
    assert_eq!(a.len(), 2);

    let (mut raw, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let takeover = raw.transaction().await.unwrap();
    takeover
        .execute(
            "UPDATE integration.partitions SET owner = 'b', epoch = epoch + 1
             WHERE partition_id = 0",
            &[],
        )
        .await
        .unwrap();

    let mark = Mark {
        token: "t7".to_owned(),
        sequence: 7,
    };
    let save = tokio::spawn({
        let store = std::sync::Arc::clone(&store);
        let a = a.clone();
        let mark = mark.clone();
        async move {
            store
                .save_checkpoints("a", &a, &mark, Move::Forward, at(1))
                .await
        }
    });
    // Commit the takeover only once the write is queued behind its row lock.
    let (observer, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write never waited for the row"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    takeover.commit().await.unwrap();

    let fenced = tokio::time::timeout(TIMEOUT, save)
        .await
        .expect("the write finishes")
        .unwrap()
        .unwrap();
    assert_eq!(fenced, [0], "partition 0 moved to b while the write waited");
    let saved = store.checkpoints().await.unwrap();
    assert_eq!(saved, [(0, None), (1, Some(mark))]);
}
