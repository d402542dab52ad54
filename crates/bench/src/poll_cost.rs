//! The poll-cost measurement: batches of identical `ListCustomerEvents` calls, sent one after
//! another on one connection from a fixed position, each reply timed and checked, with CRM's
//! CPU time read around the batch so the server's cost per poll is known apart from the
//! client's.
//!
//! CPU time comes from `/proc/<pid>/stat` (user + system time of every thread of the process,
//! exited ones included), so CRM must run as its own process, and it is counted in clock ticks
//! (10 ms on Linux): a batch runs until CRM has used enough CPU for the ticks not to matter.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use mip_proto::crm::v1::{ListCustomerEventsRequest, ListCustomerEventsResponse};
use tokio::time::Instant;

use crate::cpu::{clock_tick, process_cpu};
use crate::load::CrmClient;
use crate::report::{histogram, record_duration};

/// Events every poll asks for: the most CRM returns, as a poller catching up would ask.
pub const PAGE_SIZE: i32 = 1000;

/// Calls between two looks at whether a batch has run long enough (each look reads /proc).
const CHECK_EVERY: u64 = 256;

/// Wrong replies described in the check, at most.
const EXAMPLES: usize = 5;

/// How long a batch runs.
#[derive(Debug, Clone, Copy)]
pub struct BatchPlan {
    /// Calls before the measured ones, neither timed nor counted in CPU (checked, though).
    pub warm_up: u64,
    /// Measured calls, at least.
    pub min_calls: u64,
    /// CRM CPU time the measured calls must add up to, at least, so that the clock tick is a
    /// small part of it; more calls are made until it is reached or `max_wall` has passed.
    pub min_cpu: Duration,
    /// Wall time after which a batch stops adding calls for `min_cpu`.
    pub max_wall: Duration,
}

/// One measured batch of identical polls.
#[derive(Debug)]
pub struct Batch {
    /// Events each poll had to return (0: the poll starts at the head).
    pub new_events: usize,
    /// Measured calls.
    pub calls: u64,
    /// Each measured call's latency as this client saw it, in microseconds: request encoding,
    /// the round trip and decoding the reply.
    pub latency: Histogram<u64>,
    /// From the first measured call to the last reply.
    pub wall: Duration,
    /// CPU time CRM's process used over the measured calls.
    pub crm_cpu: Duration,
    /// Calls checked, warm-up included.
    pub checked: u64,
    /// Of those, replies that were not exactly the expected events.
    pub wrong: u64,
    /// A few wrong replies.
    pub examples: Vec<String>,
}

impl Batch {
    /// The resolution of [`Batch::crm_cpu_us_per_call`]: one clock tick over the calls.
    pub fn crm_cpu_resolution_us(&self, tick: Duration) -> f64 {
        if self.calls == 0 {
            return 0.0;
        }
        tick.as_secs_f64() * 1e6 / self.calls as f64
    }

    /// CRM CPU time per measured call, in microseconds.
    pub fn crm_cpu_us_per_call(&self) -> f64 {
        if self.calls == 0 {
            return 0.0;
        }
        self.crm_cpu.as_secs_f64() * 1e6 / self.calls as f64
    }

    /// Counts a reply, right or wrong.
    fn check(&mut self, reply: &ListCustomerEventsResponse, head: i64) {
        self.checked += 1;
        if let Some(problem) = wrong_reply(reply, head, self.new_events) {
            self.wrong += 1;
            if self.examples.len() < EXAMPLES {
                self.examples.push(problem);
            }
        }
    }
}

/// Sends the polls, and finds resume tokens at any position of CRM's change log.
pub struct Poller {
    /// A CRM client on a connection of its own, used by one call at a time.
    client: CrmClient,
    /// CRM's process id, for its CPU time.
    crm_pid: u32,
    /// The unit of /proc's CPU times.
    tick: Duration,
    /// Resume tokens by the sequence number they stand at. Tokens are opaque, so one at a
    /// given position is found by reading forward from a known one.
    tokens: BTreeMap<i64, String>,
}

impl Poller {
    /// A poller on `client`, measuring the CPU time of process `crm_pid`.
    pub fn new(client: CrmClient, crm_pid: u32) -> Self {
        Self {
            client,
            crm_pid,
            tick: clock_tick(),
            tokens: BTreeMap::new(),
        }
    }

    /// The length of a /proc CPU tick: the resolution of [`Batch::crm_cpu`].
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Remembers a resume token at `sequence` (from ListCustomers, say).
    pub fn remember(&mut self, sequence: i64, token: String) {
        self.tokens.insert(sequence, token);
    }

    /// A resume token at `target`: the nearest known one at or before it, moved forward by
    /// ListCustomerEvents calls of at most [`PAGE_SIZE`] events.
    pub async fn token_at(&mut self, target: i64) -> anyhow::Result<String> {
        loop {
            let (&at, token) = self
                .tokens
                .range(..=target)
                .next_back()
                .with_context(|| format!("no resume token known at or before {target}"))?;
            if at == target {
                return Ok(token.clone());
            }
            let step = (target - at).min(i64::from(PAGE_SIZE));
            let reply = self
                .client
                .list_customer_events(ListCustomerEventsRequest {
                    resume_token: token.clone(),
                    start_position: 0,
                    page_size: step as i32,
                    partition_filter: None,
                })
                .await
                .context("ListCustomerEvents, positioning")?
                .into_inner();
            ensure!(
                reply.events.len() as i64 == step && reply.next_sequence == at + step,
                "ListCustomerEvents after {at} with page_size {step} returned {} events and \
                 next_sequence {}",
                reply.events.len(),
                reply.next_sequence
            );
            self.tokens
                .insert(reply.next_sequence, reply.next_resume_token);
        }
    }

    /// Polls from `new_events` before `head` (which must not move meanwhile), as `plan` says.
    pub async fn measure(
        &mut self,
        head: i64,
        new_events: usize,
        plan: &BatchPlan,
    ) -> anyhow::Result<Batch> {
        let token = self.token_at(head - new_events as i64).await?;
        let mut batch = Batch {
            new_events,
            calls: 0,
            latency: histogram(),
            wall: Duration::ZERO,
            crm_cpu: Duration::ZERO,
            checked: 0,
            wrong: 0,
            examples: Vec::new(),
        };
        for _ in 0..plan.warm_up {
            let reply = self.poll(&token).await?;
            batch.check(&reply, head);
        }
        let cpu_before = self.crm_cpu()?;
        let started = Instant::now();
        loop {
            let sent = Instant::now();
            let reply = self.poll(&token).await?;
            record_duration(&mut batch.latency, sent.elapsed());
            batch.calls += 1;
            batch.check(&reply, head);
            let look = batch.calls == plan.min_calls
                || (batch.calls > plan.min_calls && batch.calls.is_multiple_of(CHECK_EVERY));
            if look {
                // The wall time first: the /proc read is this process's work, not CRM's.
                let wall = started.elapsed();
                let cpu = self.crm_cpu()?.saturating_sub(cpu_before);
                if cpu >= plan.min_cpu || wall >= plan.max_wall {
                    (batch.wall, batch.crm_cpu) = (wall, cpu);
                    return Ok(batch);
                }
            }
        }
    }

    /// One ListCustomerEvents call from `token`.
    async fn poll(&mut self, token: &str) -> anyhow::Result<ListCustomerEventsResponse> {
        Ok(self
            .client
            .list_customer_events(ListCustomerEventsRequest {
                resume_token: token.to_owned(),
                start_position: 0,
                page_size: PAGE_SIZE,
                partition_filter: None,
            })
            .await
            .context("ListCustomerEvents")?
            .into_inner())
    }

    /// CRM's CPU time so far.
    fn crm_cpu(&self) -> anyhow::Result<Duration> {
        process_cpu(self.crm_pid, self.tick)
    }
}

/// What is wrong with a reply to a poll `new_events` before `head`, if anything: it must hold
/// exactly the events `head - new_events + 1 ..= head`, in order, and say the caller is now
/// up to date.
fn wrong_reply(reply: &ListCustomerEventsResponse, head: i64, new_events: usize) -> Option<String> {
    let first = head - new_events as i64 + 1;
    let in_order = reply
        .events
        .iter()
        .zip(first..)
        .all(|(event, sequence)| event.sequence == sequence);
    let right = reply.events.len() == new_events
        && in_order
        && reply.next_sequence == head
        && reply.remaining_events == 0;
    (!right).then(|| {
        format!(
            "poll from {} (head {head}) returned {} events, sequences {:?}..={:?}, \
             next_sequence {}, remaining_events {}",
            first - 1,
            reply.events.len(),
            reply.events.first().map(|e| e.sequence),
            reply.events.last().map(|e| e.sequence),
            reply.next_sequence,
            reply.remaining_events
        )
    })
}

#[cfg(test)]
mod tests {
    use mip_proto::crm::v1::CustomerEvent;

    use super::*;

    /// A reply holding `count` events from sequence `first` on.
    fn reply(first: i64, count: i64, next: i64) -> ListCustomerEventsResponse {
        ListCustomerEventsResponse {
            events: (first..first + count)
                .map(|sequence| CustomerEvent {
                    sequence,
                    ..Default::default()
                })
                .collect(),
            next_resume_token: String::new(),
            remaining_events: 0,
            next_sequence: next,
        }
    }

    #[test]
    fn a_poll_must_return_exactly_the_events_after_its_position() {
        assert_eq!(
            wrong_reply(&reply(51, 0, 50), 50, 0),
            None,
            "empty at the head"
        );
        assert_eq!(wrong_reply(&reply(41, 10, 50), 50, 10), None);
        assert!(
            wrong_reply(&reply(50, 1, 50), 50, 0).is_some(),
            "one too many"
        );
        assert!(
            wrong_reply(&reply(42, 9, 50), 50, 10).is_some(),
            "one short"
        );
        assert!(wrong_reply(&reply(40, 10, 49), 50, 10).is_some(), "shifted");
        let mut behind = reply(41, 10, 50);
        behind.remaining_events = 3;
        assert!(wrong_reply(&behind, 50, 10).is_some(), "not up to date");
    }
}
