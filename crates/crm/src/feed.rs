//! The live end of the change log, in memory: the newest events and the log's bounds.
//!
//! The store publishes committed events here. Watchers read recent events from this ring
//! without touching the database, and wait on the head position to learn that something new
//! has committed. A watcher that has fallen further behind than the ring reaches reads from
//! the database instead, so a slow watcher costs the server a cursor, never a growing buffer.
//!
//! Publishes may come out of order, overlap and repeat: with a PostgreSQL pool two group
//! commits can answer in either order, and the store's tail reads back from the database what
//! it may already have. So the feed keeps a small reorder buffer by sequence number, ignores
//! what it already has, and moves the head only over contiguous sequence numbers: the ring is
//! always the gap-free log up to the head.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::domain::{CustomerEvent, LogBounds};

/// Events after a gap that the reorder buffer keeps at most. Past that the newest are dropped:
/// the store's tail reads them back from the database once the gap is filled.
const MAX_PENDING: usize = 65_536;

/// Recent events and the log bounds, shared by the store and every watcher.
#[derive(Debug)]
pub struct Feed {
    /// The newest events, oldest first, contiguous, at most `capacity` of them.
    ring: RwLock<VecDeque<Arc<CustomerEvent>>>,
    /// Events published ahead of a gap, by sequence number, until the gap is filled.
    pending: Mutex<BTreeMap<u64, Arc<CustomerEvent>>>,
    /// How many events the ring keeps.
    capacity: usize,
    /// The log's bounds; watchers wait on changes to it.
    bounds: watch::Sender<LogBounds>,
    /// Woken when the feed has a gap or a reader waits for a position past the head, so a
    /// store that can read the log back (PostgreSQL's tail) does so without waiting its turn.
    behind: Notify,
}

impl Feed {
    /// A feed for a log currently at `bounds`, keeping up to `capacity` recent events.
    pub fn new(bounds: LogBounds, capacity: usize) -> Self {
        Self {
            ring: RwLock::new(VecDeque::with_capacity(capacity.min(4096))),
            pending: Mutex::new(BTreeMap::new()),
            capacity: capacity.max(1),
            bounds: watch::channel(bounds).0,
            behind: Notify::new(),
        }
    }

    /// The bounds as of the last contiguous commit.
    pub fn bounds(&self) -> LogBounds {
        *self.bounds.borrow()
    }

    /// A receiver that wakes whenever the bounds change.
    pub fn subscribe(&self) -> watch::Receiver<LogBounds> {
        self.bounds.subscribe()
    }

    /// Adds committed events, in any order, repeated or not, and moves the head over every
    /// sequence number that is now contiguous.
    pub fn publish(&self, events: &[Arc<CustomerEvent>]) {
        if events.is_empty() {
            return;
        }
        // One lock order everywhere (pending, then ring) keeps publishers from deadlocking. The
        // head is read and moved under `pending`, so two publishers never both see the old
        // head and push the same events into the ring twice.
        let mut pending = self.pending.lock().expect("feed lock");
        let mut head = self.bounds().head;
        for event in events {
            if event.seq > head {
                pending
                    .entry(event.seq)
                    .or_insert_with(|| Arc::clone(event));
            }
        }
        let mut moved = false;
        {
            let mut ring = self.ring.write().expect("feed lock");
            while let Some(event) = pending.remove(&(head + 1)) {
                if ring.len() == self.capacity {
                    ring.pop_front();
                }
                head = event.seq;
                ring.push_back(event);
                moved = true;
            }
        }
        if moved {
            self.bounds.send_modify(|b| b.head = b.head.max(head));
        }
        // Anything at or below the head is in the ring already (or was pruned).
        *pending = pending.split_off(&(head + 1));
        while pending.len() > MAX_PENDING {
            pending.pop_last();
        }
        let gap = !pending.is_empty();
        drop(pending);
        if gap {
            self.behind.notify_one();
        }
    }

    /// Whether events past a missing one are waiting for it.
    pub fn has_gap(&self) -> bool {
        !self.pending.lock().expect("feed lock").is_empty()
    }

    /// Resolves when the feed has a gap or a reader waits past the head.
    pub async fn fell_behind(&self) {
        self.behind.notified().await;
    }

    /// Records that retention deleted every event up to `through`. A feed whose head is below
    /// that can never fill the deleted part, so its head moves up to it.
    pub fn pruned(&self, through: u64) {
        {
            // Under the publishers' lock, so none moves the head while this does.
            let mut pending = self.pending.lock().expect("feed lock");
            let mut ring = self.ring.write().expect("feed lock");
            while ring.front().is_some_and(|e| e.seq <= through) {
                ring.pop_front();
            }
            pending.retain(|&seq, _| seq > through);
            self.bounds.send_modify(|b| {
                b.pruned_through = b.pruned_through.max(through);
                b.head = b.head.max(through);
            });
        }
        // Events waiting just past `through` may now be contiguous.
        self.drain_pending();
    }

    /// Moves the head over pending events that have become contiguous.
    fn drain_pending(&self) {
        let first = {
            let pending = self.pending.lock().expect("feed lock");
            pending.values().next().cloned()
        };
        if let Some(first) = first {
            self.publish(&[first]);
        }
    }

    /// Waits until the head has reached `position`, for at most `wait`. False if it did not.
    ///
    /// A read can see a commit before its events are published here, and tokens are checked
    /// against this head, so a position read from the database is handed out only once the
    /// feed has caught up with it.
    pub async fn wait_for(&self, position: u64, wait: Duration) -> bool {
        let mut bounds = self.subscribe();
        if bounds.borrow().head >= position {
            return true;
        }
        self.behind.notify_one();
        matches!(
            tokio::time::timeout(wait, bounds.wait_for(|b| b.head >= position)).await,
            Ok(Ok(_))
        )
    }

    /// Up to `limit` events after `after`, if the ring still holds the one right after it.
    /// `None` means the caller is further behind than the ring and must read the database.
    pub fn read_after(&self, after: u64, limit: usize) -> Option<Vec<Arc<CustomerEvent>>> {
        let ring = self.ring.read().expect("feed lock");
        let first = ring.front()?.seq;
        if after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(ring.iter().skip(skip).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;
    use crate::domain::{Customer, EventType, Rendered};

    fn event(seq: u64) -> Arc<CustomerEvent> {
        Arc::new(CustomerEvent {
            seq,
            event_id: Uuid::now_v7(),
            kind: EventType::Created,
            customer: Customer {
                id: Uuid::now_v7(),
                name: format!("customer {seq}"),
                email: format!("c{seq}@example.com"),
                create_time: SystemTime::UNIX_EPOCH,
                update_time: SystemTime::UNIX_EPOCH,
                version: 1,
            },
            commit_time: SystemTime::UNIX_EPOCH,
            rendered: Rendered::default(),
        })
    }

    fn empty_feed() -> Feed {
        Feed::new(
            LogBounds {
                log_id: 7,
                pruned_through: 0,
                head: 0,
            },
            100,
        )
    }

    fn seqs(events: &[Arc<CustomerEvent>]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn racing_publishers_of_the_same_events_put_each_in_the_ring_once() {
        let bounds = LogBounds {
            log_id: 1,
            head: 0,
            pruned_through: 0,
        };
        let feed = Arc::new(Feed::new(bounds, 100_000));
        let events: Vec<_> = (1..=2000).map(event).collect();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let (feed, events) = (Arc::clone(&feed), events.clone());
                scope.spawn(move || {
                    for chunk in events.chunks(7) {
                        feed.publish(chunk);
                    }
                });
            }
        });
        let seqs: Vec<u64> = feed
            .read_after(0, 10_000)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
        assert!(!feed.has_gap(), "nothing left waiting below the head");
    }

    #[test]
    fn events_published_out_of_order_become_visible_in_order_once_contiguous() {
        let feed = empty_feed();
        feed.publish(&[event(3), event(4)]);
        assert_eq!(feed.bounds().head, 0, "the head waits for 1 and 2");
        assert!(feed.has_gap());
        assert_eq!(seqs(&feed.read_after(0, 10).unwrap_or_default()), [0u64; 0]);
        feed.publish(&[event(2)]);
        assert_eq!(feed.bounds().head, 0);
        feed.publish(&[event(1)]);
        assert_eq!(feed.bounds().head, 4);
        assert!(!feed.has_gap());
        assert_eq!(seqs(&feed.read_after(0, 10).unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn repeated_and_overlapping_publishes_are_kept_once() {
        let feed = empty_feed();
        let first = [event(1), event(2), event(3)];
        feed.publish(&first);
        feed.publish(&first);
        feed.publish(&[event(2), event(3), event(4), event(5)]);
        feed.publish(&[event(5), event(5)]);
        assert_eq!(feed.bounds().head, 5);
        assert_eq!(seqs(&feed.read_after(0, 10).unwrap()), [1, 2, 3, 4, 5]);
        // The copy published first is the one kept.
        assert_eq!(
            feed.read_after(0, 1).unwrap()[0].event_id,
            first[0].event_id
        );
    }

    #[test]
    fn retention_past_the_head_moves_the_head_over_the_deleted_part() {
        let feed = empty_feed();
        feed.publish(&[event(1), event(7)]);
        feed.pruned(5);
        let bounds = feed.bounds();
        assert_eq!((bounds.head, bounds.pruned_through), (5, 5));
        feed.publish(&[event(6)]);
        assert_eq!(feed.bounds().head, 7, "6 joins 7, which was waiting");
        assert_eq!(seqs(&feed.read_after(5, 10).unwrap()), [6, 7]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_position_ends_when_the_gap_is_filled() {
        let feed = Arc::new(empty_feed());
        feed.publish(&[event(2)]);
        let waiter = tokio::spawn({
            let feed = Arc::clone(&feed);
            async move { feed.wait_for(2, Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        feed.publish(&[event(1)]);
        assert!(waiter.await.unwrap());
        assert!(!feed.wait_for(3, Duration::from_millis(10)).await);
    }
}
