//! The PostgreSQL plumbing against a real server of the test's own: migrations under the
//! advisory lock, error classification, connecting with retries, and group commit surviving a
//! server restart.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::postgres::{Batch, Pg, PgOptions, Writer};
use mip_runtime::store::DbError;
use mip_testkit::postgres::PgServer;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE demo.item (id BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE);",
    "INSERT INTO demo.item (id, name) VALUES (0, 'seed');",
];

/// The shared server's fresh database, or `None` where PostgreSQL is missing.
fn database() -> Option<PgOptions> {
    let server = PgServer::shared()?;
    Some(PgOptions::parse(&server.create_database(), 8).expect("test URL"))
}

async fn connect(options: &PgOptions) -> Pg {
    Pg::connect(options, "demo", MIGRATIONS, &CancellationToken::new())
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_at_once_apply_each_migration_once() {
    let Some(options) = database() else { return };
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let options = options.clone();
            tokio::spawn(async move { connect(&options).await })
        })
        .collect();
    let mut pools = Vec::new();
    for start in starts {
        pools.push(start.await.unwrap());
    }
    let client = pools[0].client().await.unwrap();
    let seeded: i64 = client
        .query_one("SELECT COUNT(*) FROM demo.item", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seeded, 1, "the data migration ran once");
    let versions: i64 = client
        .query_one("SELECT COUNT(*) FROM demo.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_build_is_refused_clearly() {
    let Some(options) = database() else { return };
    connect(&options).await;
    let err = Pg::connect(
        &options,
        "demo",
        &MIGRATIONS[..1],
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DbError::Migration { .. }), "{err:?}");
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_sorted_into_what_a_caller_can_act_on() {
    let Some(options) = database() else { return };
    let pg = connect(&options).await;
    let client = pg.client().await.unwrap();
    let duplicate = client
        .execute("INSERT INTO demo.item (id, name) VALUES (1, 'seed')", &[])
        .await
        .unwrap_err();
    let classified = pg.error(&duplicate);
    assert_eq!(
        classified.unique_constraint(),
        Some("item_name_key"),
        "{classified:?}"
    );

    let server = PgServer::shared().unwrap();
    let missing =
        PgOptions::parse(&server.url("no_such_database"), 2).expect("URL of a missing database");
    let err = Pg::connect(&missing, "demo", MIGRATIONS, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::Open { .. }),
        "a missing database is not worth waiting for: {err:?}"
    );
    assert!(err.to_string().contains("no_such_database"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_and_start_up_waits_for_it() {
    let Some(server) = PgServer::start_or_skip() else {
        return;
    };
    let options = PgOptions::parse(&server.url("postgres"), 2).unwrap();
    server.kill();
    let err = Pg::new(&options, "test")
        .unwrap()
        .client()
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", server.port())),
        "the message names the server: {err}"
    );

    let shutdown = CancellationToken::new();
    let connecting = {
        let (options, shutdown) = (options.clone(), shutdown.clone());
        tokio::spawn(async move { Pg::connect(&options, "demo", MIGRATIONS, &shutdown).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!connecting.is_finished(), "start-up keeps trying");
    server.restart();
    let pg = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connected once the server was back")
        .unwrap()
        .unwrap();
    drop(pg.client().await.unwrap());
}

/// Inserts names; a name already there is a refusal, found without raising.
struct Names;

#[async_trait]
impl Batch for Names {
    type Op = &'static str;
    type Reply = bool;

    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        ops: Vec<&'static str>,
    ) -> Result<Vec<bool>, DbError> {
        let insert = tx
            .prepare_cached(
                "INSERT INTO demo.item (id, name)
                 VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM demo.item), $1)
                 ON CONFLICT (name) DO NOTHING",
            )
            .await?;
        let mut inserted = Vec::with_capacity(ops.len());
        for name in ops {
            if name == "boom" {
                // A write that raises, as one hitting a constraint nobody expected would.
                tx.execute("SELECT 1 / 0", &[]).await?;
            }
            inserted.push(tx.execute(&insert, &[&name]).await? == 1);
        }
        Ok(inserted)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_refuses_one_write_alone_and_recovers_after_a_restart() {
    let Some(server) = PgServer::start_or_skip() else {
        return;
    };
    let options = PgOptions::parse(&server.url("postgres"), 4).unwrap();
    let pg = connect(&options).await;
    let writer = Writer::spawn(pg.clone(), Arc::new(Names), 2);
    let (a, again, b) = tokio::join!(writer.write("a"), writer.write("a"), writer.write("b"));
    let mut results = [a.unwrap(), again.unwrap(), b.unwrap()];
    results[..2].sort();
    assert_eq!(
        results,
        [false, true, true],
        "one of the two 'a' is refused"
    );

    server.kill();
    let err = writer.write("c").await.unwrap_err();
    assert!(
        err.is_transient(),
        "a lost server is worth a retry: {err:?}"
    );
    server.restart();
    // The pool drops the dead connections and makes new ones: no new writer, no restart.
    let mut attempts = 0;
    let written = loop {
        attempts += 1;
        match writer.write("c").await {
            Ok(written) => break written,
            Err(e) if e.is_transient() && attempts < 50 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert!(written);
    let count: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT COUNT(*) FROM demo.item", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 4, "seed, a, b, c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_raises_fails_alone_not_with_its_group() {
    let Some(options) = database() else { return };
    let pg = connect(&options).await;
    // One writer, so that the writes queued together share one group.
    let writer = Writer::spawn(pg.clone(), Arc::new(Names), 1);
    let writes: Vec<_> = ["x", "boom", "y", "z"]
        .into_iter()
        .map(|name| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.write(name).await })
        })
        .collect();
    let mut results = Vec::new();
    for write in writes {
        results.push(write.await.unwrap());
    }
    assert!(
        matches!(&results[1], Err(DbError::Other { .. })),
        "{:?}",
        results[1]
    );
    for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_eq!(result.as_ref().ok(), Some(&true), "write {i}: {result:?}");
    }
}
