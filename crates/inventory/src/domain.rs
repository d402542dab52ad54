//! Inventory's domain types: what a package request is, what a valid one looks like, and how
//! its status may move. Nothing here knows about protobuf or SQL.

use std::fmt;
use std::time::SystemTime;

use uuid::Uuid;

/// Longest package type accepted, in characters.
pub const MAX_PACKAGE_TYPE_CHARS: usize = 64;

/// A package request as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRequest {
    /// Server-assigned identifier.
    pub id: Uuid,
    /// The customer the package is for.
    pub customer_id: Uuid,
    /// What to ship, validated by [`PackageType`].
    pub package_type: String,
    /// Where the request is in its life.
    pub status: PackageStatus,
    /// When it was created.
    pub create_time: SystemTime,
    /// When its status last changed (its creation time until then).
    pub update_time: SystemTime,
    /// The idempotency key it was created with, echoed back so clients can match retries.
    pub request_id: Option<Uuid>,
}

impl PackageRequest {
    /// The request after setting its status to `to` at `now`. Setting the current status again
    /// returns it unchanged (update time included), so a client retrying a move that already
    /// happened gets the same answer instead of an error.
    pub fn with_status(&self, to: PackageStatus, now: SystemTime) -> Result<Self, IllegalMove> {
        if self.status == to {
            return Ok(self.clone());
        }
        if !self.status.can_move_to(to) {
            return Err(IllegalMove {
                from: self.status,
                to,
            });
        }
        Ok(Self {
            status: to,
            update_time: now,
            ..self.clone()
        })
    }
}

/// Where a package request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackageStatus {
    /// Recorded, not shipped yet. Every package request starts here.
    Pending,
    /// Handed to the carrier.
    Shipped,
    /// Received by the customer. Final.
    Delivered,
    /// Withdrawn before shipping. Final.
    Cancelled,
}

/// Every status change allowed, as `(from, to)`: the one place the life cycle is written down.
pub const ALLOWED_MOVES: [(PackageStatus, PackageStatus); 3] = [
    (PackageStatus::Pending, PackageStatus::Shipped),
    (PackageStatus::Shipped, PackageStatus::Delivered),
    (PackageStatus::Pending, PackageStatus::Cancelled),
];

impl PackageStatus {
    /// Whether moving from this status to a different one `to` is allowed.
    pub fn can_move_to(self, to: PackageStatus) -> bool {
        ALLOWED_MOVES.contains(&(self, to))
    }

    /// The stored code (stable: it is in every database). Equal to the protobuf enum numbers,
    /// so a database read by hand means what the API says.
    pub fn code(self) -> i64 {
        match self {
            PackageStatus::Pending => 1,
            PackageStatus::Shipped => 2,
            PackageStatus::Delivered => 3,
            PackageStatus::Cancelled => 4,
        }
    }

    /// The inverse of [`PackageStatus::code`].
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(PackageStatus::Pending),
            2 => Some(PackageStatus::Shipped),
            3 => Some(PackageStatus::Delivered),
            4 => Some(PackageStatus::Cancelled),
            _ => None,
        }
    }

    /// The name used in messages, as in the API documentation.
    pub fn name(self) -> &'static str {
        match self {
            PackageStatus::Pending => "PENDING",
            PackageStatus::Shipped => "SHIPPED",
            PackageStatus::Delivered => "DELIVERED",
            PackageStatus::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for PackageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The allowed moves in words (`PENDING to SHIPPED, …`), so error messages tell the client
/// what it could have done instead.
pub fn allowed_moves_text() -> String {
    ALLOWED_MOVES
        .iter()
        .map(|(from, to)| format!("{from} to {to}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A status change the life cycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IllegalMove {
    /// The current status.
    pub from: PackageStatus,
    /// The status asked for.
    pub to: PackageStatus,
}

/// A validated package type, such as `welcome_package`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageType(String);

impl PackageType {
    /// Checks length and characters. Nothing is trimmed or lower-cased: a package type is an
    /// identifier other systems match exactly, so a near miss is refused rather than guessed.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("is required");
        }
        if raw.chars().count() > MAX_PACKAGE_TYPE_CHARS {
            return Err("must be at most 64 characters");
        }
        if !raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(
                "must contain only lower-case letters, digits and _ (for example welcome_package)",
            );
        }
        Ok(Self(raw.to_owned()))
    }

    /// The package type.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPackageRequest {
    /// The customer the package is for.
    pub customer_id: Uuid,
    /// What to ship.
    pub package_type: PackageType,
    /// The client's idempotency key, if any.
    pub request_id: Option<Uuid>,
}

impl NewPackageRequest {
    /// What a repeated `request_id` must match to count as the same request.
    pub fn fingerprint(&self) -> String {
        format!("{}\u{1f}{}", self.customer_id, self.package_type.as_str())
    }
}

/// What a create did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The package request, new or the one the `request_id` created before.
    pub package_request: PackageRequest,
    /// Whether this was a retry answered with the original, so nothing new was created.
    pub replayed: bool,
}

/// What a status update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The package request after the update.
    pub package_request: PackageRequest,
    /// Its status before; equal to the current one when the update was a no-op.
    pub previous: PackageStatus,
}

/// A page of the package request listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRequestPage {
    /// Package requests in creation order.
    pub package_requests: Vec<PackageRequest>,
    /// Creation position of the last one returned, when more follow.
    pub next_after: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(status: PackageStatus) -> PackageRequest {
        PackageRequest {
            id: Uuid::now_v7(),
            customer_id: Uuid::now_v7(),
            package_type: "welcome_package".into(),
            status,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            request_id: None,
        }
    }

    #[test]
    fn package_types_are_short_lower_case_identifiers() {
        for good in ["welcome_package", "a", "box_2", "_", &"x".repeat(64)] {
            assert_eq!(PackageType::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "Welcome",
            "welcome-package",
            "welcome package",
            " welcome",
            "café",
            &"x".repeat(65),
        ] {
            assert!(PackageType::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allowed_moves_change_status_and_update_time() {
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(60);
        for (from, to) in ALLOWED_MOVES {
            let moved = request(from).with_status(to, later).unwrap();
            assert_eq!(moved.status, to);
            assert_eq!(moved.update_time, later);
        }
    }

    #[test]
    fn setting_the_current_status_again_changes_nothing() {
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(60);
        for status in [
            PackageStatus::Pending,
            PackageStatus::Shipped,
            PackageStatus::Delivered,
            PackageStatus::Cancelled,
        ] {
            let before = request(status);
            assert_eq!(before.with_status(status, later).unwrap(), before);
        }
    }

    #[test]
    fn every_other_move_is_illegal() {
        use PackageStatus::*;
        for (from, to) in [
            (Pending, Delivered),
            (Shipped, Pending),
            (Shipped, Cancelled),
            (Delivered, Pending),
            (Delivered, Shipped),
            (Delivered, Cancelled),
            (Cancelled, Pending),
            (Cancelled, Shipped),
            (Cancelled, Delivered),
        ] {
            assert_eq!(
                request(from).with_status(to, SystemTime::now()),
                Err(IllegalMove { from, to }),
                "{from} to {to}"
            );
        }
    }

    #[test]
    fn status_codes_round_trip() {
        for status in [
            PackageStatus::Pending,
            PackageStatus::Shipped,
            PackageStatus::Delivered,
            PackageStatus::Cancelled,
        ] {
            assert_eq!(PackageStatus::from_code(status.code()), Some(status));
        }
        assert_eq!(PackageStatus::from_code(0), None);
    }

    #[test]
    fn fingerprint_separates_customer_and_package_type() {
        let customer_id = Uuid::now_v7();
        let new = |package_type: &str| NewPackageRequest {
            customer_id,
            package_type: PackageType::parse(package_type).unwrap(),
            request_id: Some(Uuid::now_v7()),
        };
        // The request_id is the key, not part of what must match.
        assert_eq!(new("box").fingerprint(), new("box").fingerprint());
        assert_ne!(new("box").fingerprint(), new("box_2").fingerprint());
    }

    #[test]
    fn allowed_moves_are_spelled_out() {
        assert_eq!(
            allowed_moves_text(),
            "PENDING to SHIPPED, SHIPPED to DELIVERED, PENDING to CANCELLED"
        );
    }
}
