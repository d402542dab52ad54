//! What the batch create methods (`BatchCreateCustomers`, `BatchCreatePackageRequests`) do the
//! same way: refuse a batch of the wrong size, and create its valid requests together while
//! answering every request, in order, with its own refusal or its own result.

use std::future::Future;

use tonic::Status;

use crate::status::invalid_field;

/// INVALID_ARGUMENT on `requests` (in the caller's error `domain`) unless the batch holds 1
/// to `max` requests.
pub fn check_size(domain: &'static str, len: usize, max: usize) -> Result<(), Status> {
    if len == 0 || len > max {
        return Err(invalid_field(
            domain,
            "requests",
            format!("must hold 1 to {max} requests, not {len}"),
        ));
    }
    Ok(())
}

/// Creates the valid requests of a batch with one call of `create`, in request order, and
/// answers every request in order: its own refusal from `checked`, or what `create` gave for
/// it. `create` is not called when no request is valid; its own error is the whole batch's.
pub async fn create_valid<V, R, E, F, Fut>(
    checked: Vec<Result<V, Status>>,
    create: F,
) -> Result<Vec<Result<R, Status>>, Status>
where
    F: FnOnce(Vec<V>) -> Fut,
    Fut: Future<Output = Result<Vec<Result<R, E>>, E>>,
    Status: From<E>,
{
    let mut valid = Vec::with_capacity(checked.len());
    let refusals: Vec<Option<Status>> = checked
        .into_iter()
        .map(|checked| match checked {
            Ok(request) => {
                valid.push(request);
                None
            }
            Err(status) => Some(status),
        })
        .collect();
    let mut created = if valid.is_empty() {
        Vec::new()
    } else {
        create(valid).await?
    }
    .into_iter();
    Ok(refusals
        .into_iter()
        .map(|refusal| match refusal {
            Some(status) => Err(status),
            None => created
                .next()
                .expect("one result per valid request")
                .map_err(Status::from),
        })
        .collect())
}
