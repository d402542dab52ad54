//! The live end of the change log, in memory: the newest events and the log's bounds.
//!
//! The store publishes each committed event here from its writer thread, in commit order.
//! Watchers read recent events from this ring without touching the database, and wait on the
//! head position to learn that something new has committed. A watcher that has fallen further
//! behind than the ring reaches reads from the database instead, so a slow watcher costs the
//! server a cursor, never a growing buffer.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::domain::{CustomerEvent, LogBounds};

/// Recent events and the log bounds, shared by the store and every watcher.
#[derive(Debug)]
pub struct Feed {
    /// The newest events, oldest first, at most `capacity` of them.
    ring: RwLock<VecDeque<Arc<CustomerEvent>>>,
    /// How many events the ring keeps.
    capacity: usize,
    /// The log's bounds; watchers wait on changes to it.
    bounds: watch::Sender<LogBounds>,
}

impl Feed {
    /// A feed for a log currently at `bounds`, keeping up to `capacity` recent events.
    pub fn new(bounds: LogBounds, capacity: usize) -> Self {
        Self {
            ring: RwLock::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            bounds: watch::channel(bounds).0,
        }
    }

    /// The bounds as of the last commit.
    pub fn bounds(&self) -> LogBounds {
        *self.bounds.borrow()
    }

    /// A receiver that wakes whenever the bounds change.
    pub fn subscribe(&self) -> watch::Receiver<LogBounds> {
        self.bounds.subscribe()
    }

    /// Adds committed events (in commit order) and moves the head.
    pub fn publish(&self, events: &[Arc<CustomerEvent>]) {
        let Some(last) = events.last() else { return };
        {
            let mut ring = self.ring.write().expect("feed lock");
            for event in events {
                if ring.len() == self.capacity {
                    ring.pop_front();
                }
                ring.push_back(Arc::clone(event));
            }
        }
        self.bounds.send_modify(|b| b.head = b.head.max(last.seq));
    }

    /// Records that retention deleted every event up to `through`.
    pub fn pruned(&self, through: u64) {
        {
            let mut ring = self.ring.write().expect("feed lock");
            while ring.front().is_some_and(|e| e.seq <= through) {
                ring.pop_front();
            }
        }
        self.bounds
            .send_modify(|b| b.pruned_through = b.pruned_through.max(through));
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
