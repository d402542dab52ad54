//! Where package requests live.
//!
//! [`InventoryStore`] is what the service needs from storage; [`SqliteStore`] is the embedded
//! implementation. Every check-then-write runs inside one write on the single writer thread,
//! so an idempotent create or a status move cannot race another one. Listing order comes from
//! `seq`, handed out by that same writer, so it is the commit order. The SQL sticks to what
//! PostgreSQL also runs (`BIGINT`, `TEXT`, `COALESCE`, no `AUTOINCREMENT` or `rowid`).

use std::path::Path;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, Durability};
use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use uuid::Uuid;

use crate::domain::{
    Created, NewPackageRequest, PackageRequest, PackageRequestPage, PackageStatus, StatusChange,
};
use crate::error::Error;

/// What the Inventory service needs from storage.
#[async_trait]
pub trait InventoryStore: Send + Sync + 'static {
    /// Creates a PENDING package request. A repeated `request_id` with the same parameters
    /// returns the original and creates nothing; with other parameters it fails with
    /// [`Error::RequestIdReused`].
    async fn create_package_request(
        &self,
        new: NewPackageRequest,
        now: SystemTime,
    ) -> Result<Created, Error>;
    /// Creates each package request as [`InventoryStore::create_package_request`] would, in
    /// order, in one write: one commit for all. Each succeeds or fails on its own; the outer
    /// error is for the write as a whole (storage).
    async fn create_package_requests(
        &self,
        new: Vec<NewPackageRequest>,
        now: SystemTime,
    ) -> Result<Vec<Result<Created, Error>>, Error>;
    /// One package request.
    async fn get_package_request(&self, id: Uuid) -> Result<PackageRequest, Error>;
    /// Up to `limit` package requests created after creation position `after`, oldest first,
    /// only those of `customer_id` if given.
    async fn list_package_requests(
        &self,
        customer_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<PackageRequestPage, Error>;
    /// Moves a package request to `status`, if its life cycle allows it.
    async fn update_status(
        &self,
        id: Uuid,
        status: PackageStatus,
        now: SystemTime,
    ) -> Result<StatusChange, Error>;
}

/// Database file name under the data directory.
pub const DB_FILE: &str = "inventory.db";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
        "CREATE TABLE package_requests (
            id           TEXT PRIMARY KEY,
            customer_id  TEXT NOT NULL,
            package_type TEXT NOT NULL,
            status       BIGINT NOT NULL,
            create_time  BIGINT NOT NULL,
            update_time  BIGINT NOT NULL,
            request_id   TEXT UNIQUE,
            fingerprint  TEXT,
            seq          BIGINT NOT NULL UNIQUE
        );
        CREATE INDEX package_requests_customer_seq ON package_requests (customer_id, seq);",
    )])
}

/// The embedded store: SQLite through the shared group-commit writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The database.
    db: Db,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/inventory.db`.
    pub async fn open(dir: &Path, durability: Durability) -> Result<Self, Error> {
        let db = Db::open(dir, DB_FILE, &migrations(), durability)?;
        Ok(Self { db })
    }
}

const COLUMNS: &str = "id, customer_id, package_type, status, create_time, update_time, request_id";

fn package_request_from_row(row: &Row<'_>) -> rusqlite::Result<PackageRequest> {
    let id: String = row.get(0)?;
    let customer_id: String = row.get(1)?;
    let code: i64 = row.get(3)?;
    let request_id: Option<String> = row.get(6)?;
    Ok(PackageRequest {
        id: parse_uuid(&id, 0)?,
        customer_id: parse_uuid(&customer_id, 1)?,
        package_type: row.get(2)?,
        status: PackageStatus::from_code(code)
            .ok_or(rusqlite::Error::IntegralValueOutOfRange(3, code))?,
        create_time: from_micros(row.get(4)?),
        update_time: from_micros(row.get(5)?),
        request_id: request_id
            .as_deref()
            .map(|r| parse_uuid(r, 6))
            .transpose()?,
    })
}

fn parse_uuid(text: &str, column: usize) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn find(c: &Connection, id: Uuid) -> Result<Option<PackageRequest>, Error> {
    Ok(c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM package_requests WHERE id = ?1"
    ))?
    .query_row([id.to_string()], package_request_from_row)
    .optional()?)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Creates a PENDING package request inside the current write, or returns the one a repeated
/// `request_id` created. Every refusal (request id reused) is found before anything is written.
fn insert(c: &Connection, new: NewPackageRequest, now: SystemTime) -> Result<Created, Error> {
    if let Some(request_id) = new.request_id {
        let previous: Option<(Option<String>, String)> = c
            .prepare_cached("SELECT fingerprint, id FROM package_requests WHERE request_id = ?1")?
            .query_row([request_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((fingerprint, id)) = previous {
            if fingerprint.as_deref() != Some(new.fingerprint().as_str()) {
                return Err(Error::RequestIdReused(request_id));
            }
            let id = parse_uuid(&id, 1)?;
            let original = find(c, id)?.ok_or(Error::NotFound(id))?;
            return Ok(Created {
                package_request: original,
                replayed: true,
            });
        }
    }
    let seq: i64 = c
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM package_requests")?
        .query_row([], |r| r.get(0))?;
    let package_request = PackageRequest {
        id: Uuid::now_v7(),
        customer_id: new.customer_id,
        package_type: new.package_type.as_str().to_owned(),
        status: PackageStatus::Pending,
        create_time: now,
        update_time: now,
        request_id: new.request_id,
    };
    c.prepare_cached(
        "INSERT INTO package_requests
            (id, customer_id, package_type, status, create_time, update_time,
             request_id, fingerprint, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        package_request.id.to_string(),
        package_request.customer_id.to_string(),
        package_request.package_type,
        package_request.status.code(),
        to_micros(now),
        to_micros(now),
        new.request_id.map(|r| r.to_string()),
        new.request_id.map(|_| new.fingerprint()),
        seq,
    ])?;
    Ok(Created {
        package_request,
        replayed: false,
    })
}

#[async_trait]
impl InventoryStore for SqliteStore {
    async fn create_package_request(
        &self,
        new: NewPackageRequest,
        now: SystemTime,
    ) -> Result<Created, Error> {
        // Stored to the microsecond: rounding here makes the create response equal to every
        // later read of the same row.
        let now = from_micros(to_micros(now));
        self.db.write(move |c| insert(c, new, now)).await
    }

    async fn create_package_requests(
        &self,
        new: Vec<NewPackageRequest>,
        now: SystemTime,
    ) -> Result<Vec<Result<Created, Error>>, Error> {
        let now = from_micros(to_micros(now));
        self.db
            .write(move |c| {
                let mut results = Vec::with_capacity(new.len());
                for one in new {
                    match insert(c, one, now) {
                        // A storage failure may leave this write half done: fail it all.
                        Err(e @ Error::Storage(_)) => return Err(e),
                        // Every other refusal is found before anything is written.
                        result => results.push(result),
                    }
                }
                Ok(results)
            })
            .await
    }

    async fn get_package_request(&self, id: Uuid) -> Result<PackageRequest, Error> {
        self.db
            .read(move |c| find(c, id)?.ok_or(Error::NotFound(id)))
            .await
    }

    async fn list_package_requests(
        &self,
        customer_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<PackageRequestPage, Error> {
        self.db
            .read(move |c| {
                // One row more than asked tells whether another page follows, so the last page
                // carries no token instead of sending the client for an empty one.
                let fetch = to_i64(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1));
                let mut rows = Vec::with_capacity(limit.min(1024) + 1);
                // Two statements rather than `(?2 IS NULL OR customer_id = ?2)`, which
                // PostgreSQL cannot type and neither database can serve from the index.
                match customer_id {
                    Some(customer_id) => {
                        let mut statement = c.prepare_cached(&format!(
                            "SELECT {COLUMNS}, seq FROM package_requests
                             WHERE customer_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                        ))?;
                        let found = statement.query_map(
                            params![customer_id.to_string(), to_i64(after), fetch],
                            row_with_seq,
                        )?;
                        for row in found {
                            rows.push(row?);
                        }
                    }
                    None => {
                        let mut statement = c.prepare_cached(&format!(
                            "SELECT {COLUMNS}, seq FROM package_requests
                             WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                        ))?;
                        let found =
                            statement.query_map(params![to_i64(after), fetch], row_with_seq)?;
                        for row in found {
                            rows.push(row?);
                        }
                    }
                }
                let more = rows.len() > limit;
                rows.truncate(limit);
                let next_after = if more {
                    rows.last().map(|(_, seq)| *seq)
                } else {
                    None
                };
                Ok(PackageRequestPage {
                    package_requests: rows.into_iter().map(|(r, _)| r).collect(),
                    next_after,
                })
            })
            .await
    }

    async fn update_status(
        &self,
        id: Uuid,
        status: PackageStatus,
        now: SystemTime,
    ) -> Result<StatusChange, Error> {
        let now = from_micros(to_micros(now));
        self.db
            .write(move |c| {
                let current = find(c, id)?.ok_or(Error::NotFound(id))?;
                let updated = current
                    .with_status(status, now)
                    .map_err(|m| Error::IllegalMove {
                        id,
                        from: m.from,
                        to: m.to,
                    })?;
                if updated != current {
                    c.prepare_cached(
                        "UPDATE package_requests SET status = ?2, update_time = ?3 WHERE id = ?1",
                    )?
                    .execute(params![
                        id.to_string(),
                        updated.status.code(),
                        to_micros(now)
                    ])?;
                }
                Ok(StatusChange {
                    package_request: updated,
                    previous: current.status,
                })
            })
            .await
    }
}

fn row_with_seq(row: &Row<'_>) -> rusqlite::Result<(PackageRequest, u64)> {
    let seq: i64 = row.get(7)?;
    Ok((package_request_from_row(row)?, seq.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::PackageType;

    fn new(customer_id: Uuid, request_id: Option<Uuid>) -> NewPackageRequest {
        NewPackageRequest {
            customer_id,
            package_type: PackageType::parse("welcome_package").unwrap(),
            request_id,
        }
    }

    #[tokio::test]
    async fn concurrent_retries_of_one_request_create_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(dir.path(), Durability::Normal)
                .await
                .unwrap(),
        );
        let customer_id = Uuid::now_v7();
        let request_id = Uuid::now_v7();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                store
                    .create_package_request(new(customer_id, Some(request_id)), SystemTime::now())
                    .await
                    .unwrap()
            });
        }
        let created = tasks.join_all().await;
        let first = &created[0].package_request;
        assert!(created.iter().all(|c| c.package_request == *first));
        assert_eq!(created.iter().filter(|c| !c.replayed).count(), 1);
        let page = store.list_package_requests(None, 0, 100).await.unwrap();
        assert_eq!(page.package_requests, vec![first.clone()]);
    }

    #[tokio::test]
    async fn last_page_carries_no_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Durability::Normal)
            .await
            .unwrap();
        let customer_id = Uuid::now_v7();
        for _ in 0..4 {
            store
                .create_package_request(new(customer_id, None), SystemTime::now())
                .await
                .unwrap();
        }
        let first = store
            .list_package_requests(Some(customer_id), 0, 2)
            .await
            .unwrap();
        let after = first.next_after.expect("a second page");
        let second = store
            .list_package_requests(Some(customer_id), after, 2)
            .await
            .unwrap();
        assert_eq!(second.package_requests.len(), 2);
        assert_eq!(second.next_after, None);
    }
}
