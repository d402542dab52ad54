//! Splitting CRM's feed between workers that share one database: leases on partitions, with
//! fencing epochs.
//!
//! The customer-id space is cut into `--partitions` P partitions (`mip_runtime::partition`);
//! P is recorded on first start and never changes. Each partition row holds its owner (a
//! worker id, random per process start, or none), an **epoch** that rises at every hand-over,
//! a lease expiry, and the partition's checkpoint. Each worker row holds a last heartbeat.
//!
//! Every `--lease-ttl`/3 a worker runs one round ([`Leases::round`]):
//! 1. heartbeat;
//! 2. renew its leases, only where it is still the owner at the epoch it took them at; a
//!    lease not renewed was taken over, and is dropped;
//! 3. count the live workers (a heartbeat within the TTL) and take its fair share
//!    ceil(P / live): unowned or expired partitions, bumping their epoch (`FOR UPDATE SKIP
//!    LOCKED` on PostgreSQL); above its share, it marks the excess as releasing, and the
//!    engine gives them up once it has saved their checkpoint.
//!
//! Checkpoint writes carry the epoch (`owner = me AND epoch = mine AND sequence < new`). A
//! refused write means the lease was lost, perhaps while this process was paused: the
//! partition is dropped at once and the refusal counted
//! (`mip_integration_checkpoint_fenced_total`). Whatever the stale worker still delivers is
//! harmless, because the idempotency key is a function of the customer id alone.
//!
//! Any change to the set of partitions a worker follows bumps a generation counter; the engine
//! watches it and restarts its stream with the new filter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mip_runtime::CancellationToken;
use mip_runtime::clock::SharedClock;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Stats;
use crate::error::Error;
use crate::store::{IntegrationStore, Lease, Move, Worker};
use crate::tracker::Mark;

/// Default of `--partitions`.
pub const DEFAULT_PARTITIONS: u32 = 64;

/// Stops a worker's lease rounds while set, as a stalled process would stop them: the worker
/// keeps delivering and writing checkpoints with the epochs it had. Only tests set it, to
/// show that such a worker is fenced.
#[derive(Debug, Clone, Default)]
pub struct LeasePause(Arc<AtomicBool>);

impl LeasePause {
    /// Stops the lease rounds.
    pub fn pause(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Lets the lease rounds run again.
    pub fn resume(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    fn is_paused(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A partition this worker holds.
#[derive(Debug, Clone)]
struct Held {
    /// The epoch it was taken at.
    epoch: i64,
    /// When the lease runs out unless renewed.
    expire_time: SystemTime,
    /// The newest checkpoint saved (or found) for it.
    checkpoint: Option<Mark>,
    /// Above the fair share: to be given up once its checkpoint is saved.
    releasing: bool,
}

/// A partition this worker follows, as the engine starts a stream for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The partition.
    pub partition: u32,
    /// Its lease's epoch.
    pub epoch: i64,
    /// Its checkpoint.
    pub checkpoint: Option<Mark>,
}

/// One held partition, for the admin API.
#[derive(Debug, Clone)]
pub struct PartitionView {
    /// The partition.
    pub partition: u32,
    /// Its lease's epoch.
    pub epoch: i64,
    /// When the lease runs out unless renewed.
    pub expire_time: SystemTime,
    /// Its checkpoint's sequence (0 before the first).
    pub checkpoint_sequence: i64,
}

/// This worker's leases, shared by the lease loop, the engine and the admin API.
pub struct Leases {
    /// This worker's name (`--worker-id`).
    worker_id: String,
    /// Whether the first round has taken back what the previous process under this name
    /// still held.
    reclaimed: AtomicBool,
    /// P.
    partition_count: u32,
    /// How long a lease lasts without renewal.
    ttl: Duration,
    /// Where leases live.
    store: Arc<dyn IntegrationStore>,
    /// Time for SQLite's leases (PostgreSQL uses its own clock).
    clock: SharedClock,
    /// What this worker holds.
    held: Mutex<BTreeMap<u32, Held>>,
    /// Bumped whenever the set of partitions to follow changes.
    changed: watch::Sender<u64>,
    /// Counters and the lowest checkpoint, for status.
    stats: Arc<Stats>,
    /// Test hook: stops the rounds.
    pause: LeasePause,
}

impl Leases {
    /// Leases of a new worker, holding nothing yet.
    pub fn new(
        worker_id: String,
        store: Arc<dyn IntegrationStore>,
        partition_count: u32,
        ttl: Duration,
        clock: SharedClock,
        stats: Arc<Stats>,
        pause: LeasePause,
    ) -> Self {
        Self {
            worker_id,
            reclaimed: AtomicBool::new(false),
            partition_count: partition_count.max(1),
            ttl,
            store,
            clock,
            held: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            stats,
            pause,
        }
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// P.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// Fires whenever the partitions to follow change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// The partitions to follow: held and not being given up.
    pub fn active(&self) -> Vec<Owned> {
        self.lock()
            .iter()
            .filter(|(_, h)| !h.releasing)
            .map(|(&partition, h)| Owned {
                partition,
                epoch: h.epoch,
                checkpoint: h.checkpoint.clone(),
            })
            .collect()
    }

    /// Every held partition, for status.
    pub fn view(&self) -> Vec<PartitionView> {
        self.lock()
            .iter()
            .map(|(&partition, h)| PartitionView {
                partition,
                epoch: h.epoch,
                expire_time: h.expire_time,
                checkpoint_sequence: h.checkpoint.as_ref().map_or(0, |m| m.sequence),
            })
            .collect()
    }

    /// The cluster's live workers.
    pub async fn workers(&self) -> Result<Vec<Worker>, Error> {
        self.store.live_workers(self.ttl, self.clock.now()).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Held>> {
        self.held.lock().expect("leases lock")
    }

    /// Publishes the lowest held checkpoint as the worker's checkpoint.
    fn publish_lowest(&self) {
        let lowest = self
            .lock()
            .values()
            .map(|h| {
                h.checkpoint.clone().unwrap_or(Mark {
                    sequence: 0,
                    token: String::new(),
                })
            })
            .min_by_key(|m| m.sequence);
        self.stats.set_checkpoint(lowest);
    }

    /// Saves `mark` as the checkpoint of `covered` (partitions and the epochs a stream followed
    /// them at), where this worker still holds them at those epochs. A refusal drops the
    /// partition and is counted.
    pub async fn save(&self, covered: &[(u32, i64)], mark: &Mark, how: Move) -> Result<(), Error> {
        let still: Vec<(u32, i64)> = {
            let held = self.lock();
            covered
                .iter()
                .copied()
                .filter(|(p, e)| held.get(p).is_some_and(|h| h.epoch == *e))
                .collect()
        };
        if still.is_empty() {
            return Ok(());
        }
        let fenced = self
            .store
            .save_checkpoints(&self.worker_id, &still, mark, how, self.clock.now())
            .await?;
        {
            let mut held = self.lock();
            for (partition, epoch) in &still {
                if fenced.contains(partition) {
                    continue;
                }
                if let Some(h) = held.get_mut(partition).filter(|h| h.epoch == *epoch)
                    && (how == Move::Replace
                        || h.checkpoint
                            .as_ref()
                            .is_none_or(|c| c.sequence < mark.sequence))
                {
                    h.checkpoint = Some(mark.clone());
                }
            }
            for partition in &fenced {
                held.remove(partition);
            }
        }
        if !fenced.is_empty() {
            warn!(
                partitions = ?fenced,
                "checkpoint write refused: another worker took these partitions over; dropping them"
            );
            self.stats.count_fenced(fenced.len() as u64);
            self.bump();
        }
        self.publish_lowest();
        Ok(())
    }

    /// Gives up the partitions marked as releasing (their checkpoints are saved by now).
    pub async fn release_pending(&self) -> Result<(), Error> {
        let releasing: Vec<(u32, i64)> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.releasing)
            .map(|(&p, h)| (p, h.epoch))
            .collect();
        if releasing.is_empty() {
            return Ok(());
        }
        self.store.release(&self.worker_id, &releasing).await?;
        let mut held = self.lock();
        for (partition, epoch) in &releasing {
            // Only the lease that was released: a round may have taken the partition again
            // meanwhile, at a new epoch.
            if held
                .get(partition)
                .is_some_and(|h| h.releasing && h.epoch == *epoch)
            {
                held.remove(partition);
            }
        }
        drop(held);
        info!(
            count = releasing.len(),
            "gave up partitions above the fair share"
        );
        self.publish_lowest();
        Ok(())
    }

    /// One lease round: heartbeat, renew, then take or give up partitions towards the fair
    /// share. Does nothing while paused.
    pub async fn round(&self) -> Result<(), Error> {
        if self.pause.is_paused() {
            return Ok(());
        }
        let now = self.clock.now();
        self.store.heartbeat(&self.worker_id, now).await?;
        let mine: Vec<(u32, i64)> = self.lock().iter().map(|(&p, h)| (p, h.epoch)).collect();
        let renewed = if mine.is_empty() {
            Vec::new()
        } else {
            self.store
                .renew(&self.worker_id, &mine, self.ttl, now)
                .await?
        };
        // A release that failed (the database was away) is retried: the bump ends the stream,
        // and the engine releases before it starts the next one. Without it such partitions
        // would stay held and renewed, but followed by no stream, for good.
        let mut changed = self.lock().values().any(|h| h.releasing);
        if !self.reclaimed.load(Ordering::Relaxed) {
            let taken = self.store.reclaim(&self.worker_id, self.ttl, now).await?;
            self.reclaimed.store(true, Ordering::Relaxed);
            if !taken.is_empty() {
                info!(
                    count = taken.len(),
                    "took back the partitions this worker's previous process held"
                );
                self.hold(taken);
                changed = true;
            }
        }
        {
            let mut held = self.lock();
            let lost: Vec<u32> = held
                .keys()
                .copied()
                .filter(|p| !renewed.iter().any(|(r, _)| r == p))
                .filter(|p| mine.iter().any(|(m, _)| m == p))
                .collect();
            for partition in &lost {
                if held.remove(partition).is_some_and(|h| !h.releasing) {
                    changed = true;
                }
            }
            for (partition, expire_time) in renewed {
                if let Some(h) = held.get_mut(&partition) {
                    h.expire_time = expire_time;
                }
            }
            if !lost.is_empty() {
                warn!(partitions = ?lost, "leases lost to another worker");
            }
        }
        let live = self.store.live_workers(self.ttl, now).await?.len().max(1);
        let share = self
            .partition_count
            .div_ceil(u32::try_from(live).unwrap_or(u32::MAX));
        let active = u32::try_from(self.active().len()).unwrap_or(u32::MAX);
        if active < share {
            let taken = self
                .store
                .acquire(&self.worker_id, share - active, self.ttl, now)
                .await?;
            if !taken.is_empty() {
                info!(count = taken.len(), share, live, "took partitions");
                self.hold(taken);
                changed = true;
            }
        } else if active > share {
            let mut held = self.lock();
            let excess = (active - share) as usize;
            for (_, h) in held
                .iter_mut()
                .rev()
                .filter(|(_, h)| !h.releasing)
                .take(excess)
            {
                h.releasing = true;
            }
            info!(
                count = excess,
                share, live, "giving up partitions above the fair share"
            );
            changed = true;
        }
        if changed {
            self.publish_lowest();
            self.bump();
        }
        Ok(())
    }

    fn hold(&self, taken: Vec<Lease>) {
        let mut held = self.lock();
        for lease in taken {
            held.insert(
                lease.partition,
                Held {
                    epoch: lease.epoch,
                    expire_time: lease.expire_time,
                    checkpoint: lease.checkpoint,
                    releasing: false,
                },
            );
        }
    }

    /// Runs a round every TTL/3 until `stop`; a failed round is logged and retried next time
    /// (the leases run out if failures last).
    pub async fn run(&self, stop: CancellationToken) {
        let every = (self.ttl / 3).max(Duration::from_millis(1));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            if let Err(e) = self.round().await {
                warn!(error = %e, "lease round failed; will retry");
            }
        }
    }

    /// Gives up everything at a clean shutdown, so others take over at once instead of after
    /// the TTL.
    pub async fn retire(&self) {
        let held: Vec<(u32, i64)> = self.lock().iter().map(|(&p, h)| (p, h.epoch)).collect();
        if let Err(e) = self.store.retire(&self.worker_id, &held).await {
            warn!(error = %e, "cannot give up the leases; they run out after the TTL");
        }
        self.lock().clear();
    }
}
