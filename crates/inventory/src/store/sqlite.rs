//! The embedded store: SQLite through the shared group-commit writer.
//!
//! Every check-then-write runs inside one write of the writer thread, and a write that is
//! refused is refused before it changes a row, so it leaves its group commit alone. The SQL
//! sticks to what PostgreSQL also runs (`BIGINT`, `TEXT`, `COALESCE`, `RETURNING`, no
//! `AUTOINCREMENT` or `rowid`).

use std::path::Path;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, Durability};
use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use uuid::Uuid;

use super::{InventoryStore, fetch_for, page_of, to_i64};
use crate::domain::{
    Created, NewPackageRequest, PackageRequest, PackageRequestPage, PackageStatus, StatusChange,
};
use crate::error::Error;

/// Database file name under the data directory.
pub const DB_FILE: &str = "inventory.db";

/// Versioned schema steps, oldest first. Never edit a step once released: add one.
const STEPS: [&str; 2] = [
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
    // The listing position comes from a counter row bumped in the write transaction, as on
    // PostgreSQL, instead of MAX(seq) + 1, which is right only while one thread writes.
    "CREATE TABLE counter (
        id   BIGINT PRIMARY KEY CHECK (id = 1),
        head BIGINT NOT NULL
    );
    INSERT INTO counter (id, head) SELECT 1, COALESCE(MAX(seq), 0) FROM package_requests;",
];

fn migrations() -> Migrations<'static> {
    Migrations::new(STEPS.iter().map(|step| M::up(step)).collect())
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
    let package_request = PackageRequest {
        id: Uuid::now_v7(),
        customer_id: new.customer_id,
        package_type: new.package_type.as_str().to_owned(),
        status: PackageStatus::Pending,
        create_time: now,
        update_time: now,
        request_id: new.request_id,
    };
    // Taken last, right before the insert: should the insert fail, the write has changed a
    // row, so its whole group rolls back and the number is handed out again.
    let seq: i64 = c
        .prepare_cached("UPDATE counter SET head = head + 1 WHERE id = 1 RETURNING head")?
        .query_row([], |r| r.get(0))?;
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
    async fn ready(&self) -> Result<(), Error> {
        // Opened, migrated and writable before `open` returned.
        Ok(())
    }

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
                let fetch = fetch_for(limit);
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
                Ok(page_of(rows, limit))
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
    use super::*;
    use crate::domain::PackageType;

    #[tokio::test]
    async fn the_counter_migration_continues_after_the_rows_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A database as the first schema version left it, with positions 1 to 3 taken.
            let mut c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            Migrations::new(vec![M::up(STEPS[0])])
                .to_latest(&mut c)
                .unwrap();
            for seq in 1..=3i64 {
                c.execute(
                    "INSERT INTO package_requests
                        (id, customer_id, package_type, status, create_time, update_time, seq)
                     VALUES (?1, ?2, 'welcome_package', 1, 0, 0, ?3)",
                    params![Uuid::now_v7().to_string(), Uuid::now_v7().to_string(), seq],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(dir.path(), Durability::Normal)
            .await
            .unwrap();
        let new = NewPackageRequest {
            customer_id: Uuid::now_v7(),
            package_type: PackageType::parse("welcome_package").unwrap(),
            request_id: None,
        };
        let created = store
            .create_package_request(new, SystemTime::now())
            .await
            .unwrap()
            .package_request;
        let after_old = store.list_package_requests(None, 3, 10).await.unwrap();
        assert_eq!(after_old.package_requests, vec![created]);
        let all = store.list_package_requests(None, 0, 10).await.unwrap();
        assert_eq!(all.package_requests.len(), 4);
    }
}
