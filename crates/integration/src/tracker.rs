//! The checkpoint rule: the durable position only moves past events that are fully handled.
//!
//! Events are handed out in log order but finish in any order, because deliveries run
//! concurrently. The tracker keeps every event between the checkpoint and the newest one read,
//! and reports the **low watermark**: the position of the newest event such that it and every
//! event before it are done (delivered, found already delivered, ignored, or dead-lettered).

use std::collections::BTreeMap;

use crate::store::Move;

/// A position in CRM's change log, with the opaque token to resume after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// Sequence number of the event (CRM's `CustomerEvent.sequence`).
    pub sequence: i64,
    /// Resume token just after that event.
    pub token: String,
}

/// Events read but not yet all done, in log order.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Sequence → (resume token, done).
    pending: BTreeMap<i64, (String, bool)>,
    /// The newest mark every earlier event is done for, not yet taken by [`Tracker::take`].
    watermark: Option<Mark>,
    /// Whether the watermark must replace the saved checkpoint rather than only move it
    /// forward: set by a relist ([`Tracker::reset_to`]), whose snapshot may be numbered lower
    /// than a checkpoint saved from a replaced change log.
    replace: bool,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an event handed out for delivery.
    pub fn start(&mut self, mark: Mark) {
        self.pending.insert(mark.sequence, (mark.token, false));
    }

    /// Records that an event is done and advances the watermark as far as it can.
    pub fn finish(&mut self, sequence: i64) {
        if let Some(entry) = self.pending.get_mut(&sequence) {
            entry.1 = true;
        }
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().1 {
                break;
            }
            let sequence = *entry.key();
            let (token, _) = entry.remove();
            self.watermark = Some(Mark { sequence, token });
        }
    }

    /// A heartbeat's position: the watermark jumps there if nothing is in flight.
    pub fn idle_at(&mut self, mark: Mark) {
        if self.pending.is_empty()
            && self
                .watermark
                .as_ref()
                .is_none_or(|w| w.sequence <= mark.sequence)
        {
            self.watermark = Some(mark);
        }
    }

    /// After a relist (nothing pending): the snapshot becomes the watermark, replacing any
    /// unsaved one, which may belong to a replaced change log with higher numbers.
    pub fn reset_to(&mut self, mark: Mark) {
        self.pending.clear();
        self.watermark = Some(mark);
        self.replace = true;
    }

    /// How the watermark [`Tracker::take`] returns next must be saved.
    pub fn how(&self) -> Move {
        if self.replace {
            Move::Replace
        } else {
            Move::Forward
        }
    }

    /// Whether nothing is pending.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Puts back a mark that [`Tracker::take`] returned but could not be saved, unless a newer
    /// one has been reached since.
    pub fn restore(&mut self, mark: Mark, how: Move) {
        // A snapshot that could not replace the saved checkpoint passes that duty on to
        // whatever mark is saved next.
        self.replace |= how == Move::Replace;
        if self
            .watermark
            .as_ref()
            .is_none_or(|w| w.sequence < mark.sequence)
        {
            self.watermark = Some(mark);
        }
    }

    /// The watermark reached since the last call, if it moved.
    pub fn take(&mut self) -> Option<Mark> {
        let mark = self.watermark.take();
        if mark.is_some() {
            self.replace = false;
        }
        mark
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(sequence: i64) -> Mark {
        Mark {
            sequence,
            token: format!("t{sequence}"),
        }
    }

    #[test]
    fn watermark_waits_for_the_oldest_event() {
        let mut t = Tracker::new();
        for s in 1..=3 {
            t.start(mark(s));
        }
        t.finish(2);
        t.finish(3);
        assert_eq!(t.take(), None, "event 1 is still in flight");
        t.finish(1);
        assert_eq!(t.take(), Some(mark(3)));
        assert!(t.is_idle());
    }

    #[test]
    fn heartbeat_moves_an_idle_watermark_only() {
        let mut t = Tracker::new();
        t.start(mark(4));
        t.idle_at(mark(9));
        assert_eq!(t.take(), None);
        t.finish(4);
        t.idle_at(mark(9));
        assert_eq!(t.take(), Some(mark(9)));
    }

    #[test]
    fn a_relist_snapshot_replaces_and_a_failed_save_passes_that_on() {
        let mut t = Tracker::new();
        t.reset_to(mark(3));
        assert_eq!(t.how(), Move::Replace);
        let taken = t.take().unwrap();
        assert_eq!(t.how(), Move::Forward, "taken with the mark");
        // The save failed, and a later mark was reached meanwhile: that one replaces.
        t.start(mark(4));
        t.finish(4);
        t.restore(taken, Move::Replace);
        assert_eq!(t.how(), Move::Replace);
        assert_eq!(t.take(), Some(mark(4)));
        assert_eq!(t.how(), Move::Forward);
    }
}
