//! The gRPC edge of Inventory: requests become validated domain values here, results become
//! protobuf here, and nothing past this module sees either protobuf or SQL.

use std::sync::Arc;

use mip_proto::inventory::v1 as pb;
use mip_proto::timestamp;
use mip_runtime::batch;
use mip_runtime::clock::SharedClock;
use mip_runtime::status::{Violations, field_violations, reason};
use mip_runtime::token;
use tonic::{Request, Response, Status};
use tracing::{debug, info};
use uuid::Uuid;

use crate::domain::{Created, NewPackageRequest, PackageRequest, PackageStatus, PackageType};
use crate::error::DOMAIN;
use crate::store::InventoryStore;

/// Token kind of `ListPackageRequests` page tokens: `[filter_fingerprint, after_seq]`. Kinds 1
/// and 2 are CRM's, so a CRM token pasted here is recognised as one.
const PACKAGE_PAGE_TOKEN: u8 = 3;

/// The `inventory.v1.InventoryService` implementation, over any store: a backend type, or
/// `dyn InventoryStore` as [`crate::store::open`] hands it out.
pub struct InventoryApi<S: ?Sized> {
    /// Package requests.
    store: Arc<S>,
    /// Where timestamps come from.
    clock: SharedClock,
}

// By hand: a derive would ask for `S: Clone`, which a `dyn InventoryStore` is not, though only
// the `Arc` is cloned.
impl<S: ?Sized> Clone for InventoryApi<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
        }
    }
}

impl<S: InventoryStore + ?Sized> InventoryApi<S> {
    /// A service over `store`.
    pub fn new(store: Arc<S>, clock: SharedClock) -> Self {
        Self { store, clock }
    }
}

fn status_from_proto(raw: i32) -> Result<PackageStatus, String> {
    match pb::PackageStatus::try_from(raw) {
        Ok(pb::PackageStatus::Pending) => Ok(PackageStatus::Pending),
        Ok(pb::PackageStatus::Shipped) => Ok(PackageStatus::Shipped),
        Ok(pb::PackageStatus::Delivered) => Ok(PackageStatus::Delivered),
        Ok(pb::PackageStatus::Cancelled) => Ok(PackageStatus::Cancelled),
        Ok(pb::PackageStatus::Unspecified) => Err(
            "is required: one of PACKAGE_STATUS_PENDING, PACKAGE_STATUS_SHIPPED, PACKAGE_STATUS_DELIVERED, PACKAGE_STATUS_CANCELLED"
                .to_owned(),
        ),
        Err(_) => Err(format!("unknown value {raw}")),
    }
}

fn status_to_proto(status: PackageStatus) -> pb::PackageStatus {
    match status {
        PackageStatus::Pending => pb::PackageStatus::Pending,
        PackageStatus::Shipped => pb::PackageStatus::Shipped,
        PackageStatus::Delivered => pb::PackageStatus::Delivered,
        PackageStatus::Cancelled => pb::PackageStatus::Cancelled,
    }
}

fn package_request_to_proto(request: &PackageRequest) -> pb::PackageRequest {
    pb::PackageRequest {
        id: request.id.to_string(),
        customer_id: request.customer_id.to_string(),
        package_type: request.package_type.clone(),
        status: status_to_proto(request.status).into(),
        create_time: Some(timestamp(request.create_time)),
        update_time: Some(timestamp(request.update_time)),
        request_id: request
            .request_id
            .map(|r| r.to_string())
            .unwrap_or_default(),
        replayed: false,
    }
}

/// What a page token is bound to: the customer filter, canonicalised so that the same filter
/// spelled in upper case still matches.
fn filter_fingerprint(customer_id: Option<Uuid>) -> u64 {
    let filter = customer_id.map(|c| c.to_string()).unwrap_or_default();
    token::fingerprint(&[&filter])
}

/// Most requests in one `BatchCreatePackageRequests` call.
pub const MAX_BATCH: usize = 1000;

/// The value every field check produced, or INVALID_ARGUMENT naming every bad field. A check
/// that fails records a violation and yields nothing, so "all present and nothing recorded" is
/// the one way to a value.
fn validated<T>(violations: Violations, value: Option<T>) -> Result<T, Status> {
    match value {
        Some(value) if violations.is_empty() => Ok(value),
        _ => Err(violations.into_status()),
    }
}

impl TryFrom<&pb::CreatePackageRequestRequest> for NewPackageRequest {
    type Error = Status;

    /// Every bad field named at once.
    fn try_from(request: &pb::CreatePackageRequestRequest) -> Result<Self, Status> {
        let mut violations = Violations::new(DOMAIN);
        let customer_id = violations.id("customer_id", &request.customer_id);
        let package_type =
            violations.check("package_type", PackageType::parse(&request.package_type));
        let request_id = violations.optional_id("request_id", &request.request_id);
        let new = customer_id
            .zip(package_type)
            .map(|(customer_id, package_type)| NewPackageRequest {
                customer_id,
                package_type,
                request_id,
            });
        validated(violations, new)
    }
}

/// A validated `GetPackageRequestRequest`: the id to read.
fn check_get(request: &pb::GetPackageRequestRequest) -> Result<Uuid, Status> {
    let mut violations = Violations::new(DOMAIN);
    let id = violations.id("id", &request.id);
    validated(violations, id)
}

/// A validated `UpdatePackageRequestStatusRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusUpdate {
    /// The package request to move.
    id: Uuid,
    /// Where to move it.
    status: PackageStatus,
}

impl TryFrom<&pb::UpdatePackageRequestStatusRequest> for StatusUpdate {
    type Error = Status;

    /// Both bad fields named at once.
    fn try_from(request: &pb::UpdatePackageRequestStatusRequest) -> Result<Self, Status> {
        let mut violations = Violations::new(DOMAIN);
        let id = violations.id("id", &request.id);
        let status = violations.check("status", status_from_proto(request.status));
        let update = id
            .zip(status)
            .map(|(id, status)| StatusUpdate { id, status });
        validated(violations, update)
    }
}

/// A created (or replayed) package request, logged and converted for the response.
fn created_to_proto(created: &Created) -> pb::PackageRequest {
    let package_request = &created.package_request;
    debug!(
        customer_id = %package_request.customer_id,
        package_request_id = %package_request.id,
        package_type = %package_request.package_type,
        replayed = created.replayed,
        "package request created"
    );
    pb::PackageRequest {
        replayed: created.replayed,
        ..package_request_to_proto(package_request)
    }
}

/// A failed create, as one result of a batch.
fn batch_item_error(status: &Status) -> pb::BatchItemError {
    pb::BatchItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        field_violations: field_violations(status)
            .into_iter()
            .map(|(field, description)| pb::FieldViolation { field, description })
            .collect(),
        reason: reason(status).unwrap_or_default(),
    }
}

impl<S: InventoryStore + ?Sized> InventoryApi<S> {
    /// Validates and creates one package request: `CreatePackageRequest`.
    async fn create(
        &self,
        request: pb::CreatePackageRequestRequest,
    ) -> Result<pb::PackageRequest, Status> {
        let new = NewPackageRequest::try_from(&request)?;
        let created = self
            .store
            .create_package_request(new, self.clock.now())
            .await?;
        Ok(created_to_proto(&created))
    }
}

#[tonic::async_trait]
impl<S: InventoryStore + ?Sized> pb::inventory_service_server::InventoryService
    for InventoryApi<S>
{
    async fn create_package_request(
        &self,
        request: Request<pb::CreatePackageRequestRequest>,
    ) -> Result<Response<pb::PackageRequest>, Status> {
        let created = self.create(request.into_inner()).await?;
        Ok(Response::new(created))
    }

    async fn batch_create_package_requests(
        &self,
        request: Request<pb::BatchCreatePackageRequestsRequest>,
    ) -> Result<Response<pb::BatchCreatePackageRequestsResponse>, Status> {
        let requests = request.into_inner().requests;
        batch::check_size(DOMAIN, requests.len(), MAX_BATCH)?;
        // Every valid request goes to the store in one write, in request order: one commit.
        // Each checks before it writes, so one refused leaves the others.
        let checked = requests.iter().map(NewPackageRequest::try_from).collect();
        let now = self.clock.now();
        let results = batch::create_valid(checked, |valid| {
            self.store.create_package_requests(valid, now)
        })
        .await?
        .into_iter()
        .map(|result| pb::CreatePackageRequestResult {
            result: Some(match result {
                Ok(created) => pb::create_package_request_result::Result::PackageRequest(
                    created_to_proto(&created),
                ),
                Err(status) => {
                    pb::create_package_request_result::Result::Error(batch_item_error(&status))
                }
            }),
        })
        .collect();
        Ok(Response::new(pb::BatchCreatePackageRequestsResponse {
            results,
        }))
    }

    async fn get_package_request(
        &self,
        request: Request<pb::GetPackageRequestRequest>,
    ) -> Result<Response<pb::PackageRequest>, Status> {
        let id = check_get(request.get_ref())?;
        let package_request = self.store.get_package_request(id).await?;
        Ok(Response::new(package_request_to_proto(&package_request)))
    }

    async fn list_package_requests(
        &self,
        request: Request<pb::ListPackageRequestsRequest>,
    ) -> Result<Response<pb::ListPackageRequestsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new(DOMAIN);
        let customer_id = violations.optional_id("customer_id", &request.customer_id);
        let filter_valid = request.customer_id.is_empty() || customer_id.is_some();
        let limit = violations.page_size(request.page_size);
        let filter = filter_fingerprint(customer_id);
        let mut after = 0;
        if !request.page_token.is_empty() {
            match token::decode::<2>(PACKAGE_PAGE_TOKEN, &request.page_token) {
                Ok([fingerprint, token_after]) if fingerprint == filter => after = token_after,
                // An invalid filter is already reported; comparing against it would add a
                // second, misleading violation.
                Ok(_) if !filter_valid => {}
                Ok(_) => violations.add(
                    "page_token",
                    "was issued for a different customer_id filter; pass the same customer_id as the first page, or start again without a page_token",
                ),
                Err(e) => violations.token("page_token", e),
            }
        }
        violations.finish()?;
        let page = self
            .store
            .list_package_requests(customer_id, after, limit)
            .await?;
        Ok(Response::new(pb::ListPackageRequestsResponse {
            package_requests: page
                .package_requests
                .iter()
                .map(package_request_to_proto)
                .collect(),
            next_page_token: page
                .next_after
                .map(|after| token::encode(PACKAGE_PAGE_TOKEN, &[filter, after]))
                .unwrap_or_default(),
        }))
    }

    async fn update_package_request_status(
        &self,
        request: Request<pb::UpdatePackageRequestStatusRequest>,
    ) -> Result<Response<pb::PackageRequest>, Status> {
        let StatusUpdate { id, status } = StatusUpdate::try_from(request.get_ref())?;
        let change = self
            .store
            .update_status(id, status, self.clock.now())
            .await?;
        let package_request = change.package_request;
        if change.previous != package_request.status {
            info!(
                customer_id = %package_request.customer_id,
                package_request_id = %package_request.id,
                from = %change.previous,
                to = %package_request.status,
                "package request status changed"
            );
        }
        Ok(Response::new(package_request_to_proto(&package_request)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_but_unspecified_is_accepted() {
        for status in [
            PackageStatus::Pending,
            PackageStatus::Shipped,
            PackageStatus::Delivered,
            PackageStatus::Cancelled,
        ] {
            assert_eq!(
                status_from_proto(status_to_proto(status).into()),
                Ok(status)
            );
        }
        assert!(status_from_proto(0).is_err());
        assert_eq!(status_from_proto(99), Err("unknown value 99".to_owned()));
    }

    #[test]
    fn filter_fingerprint_ignores_uuid_spelling() {
        let id = Uuid::now_v7();
        let upper = Uuid::try_parse(&id.to_string().to_uppercase()).unwrap();
        assert_eq!(
            filter_fingerprint(Some(id)),
            filter_fingerprint(Some(upper))
        );
        assert_ne!(filter_fingerprint(Some(id)), filter_fingerprint(None));
    }
}
