//! The admin API (`integration.v1.IntegrationService`): status, and the dead-letter list.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mip_proto::integration::v1 as pb;
use mip_proto::timestamp;
use mip_runtime::status::Violations;
use mip_runtime::token;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::deliver::Action;
use crate::engine::{Handled, Handler};
use crate::error::{DOMAIN, Error};
use crate::lease::Leases;
use crate::store::IntegrationStore;
use crate::{FeedState, Stats};

/// Token kind of `ListDeadLetters` page tokens: `[after_id]`.
const DEAD_LETTER_PAGE_TOKEN: u8 = 4;

/// The admin API over the engine's shared state.
pub struct IntegrationApi<S: ?Sized> {
    /// Delivers re-driven dead letters and records their outcome.
    handler: Handler<S>,
    /// Counters and feed state.
    stats: Arc<Stats>,
    /// This worker's partitions, and the cluster's workers.
    leases: Arc<Leases>,
    /// `auto`, `stream` or `poll`, as configured.
    configured_mode: String,
}

impl<S: IntegrationStore + ?Sized> IntegrationApi<S> {
    /// An admin API.
    pub fn new(
        handler: Handler<S>,
        stats: Arc<Stats>,
        leases: Arc<Leases>,
        configured_mode: String,
    ) -> Self {
        Self {
            handler,
            stats,
            leases,
            configured_mode,
        }
    }
}

#[tonic::async_trait]
impl<S: IntegrationStore + ?Sized> pb::integration_service_server::IntegrationService
    for IntegrationApi<S>
{
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let stats = &self.stats;
        let (checkpoint, checkpoint_sequence) = stats.checkpoint();
        let pending = self.handler.store.count_dead_letters().await?;
        let workers = self.leases.workers().await?;
        let head = stats.head_seen();
        let partitions = self
            .leases
            .view()
            .into_iter()
            .map(|p| pb::PartitionStatus {
                partition: i32::try_from(p.partition).unwrap_or(i32::MAX),
                checkpoint_sequence: p.checkpoint_sequence,
                epoch: p.epoch,
                lease_expire_time: Some(timestamp(p.expire_time)),
                lag_events: (head - p.checkpoint_sequence).max(0),
            })
            .collect();
        Ok(Response::new(pb::GetStatusResponse {
            mode: match stats.mode() {
                Some(FeedState::Stream) => pb::FeedMode::Stream,
                Some(FeedState::Poll) => pb::FeedMode::Poll,
                None => pb::FeedMode::Unspecified,
            }
            .into(),
            stream_connected: stats.stream_connected.load(Ordering::Relaxed),
            checkpoint,
            checkpoint_sequence,
            lag_events: stats.lag(),
            delivered: count(stats.delivered.load(Ordering::Relaxed)),
            retried: count(stats.retried.load(Ordering::Relaxed)),
            dead_lettered: count(stats.dead_lettered.load(Ordering::Relaxed)),
            mode_switches: count(stats.mode_switches.load(Ordering::Relaxed)),
            dead_letters_pending: count(pending),
            configured_mode: self.configured_mode.clone(),
            worker_id: self.leases.worker_id().to_owned(),
            partition_count: i32::try_from(self.leases.partition_count()).unwrap_or(i32::MAX),
            partitions,
            workers: workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker_id,
                    last_heartbeat_time: Some(timestamp(w.last_heartbeat)),
                    partitions_owned: i32::try_from(w.partitions).unwrap_or(i32::MAX),
                })
                .collect(),
            checkpoint_writes_fenced: count(stats.checkpoint_fenced.load(Ordering::Relaxed)),
            cancelled: count(stats.cancelled.load(Ordering::Relaxed)),
            cancel_left_as_is: count(stats.left_as_is.load(Ordering::Relaxed)),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new(DOMAIN);
        let limit = violations.page_size(request.page_size);
        let mut after = 0i64;
        if !request.page_token.is_empty() {
            match token::decode::<1>(DEAD_LETTER_PAGE_TOKEN, &request.page_token) {
                Ok([id]) => after = i64::try_from(id).unwrap_or(i64::MAX),
                Err(_) => violations.add(
                    "page_token",
                    "is malformed; pass next_page_token exactly as returned",
                ),
            }
        }
        violations.finish()?;
        let rows = self.handler.store.dead_letters(after, limit).await?;
        let next_page_token = match rows.last() {
            Some((id, _)) if rows.len() == limit => {
                token::encode(DEAD_LETTER_PAGE_TOKEN, &[id.unsigned_abs()])
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: rows
                .into_iter()
                .map(|(_, letter)| pb::DeadLetter {
                    event_id: letter.event_id,
                    customer_id: letter.customer_id,
                    reason: letter.reason,
                    attempts: i32::try_from(letter.attempts).unwrap_or(i32::MAX),
                    create_time: Some(timestamp(letter.create_time)),
                    update_time: Some(timestamp(letter.update_time)),
                    action: match letter.action {
                        Action::Create => pb::DeadLetterAction::Create,
                        Action::Cancel => pb::DeadLetterAction::Cancel,
                    }
                    .into(),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn retry_dead_letters(
        &self,
        request: Request<pb::RetryDeadLettersRequest>,
    ) -> Result<Response<pb::RetryDeadLettersResponse>, Status> {
        let wanted = request.into_inner().event_ids;
        if wanted.iter().any(String::is_empty) {
            return Err(Error::InvalidField {
                field: "event_ids",
                reason: "must not contain empty ids".into(),
            }
            .into());
        }
        let mut delivered = 0;
        let mut still_failing = 0;
        let mut after = 0;
        loop {
            let rows = self.handler.store.dead_letters(after, 500).await?;
            let Some((last, _)) = rows.last() else { break };
            after = *last;
            for (_, letter) in rows {
                if !wanted.is_empty() && !wanted.contains(&letter.event_id) {
                    continue;
                }
                let handled = self
                    .handler
                    .handle(&letter.event_id, &letter.customer_id, letter.action, None)
                    .await;
                if handled == Handled::Unfinished {
                    return Err(Error::ShuttingDown.into());
                }
                if handled == Handled::Delivered {
                    self.handler
                        .store
                        .remove_dead_letter(&letter.event_id)
                        .await?;
                    delivered += 1;
                    info!(customer_id = %letter.customer_id, event_id = %letter.event_id, action = letter.action.as_str(), "dead letter re-driven");
                } else {
                    still_failing += 1;
                }
            }
        }
        Ok(Response::new(pb::RetryDeadLettersResponse {
            delivered,
            still_failing,
        }))
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
