//! CRM's domain types: what a customer is, what a valid one looks like, and the change log's
//! events and positions. Nothing here knows about protobuf or SQL.

use std::time::SystemTime;

use uuid::Uuid;

/// Longest customer name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Longest email address accepted, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// A customer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// Server-assigned identifier.
    pub id: Uuid,
    /// Display name, validated by [`Name`].
    pub name: String,
    /// Email address as given, validated by [`Email`].
    pub email: String,
    /// When it was created.
    pub create_time: SystemTime,
    /// When it last changed.
    pub update_time: SystemTime,
    /// Starts at 1; increases with every change.
    pub version: i64,
}

/// A validated display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    /// Trims surrounding white space and checks length and characters.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("must not be empty");
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err("must be at most 200 characters");
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated email address, with its case-insensitive uniqueness key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Trims surrounding white space and checks the address form (`local@domain`).
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let email = raw.trim();
        if email.is_empty() {
            return Err("must not be empty");
        }
        if email.len() > MAX_EMAIL_BYTES {
            return Err("must be at most 254 bytes");
        }
        // The crate follows RFC 5322, which allows forms no mail system delivers to; a domain
        // with a dot and no white space anywhere is what users mean by an address.
        let plausible = email_address::EmailAddress::is_valid(email)
            && !email.chars().any(char::is_whitespace)
            && email
                .rsplit_once('@')
                .is_some_and(|(_, domain)| domain.contains('.') && !domain.starts_with('['));
        if !plausible {
            return Err("is not an email address (expected local@domain.example)");
        }
        Ok(Self(email.to_owned()))
    }

    /// The address as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The uniqueness key: addresses differing only in case are the same customer.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCustomer {
    /// The name.
    pub name: Name,
    /// The email.
    pub email: Email,
    /// The client's idempotency key, if any.
    pub request_id: Option<Uuid>,
}

impl NewCustomer {
    /// What a repeated `request_id` must match to count as the same request.
    pub fn fingerprint(&self) -> String {
        format!("{}\u{1f}{}", self.name.as_str(), self.email.key())
    }
}

/// A validated update: the fields to change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CustomerPatch {
    /// New name, if it changes.
    pub name: Option<Name>,
    /// New email, if it changes.
    pub email: Option<Email>,
    /// The version the change was based on (AIP-154): the store applies it only to that
    /// version, in the same statement that writes it. `None` applies it to any version.
    pub expected_version: Option<i64>,
}

/// What happened to a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Created,
    /// Changed.
    Updated,
    /// Deleted.
    Deleted,
}

impl EventType {
    /// The stored code (stable: it is in every database).
    pub fn code(self) -> i64 {
        match self {
            EventType::Created => 1,
            EventType::Updated => 2,
            EventType::Deleted => 3,
        }
    }

    /// The inverse of [`EventType::code`].
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(EventType::Created),
            2 => Some(EventType::Updated),
            3 => Some(EventType::Deleted),
            _ => None,
        }
    }
}

/// A position in the change log: the sequence number of the last event seen, 0 before any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position(pub u64);

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEvent {
    /// Place in the log: 1, 2, 3, … in commit order, with no gaps.
    pub seq: u64,
    /// Unique id of the event.
    pub event_id: Uuid,
    /// What happened.
    pub kind: EventType,
    /// The customer after the change (before it, for a delete).
    pub customer: Customer,
    /// When the change committed.
    pub commit_time: SystemTime,
    /// The event as watch streams send it, made by the first stream that sends it and shared
    /// by every other: a thousand watchers cost one encoding, not a thousand.
    pub rendered: Rendered,
}

/// A write-once slot for an event's rendered form. The domain never reads it; the gRPC edge
/// fills it. It takes no part in comparisons: two events are equal whatever was rendered.
#[derive(Clone, Default)]
pub struct Rendered(std::sync::OnceLock<bytes::Bytes>);

impl Rendered {
    /// The rendered form, made by `render` the first time.
    pub fn get_or_init(&self, render: impl FnOnce() -> bytes::Bytes) -> bytes::Bytes {
        self.0.get_or_init(render).clone()
    }
}

impl PartialEq for Rendered {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Rendered {}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Rendered"
        } else {
            "NotRendered"
        })
    }
}

/// Where a log is, as the store last committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Random id of this log, fixed when the database is created. Tokens carry it, so a token
    /// from another database is recognised instead of being read as a position in this one.
    pub log_id: u64,
    /// Highest sequence number deleted by retention (0 if none): positions below it cannot be
    /// resumed from.
    pub pruned_through: u64,
    /// Sequence number of the newest committed event (0 if none).
    pub head: u64,
}

/// Where to start reading when a request names no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Oldest event still kept.
    Earliest,
    /// After the newest event.
    Latest,
    /// After this position.
    After(Position),
}

/// A page of the customer listing.
#[derive(Debug, Clone)]
pub struct CustomerPage {
    /// Customers in creation order.
    pub customers: Vec<Customer>,
    /// Creation position of the last customer returned, if the page was full.
    pub next_after: Option<u64>,
    /// Log position at the snapshot.
    pub snapshot: Position,
}

/// A share of the feed: the customers whose partition (see [`mip_runtime::partition::of`]) is
/// one of a set. Every event of one customer is in the same share, so a reader of a share sees
/// each of its customers' changes in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// How many partitions the id space is split into: 1 to
    /// [`mip_runtime::partition::MAX_PARTITIONS`].
    count: u32,
    /// Whether each partition, by number, is wanted; `count` long.
    wanted: Vec<bool>,
}

impl Partitions {
    /// The partitions `wanted` of `count`, or what is wrong with them: each violation as
    /// `(which part, description)`, the count's first.
    pub fn new(count: i32, wanted: &[i32]) -> Result<Self, Vec<(PartitionField, String)>> {
        let max = mip_runtime::partition::MAX_PARTITIONS;
        let count = match u32::try_from(count) {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(vec![(
                    PartitionField::Count,
                    format!("must be from 1 to {max}, got {count}"),
                )]);
            }
        };
        if wanted.is_empty() {
            return Err(vec![(
                PartitionField::Partitions,
                "must name at least one partition".to_owned(),
            )]);
        }
        let mut set = vec![false; count as usize];
        let mut problems = Vec::new();
        for &p in wanted {
            match u32::try_from(p) {
                Ok(n) if n < count => set[n as usize] = true,
                _ => problems.push((
                    PartitionField::Partitions,
                    format!("partition {p} is not from 0 to {}", count - 1),
                )),
            }
        }
        if problems.is_empty() {
            Ok(Self { count, wanted: set })
        } else {
            Err(problems)
        }
    }

    /// Whether the customer `id`'s events are in this share.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.wanted[mip_runtime::partition::of(id, self.count) as usize]
    }
}

/// Which part of a partition filter a violation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionField {
    /// The partition count.
    Count,
    /// The partitions named.
    Partitions,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(Name::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert!(Name::parse("   ").is_err());
        assert!(Name::parse(&"x".repeat(201)).is_err());
        assert!(Name::parse(&"é".repeat(200)).is_ok());
        assert!(Name::parse("a\u{0}b").is_err());
    }

    #[test]
    fn emails_must_look_like_addresses() {
        for good in [
            "ada@example.com",
            "a.b+c@sub.example.org",
            " ADA@Example.COM ",
        ] {
            assert!(Email::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@localhost",
            "a b@example.com",
            "ada@@example.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Email::parse("Ada@Example.com").unwrap().key(),
            "ada@example.com"
        );
    }
}
