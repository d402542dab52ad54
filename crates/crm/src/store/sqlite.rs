//! The embedded store: CRM's tables in one SQLite file, written through the shared
//! group-commit writer thread.
//!
//! Every change and its event commit in one transaction, and sequence numbers come from the
//! `change_log` counter row in that transaction, so the log's order is the commit order, with
//! no gaps.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, Durability};
use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use tokio::sync::watch;
use uuid::Uuid;

use super::{CrmStore, FEED_CAPACITY, events_from_feed, published};
use crate::domain::{
    Customer, CustomerEvent, CustomerPage, CustomerPatch, EventType, LogBounds, NewCustomer,
    Position, Rendered,
};
use crate::error::Error;
use crate::feed::Feed;

/// Database file name under the data directory.
pub const DB_FILE: &str = "crm.db";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
        "CREATE TABLE customers (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            email       TEXT NOT NULL,
            email_key   TEXT NOT NULL UNIQUE,
            create_time BIGINT NOT NULL,
            update_time BIGINT NOT NULL,
            version     BIGINT NOT NULL,
            created_seq BIGINT NOT NULL UNIQUE
        );
        CREATE TABLE customer_events (
            seq         BIGINT PRIMARY KEY,
            event_id    TEXT NOT NULL,
            event_type  BIGINT NOT NULL,
            customer_id TEXT NOT NULL,
            name        TEXT NOT NULL,
            email       TEXT NOT NULL,
            create_time BIGINT NOT NULL,
            update_time BIGINT NOT NULL,
            version     BIGINT NOT NULL,
            commit_time BIGINT NOT NULL
        );
        CREATE INDEX customer_events_commit_time ON customer_events (commit_time);
        CREATE TABLE create_requests (
            request_id  TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            customer_id TEXT NOT NULL
        );
        CREATE TABLE change_log (
            id             BIGINT PRIMARY KEY CHECK (id = 1),
            log_id         BIGINT NOT NULL,
            head           BIGINT NOT NULL,
            pruned_through BIGINT NOT NULL
        );",
    )])
}

/// The embedded store: SQLite through the shared group-commit writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The database.
    db: Db,
    /// Recent events and bounds, published by the writer thread on commit.
    feed: Arc<Feed>,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/crm.db`.
    pub async fn open(dir: &Path, durability: Durability) -> Result<Self, Error> {
        let db = Db::open(dir, DB_FILE, &migrations(), durability)?;
        let fresh_log_id = rand::random::<u64>() >> 1;
        let bounds = db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO change_log (id, log_id, head, pruned_through) VALUES (1, ?1, 0, 0)
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute([i64::try_from(fresh_log_id).unwrap_or_default()])?;
                read_bounds(c)
            })
            .await?;
        Ok(Self {
            db,
            feed: Arc::new(Feed::new(bounds, FEED_CAPACITY)),
        })
    }

    /// Appends an event inside the current write; returns it with its new sequence number.
    fn append(
        c: &Connection,
        kind: EventType,
        customer: &Customer,
        now: SystemTime,
    ) -> Result<CustomerEvent, Error> {
        let seq: i64 = c
            .prepare_cached("UPDATE change_log SET head = head + 1 WHERE id = 1 RETURNING head")?
            .query_row([], |r| r.get(0))?;
        let event = CustomerEvent {
            seq: seq.unsigned_abs(),
            event_id: Uuid::now_v7(),
            kind,
            customer: customer.clone(),
            commit_time: now,
            rendered: Rendered::default(),
        };
        c.prepare_cached(
            "INSERT INTO customer_events (seq, event_id, event_type, customer_id, name, email,
             create_time, update_time, version, commit_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6,
             ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            seq,
            event.event_id.to_string(),
            kind.code(),
            customer.id.to_string(),
            customer.name,
            customer.email,
            to_micros(customer.create_time),
            to_micros(customer.update_time),
            customer.version,
            to_micros(now),
        ])?;
        Ok(event)
    }

    /// Runs a write whose result carries events, and publishes them to watchers on commit.
    async fn write_events<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<(T, Vec<Arc<CustomerEvent>>), Error> + Send + 'static,
    {
        let feed = Arc::clone(&self.feed);
        let (value, _) = self
            .db
            .write_then(work, move |(_, events): &(T, Vec<Arc<CustomerEvent>>)| {
                feed.publish(events);
            })
            .await?;
        Ok(value)
    }
}

fn read_bounds(c: &Connection) -> Result<LogBounds, Error> {
    Ok(
        c.prepare_cached("SELECT log_id, head, pruned_through FROM change_log WHERE id = 1")?
            .query_row([], |r| {
                Ok(LogBounds {
                    log_id: r.get::<_, i64>(0)?.unsigned_abs(),
                    head: r.get::<_, i64>(1)?.unsigned_abs(),
                    pruned_through: r.get::<_, i64>(2)?.unsigned_abs(),
                })
            })?,
    )
}

const CUSTOMER_COLUMNS: &str = "id, name, email, create_time, update_time, version";

fn customer_from_row(row: &Row<'_>) -> rusqlite::Result<Customer> {
    let id: String = row.get(0)?;
    Ok(Customer {
        id: parse_uuid(&id, 0)?,
        name: row.get(1)?,
        email: row.get(2)?,
        create_time: from_micros(row.get(3)?),
        update_time: from_micros(row.get(4)?),
        version: row.get(5)?,
    })
}

fn parse_uuid(text: &str, column: usize) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn find_customer(c: &Connection, id: Uuid) -> Result<Option<Customer>, Error> {
    Ok(c.prepare_cached(&format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?1"
    ))?
    .query_row([id.to_string()], customer_from_row)
    .optional()?)
}

/// Whether another customer (not `except`) already uses this email key.
fn email_taken(c: &Connection, key: &str, except: Option<Uuid>) -> Result<bool, Error> {
    let owner: Option<String> = c
        .prepare_cached("SELECT id FROM customers WHERE email_key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(owner.is_some_and(|owner| except.is_none_or(|e| e.to_string() != owner)))
}

/// Creates a customer and its CREATED event inside the current write; a repeated
/// `request_id` returns the original and no event. Every refusal (request id reused, email
/// taken) is found before anything is written.
fn insert_customer(
    c: &Connection,
    new: NewCustomer,
    now: SystemTime,
) -> Result<(Customer, Option<Arc<CustomerEvent>>), Error> {
    if let Some(request_id) = new.request_id {
        let previous: Option<(String, String)> = c
            .prepare_cached(
                "SELECT fingerprint, customer_id FROM create_requests
                 WHERE request_id = ?1",
            )?
            .query_row([request_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((fingerprint, customer_id)) = previous {
            if fingerprint != new.fingerprint() {
                return Err(Error::RequestIdReused(request_id));
            }
            let customer_id = parse_uuid(&customer_id, 1)?;
            return match find_customer(c, customer_id)? {
                Some(customer) => Ok((customer, None)),
                None => Err(Error::CreatedThenDeleted {
                    request_id,
                    customer_id,
                }),
            };
        }
    }
    if email_taken(c, &new.email.key(), None)? {
        return Err(Error::EmailTaken(new.email.as_str().to_owned()));
    }
    let customer = Customer {
        id: Uuid::now_v7(),
        name: new.name.as_str().to_owned(),
        email: new.email.as_str().to_owned(),
        create_time: now,
        update_time: now,
        version: 1,
    };
    let event = SqliteStore::append(c, EventType::Created, &customer, now)?;
    c.prepare_cached(
        "INSERT INTO customers (id, name, email, email_key, create_time, update_time,
         version, created_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        customer.id.to_string(),
        customer.name,
        customer.email,
        new.email.key(),
        to_micros(now),
        to_micros(now),
        customer.version,
        i64::try_from(event.seq).unwrap_or(i64::MAX),
    ])?;
    if let Some(request_id) = new.request_id {
        c.prepare_cached(
            "INSERT INTO create_requests (request_id, fingerprint, customer_id) VALUES
             (?1, ?2, ?3)",
        )?
        .execute(params![
            request_id.to_string(),
            new.fingerprint(),
            customer.id.to_string()
        ])?;
    }
    Ok((customer, Some(Arc::new(event))))
}

#[async_trait]
impl CrmStore for SqliteStore {
    async fn ready(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn create_customer(&self, new: NewCustomer, now: SystemTime) -> Result<Customer, Error> {
        self.write_events(move |c| {
            let (customer, event) = insert_customer(c, new, now)?;
            Ok((customer, event.into_iter().collect()))
        })
        .await
    }

    async fn create_customers(
        &self,
        new: Vec<NewCustomer>,
        now: SystemTime,
    ) -> Result<Vec<Result<Customer, Error>>, Error> {
        self.write_events(move |c| {
            let mut results = Vec::with_capacity(new.len());
            let mut events = Vec::with_capacity(new.len());
            for one in new {
                match insert_customer(c, one, now) {
                    Ok((customer, event)) => {
                        results.push(Ok(customer));
                        events.extend(event);
                    }
                    // A storage failure may leave this write half done: fail it all.
                    Err(e @ Error::Storage(_)) => return Err(e),
                    // Every other refusal is found before anything is written.
                    Err(e) => results.push(Err(e)),
                }
            }
            Ok((results, events))
        })
        .await
    }

    async fn get_customer(&self, id: Uuid) -> Result<Customer, Error> {
        self.db
            .read(move |c| find_customer(c, id)?.ok_or(Error::NotFound(id)))
            .await
    }

    async fn update_customer(
        &self,
        id: Uuid,
        patch: CustomerPatch,
        now: SystemTime,
    ) -> Result<Customer, Error> {
        self.write_events(move |c| {
            let mut customer = find_customer(c, id)?.ok_or(Error::NotFound(id))?;
            // The one writer holds the write transaction from this read to the UPDATE below,
            // which repeats the condition, so no other write can come between.
            if let Some(expected) = patch.expected_version.filter(|v| *v != customer.version) {
                return Err(Error::VersionMismatch {
                    id,
                    expected,
                    current: customer.version,
                });
            }
            let read_version = customer.version;
            let mut changed = false;
            if let Some(name) = patch.name.filter(|n| n.as_str() != customer.name) {
                customer.name = name.as_str().to_owned();
                changed = true;
            }
            let mut email_key = None;
            if let Some(email) = patch.email.filter(|e| e.as_str() != customer.email) {
                if email_taken(c, &email.key(), Some(id))? {
                    return Err(Error::EmailTaken(email.as_str().to_owned()));
                }
                customer.email = email.as_str().to_owned();
                email_key = Some(email.key());
                changed = true;
            }
            if !changed {
                return Ok((customer, Vec::new()));
            }
            customer.update_time = now;
            customer.version += 1;
            let event = Self::append(c, EventType::Updated, &customer, now)?;
            // Compare-and-set: written only over the version read above.
            let written = c
                .prepare_cached(
                    "UPDATE customers SET name = ?2, email = ?3, email_key = COALESCE(?4, email_key),
                     update_time = ?5, version = ?6
                 WHERE id = ?1 AND version = ?7",
                )?
                .execute(params![
                    id.to_string(),
                    customer.name,
                    customer.email,
                    email_key,
                    to_micros(now),
                    customer.version,
                    read_version,
                ])?;
            if written != 1 {
                return Err(Error::Storage(mip_runtime::store::DbError::Other {
                    database: "crm".into(),
                    reason: format!("customer {id} changed inside its own write transaction"),
                }));
            }
            Ok((customer, vec![Arc::new(event)]))
        })
        .await
    }

    async fn delete_customer(&self, id: Uuid, now: SystemTime) -> Result<Position, Error> {
        self.write_events(move |c| {
            let customer = find_customer(c, id)?.ok_or(Error::NotFound(id))?;
            let event = Self::append(c, EventType::Deleted, &customer, now)?;
            c.prepare_cached("DELETE FROM customers WHERE id = ?1")?
                .execute([id.to_string()])?;
            Ok((Position(event.seq), vec![Arc::new(event)]))
        })
        .await
    }

    async fn list_customers(
        &self,
        after: u64,
        limit: usize,
        snapshot: Option<Position>,
    ) -> Result<CustomerPage, Error> {
        let page: CustomerPage = self
            .db
            .read(move |c| -> Result<_, Error> {
                // One read transaction: the head and the rows are the same snapshot, so a
                // watch from `snapshot` sees exactly the changes the listing may have missed.
                let tx = c.unchecked_transaction()?;
                let snapshot = match snapshot {
                    Some(p) => p,
                    None => Position(read_bounds(&tx)?.head),
                };
                let mut statement = tx.prepare_cached(&format!(
                    "SELECT {CUSTOMER_COLUMNS}, created_seq FROM customers
                     WHERE created_seq > ?1 AND created_seq <= ?3 ORDER BY created_seq LIMIT ?2"
                ))?;
                let mut last = None;
                let customers = statement
                    .query_map(
                        params![
                            i64::try_from(after).unwrap_or(i64::MAX),
                            i64::try_from(limit).unwrap_or(i64::MAX),
                            // Customers created after the snapshot come through the watch
                            // from `snapshot` instead, so no customer is seen twice.
                            i64::try_from(snapshot.0).unwrap_or(i64::MAX)
                        ],
                        |row| {
                            let created: i64 = row.get(6)?;
                            Ok((customer_from_row(row)?, created))
                        },
                    )?
                    .map(|r| {
                        r.map(|(customer, created)| {
                            last = Some(created.unsigned_abs());
                            customer
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let next_after = if customers.len() == limit { last } else { None };
                Ok(CustomerPage {
                    customers,
                    next_after,
                    snapshot,
                })
            })
            .await?;
        published(&self.feed, page.snapshot).await?;
        Ok(page)
    }

    async fn events_after(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Arc<CustomerEvent>>, Error> {
        let published = match events_from_feed(&self.feed, after, limit)? {
            Ok(events) => return Ok(events),
            Err(published) => published,
        };
        self.db
            .read(move |c| {
                let tx = c.unchecked_transaction()?;
                let bounds = read_bounds(&tx)?;
                if after.0 < bounds.pruned_through {
                    return Err(Error::TokenExpired {
                        position: after.0,
                        pruned_through: bounds.pruned_through,
                    });
                }
                // Only events already published to the feed: later ones have committed, but
                // positions past the feed's head are refused as ahead of the log until the
                // writer thread has published them.
                let mut statement = tx.prepare_cached(
                    "SELECT seq, event_id, event_type, customer_id, name, email, create_time,
                            update_time, version, commit_time
                     FROM customer_events WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
                )?;
                let events = statement
                    .query_map(
                        params![
                            i64::try_from(after.0).unwrap_or(i64::MAX),
                            i64::try_from(limit).unwrap_or(i64::MAX),
                            i64::try_from(published).unwrap_or(i64::MAX)
                        ],
                        |row| {
                            let event_id: String = row.get(1)?;
                            let customer_id: String = row.get(3)?;
                            let code: i64 = row.get(2)?;
                            Ok(Arc::new(CustomerEvent {
                                seq: row.get::<_, i64>(0)?.unsigned_abs(),
                                event_id: parse_uuid(&event_id, 1)?,
                                kind: EventType::from_code(code).ok_or_else(|| {
                                    rusqlite::Error::IntegralValueOutOfRange(2, code)
                                })?,
                                customer: Customer {
                                    id: parse_uuid(&customer_id, 3)?,
                                    name: row.get(4)?,
                                    email: row.get(5)?,
                                    create_time: from_micros(row.get(6)?),
                                    update_time: from_micros(row.get(7)?),
                                    version: row.get(8)?,
                                },
                                commit_time: from_micros(row.get(9)?),
                                rendered: Rendered::default(),
                            }))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(events)
            })
            .await
    }

    async fn prune_events(&self, cutoff: SystemTime) -> Result<u64, Error> {
        let feed = Arc::clone(&self.feed);
        let (deleted, through) = self
            .db
            .write_then(
                move |c| {
                    let through: Option<i64> = c
                        .prepare_cached(
                            "SELECT MAX(seq) FROM customer_events WHERE commit_time < ?1",
                        )?
                        .query_row([to_micros(cutoff)], |r| r.get(0))?;
                    let Some(through) = through else {
                        return Ok::<_, Error>((0, 0));
                    };
                    let deleted = c
                        .prepare_cached("DELETE FROM customer_events WHERE seq <= ?1")?
                        .execute([through])?;
                    c.prepare_cached(
                        "UPDATE change_log SET pruned_through = ?1 WHERE id = 1 AND
                         pruned_through < ?1",
                    )?
                    .execute([through])?;
                    Ok((deleted as u64, through.unsigned_abs()))
                },
                move |&(_, through)| {
                    if through > 0 {
                        feed.pruned(through);
                    }
                },
            )
            .await?;
        if deleted > 0 {
            tracing::info!(deleted, through, "retention deleted old change events");
        }
        Ok(deleted)
    }

    fn bounds(&self) -> Result<LogBounds, Error> {
        Ok(self.feed.bounds())
    }

    fn subscribe(&self) -> Result<watch::Receiver<LogBounds>, Error> {
        Ok(self.feed.subscribe())
    }
}
