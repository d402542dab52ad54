//! The store's behaviour, the same on every backend: `backend_tests!` runs each scenario on
//! SQLite (a temporary directory) and on PostgreSQL (a fresh database).

use std::time::{Duration, SystemTime};

use mip_integration::store::{self, DeadLetter, IntegrationStore};
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
    async fn the_checkpoint_is_absent_then_saved_then_replaced(db: Database) {
        let store = opened(&db).await;
        assert_eq!(store.checkpoint().await.unwrap(), None);
        let first = Mark {
            token: "token-7".to_owned(),
            sequence: 7,
        };
        store.save_checkpoint(first.clone(), at(1)).await.unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), Some(first));
        let second = Mark {
            token: "token-9".to_owned(),
            sequence: 9,
        };
        store.save_checkpoint(second.clone(), at(2)).await.unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), Some(second));
    }

    async fn the_checkpoint_survives_reopening_the_store(db: Database) {
        let mark = Mark {
            token: "kept".to_owned(),
            sequence: 42,
        };
        opened(&db)
            .await
            .save_checkpoint(mark.clone(), at(1))
            .await
            .unwrap();
        assert_eq!(opened(&db).await.checkpoint().await.unwrap(), Some(mark));
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
