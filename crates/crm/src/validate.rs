//! Requests become validated domain values here, once, at the edge: each function returns the
//! domain value or INVALID_ARGUMENT naming every bad field of the request together.
//!
//! Each field is checked on its own into a [`Checked`] value; a request is valid when all of
//! them are, and otherwise every field's violations are reported in field order. The types
//! carry the proof: a handler that has a [`NewCustomer`] or a `Uuid` has a valid one.

use mip_proto::crm::v1 as pb;
use mip_runtime::status::{Violations, field_violations};
use tonic::Status;
use uuid::Uuid;

use crate::domain::{CustomerPatch, Email, Name, NewCustomer, PartitionField, Partitions};
use crate::error::DOMAIN;

/// One field's `(field, description)` violations.
type Problems = Vec<(String, String)>;

/// A field's validated value, or what is wrong with it.
type Checked<T> = Result<T, Problems>;

/// A field checked with `parse`, its error the violation's description.
fn field<T, E: std::fmt::Display>(field: &str, parsed: Result<T, E>) -> Checked<T> {
    parsed.map_err(|e| vec![(field.to_owned(), e.to_string())])
}

/// The violations a [`Violations`] collected, for fields checked with its helpers, so the
/// descriptions are the platform's own.
fn collected(violations: Violations) -> Problems {
    field_violations(&violations.into_status())
}

/// A required UUID field.
fn required_id(name: &str, raw: &str) -> Checked<Uuid> {
    let mut violations = Violations::new(DOMAIN);
    violations
        .id(name, raw)
        .ok_or_else(|| collected(violations))
}

/// An optional UUID field: empty means not set.
fn optional_id(name: &str, raw: &str) -> Checked<Option<Uuid>> {
    let mut violations = Violations::new(DOMAIN);
    match violations.optional_id(name, raw) {
        Some(id) => Ok(Some(id)),
        None if violations.is_empty() => Ok(None),
        None => Err(collected(violations)),
    }
}

/// INVALID_ARGUMENT listing every violation of `fields`, in order.
fn reject(fields: impl IntoIterator<Item = Option<Problems>>) -> Status {
    let mut violations = Violations::new(DOMAIN);
    for (field, description) in fields.into_iter().flatten().flatten() {
        violations.add(field, description);
    }
    violations.into_status()
}

/// A `CreateCustomerRequest`, validated.
pub fn create(request: &pb::CreateCustomerRequest) -> Result<NewCustomer, Status> {
    let name = field("name", Name::parse(&request.name));
    let email = field("email", Email::parse(&request.email));
    let request_id = optional_id("request_id", &request.request_id);
    match (name, email, request_id) {
        (Ok(name), Ok(email), Ok(request_id)) => Ok(NewCustomer {
            name,
            email,
            request_id,
        }),
        (name, email, request_id) => Err(reject([name.err(), email.err(), request_id.err()])),
    }
}

/// The `id` of a Get or Delete request.
pub fn customer_id(raw: &str) -> Result<Uuid, Status> {
    required_id("id", raw).map_err(|problems| reject([Some(problems)]))
}

/// An `UpdateCustomerRequest`, validated: the customer and the fields its mask changes (name
/// and email when the mask is empty).
pub fn update(request: pb::UpdateCustomerRequest) -> Result<(Uuid, CustomerPatch), Status> {
    let Some(customer) = request.customer else {
        return Err(reject([Some(vec![(
            "customer".to_owned(),
            "is required".to_owned(),
        )])]));
    };
    let id = required_id("customer.id", &customer.id);
    let paths: Vec<String> = request
        .update_mask
        .map(|m| m.paths)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| vec!["name".into(), "email".into()]);
    let mut patch = CustomerPatch::default();
    let mut problems = Problems::new();
    match customer.version {
        0 => {}
        v if v < 0 => problems.push((
            "customer.version".to_owned(),
            "must not be negative (0 updates whatever the current version)".to_owned(),
        )),
        v => patch.expected_version = Some(v),
    }
    for path in &paths {
        let checked = match path.as_str() {
            "name" => field("customer.name", Name::parse(&customer.name)).map(|name| {
                patch.name = Some(name);
            }),
            "email" => field("customer.email", Email::parse(&customer.email)).map(|email| {
                patch.email = Some(email);
            }),
            other => Err(vec![(
                "update_mask".to_owned(),
                format!("{other:?} cannot be updated; updatable fields are name and email"),
            )]),
        };
        if let Err(mut more) = checked {
            problems.append(&mut more);
        }
    }
    match id {
        Ok(id) if problems.is_empty() => Ok((id, patch)),
        id => Err(reject([id.err(), Some(problems)])),
    }
}

/// A request's optional `partition_filter`: `None` when unset (every event), its violations
/// recorded under `partition_filter.partition_count` and `partition_filter.partitions`.
pub fn partition_filter(
    violations: &mut Violations,
    filter: Option<&pb::PartitionFilter>,
) -> Option<Partitions> {
    let filter = filter?;
    match Partitions::new(filter.partition_count, &filter.partitions) {
        Ok(partitions) => Some(partitions),
        Err(problems) => {
            for (which, description) in problems {
                let field = match which {
                    PartitionField::Count => "partition_filter.partition_count",
                    PartitionField::Partitions => "partition_filter.partitions",
                };
                violations.add(field, description);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_create_field_is_reported_together_in_field_order() {
        let status = create(&pb::CreateCustomerRequest {
            name: " ".into(),
            email: "nope".into(),
            request_id: "not-a-uuid".into(),
        })
        .unwrap_err();
        let fields: Vec<String> = field_violations(&status)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(fields, ["name", "email", "request_id"]);
    }

    #[test]
    fn a_valid_create_becomes_a_new_customer_with_its_request_id() {
        let request_id = Uuid::new_v4();
        let new = create(&pb::CreateCustomerRequest {
            name: " Ada ".into(),
            email: "ada@example.com".into(),
            request_id: request_id.to_string(),
        })
        .unwrap();
        assert_eq!(new.name.as_str(), "Ada");
        assert_eq!(new.request_id, Some(request_id));
    }

    #[test]
    fn update_reports_the_id_and_each_bad_masked_field() {
        let status = update(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer {
                id: String::new(),
                name: String::new(),
                ..pb::Customer::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into(), "version".into()],
            }),
        })
        .unwrap_err();
        let fields: Vec<String> = field_violations(&status)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(fields, ["customer.id", "customer.name", "update_mask"]);
    }

    fn filter_fields(count: i32, partitions: &[i32]) -> Vec<String> {
        let mut violations = Violations::new(DOMAIN);
        let filter = pb::PartitionFilter {
            partition_count: count,
            partitions: partitions.to_vec(),
        };
        let checked = partition_filter(&mut violations, Some(&filter));
        assert_eq!(checked.is_some(), violations.is_empty());
        field_violations(&violations.into_status())
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    #[test]
    fn a_partition_filter_needs_a_count_in_range_and_partitions_below_it() {
        assert!(filter_fields(1, &[0]).is_empty());
        assert!(filter_fields(4096, &[0, 4095, 7, 7]).is_empty());
        assert_eq!(filter_fields(0, &[0]), ["partition_filter.partition_count"]);
        assert_eq!(
            filter_fields(4097, &[0]),
            ["partition_filter.partition_count"]
        );
        assert_eq!(
            filter_fields(-1, &[0]),
            ["partition_filter.partition_count"]
        );
        assert_eq!(filter_fields(4, &[]), ["partition_filter.partitions"]);
        assert_eq!(
            filter_fields(4, &[4, -1, 2]),
            ["partition_filter.partitions", "partition_filter.partitions"]
        );
        let mut violations = Violations::new(DOMAIN);
        assert_eq!(partition_filter(&mut violations, None), None);
        assert!(violations.is_empty(), "no filter is every event");
    }
}
