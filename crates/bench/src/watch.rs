//! The fan-out watchers: many `WatchCustomers` streams, each timing every event from its
//! commit to its receipt and checking that it sees every sequence number once, in order.
//!
//! With a thousand watchers the client decodes a thousand copies of every event, so the
//! watchers decode only what they use (see [`WatchMessage`]): the load generator should not be
//! the bottleneck it measures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use mip_proto::crm::v1::{StartPosition, WatchCustomersRequest};
use mip_runtime::CancellationToken;
use prost::Message;
use prost::bytes::Buf;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::codec::{Codec, DecodeBuf, Decoder, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_prost::ProstEncoder;

use crate::load::{connect, micros};
use crate::report::record_micros;

/// Streams per HTTP/2 connection: a thousand streams on one socket would measure that
/// socket's reader task more than CRM.
const STREAMS_PER_CONNECTION: usize = 100;

/// The full method name, as the generated client would send it.
const WATCH_CUSTOMERS: &str = "/crm.v1.CrmService/WatchCustomers";

/// `crm.v1.WatchCustomersResponse` with only the fields a watcher uses. Prost skips the others
/// (customer, ids, token) without allocating, which is most of the decoding cost.
#[derive(Clone, PartialEq, prost::Message)]
struct WatchMessage {
    /// `kind.event`. A oneof member is an ordinary field on the wire, so an optional message
    /// field with the same number decodes it; heartbeats (field 2) are skipped.
    #[prost(message, optional, tag = "1")]
    event: Option<EventStamp>,
}

/// `crm.v1.CustomerEvent`'s commit time and sequence.
#[derive(Clone, PartialEq, prost::Message)]
struct EventStamp {
    /// `commit_time`.
    #[prost(message, optional, tag = "5")]
    commit_time: Option<prost_types::Timestamp>,
    /// `sequence`.
    #[prost(int64, tag = "6")]
    sequence: i64,
}

/// The watchers' codec: requests encoded by prost as usual, responses decoded by
/// [`SliceDecoder`].
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchCustomersRequest;
    type Decode = WatchMessage;
    type Encoder = ProstEncoder<WatchCustomersRequest>;
    type Decoder = SliceDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder
    }
}

/// Decodes a [`WatchMessage`] from its bytes as one slice, with prost. Decoding straight from
/// tonic's `DecodeBuf` (what `ProstCodec` does) advances the buffer underneath once per field
/// read or skipped; with 1,000 watchers that, and the varint reads through it, were about 14%
/// of a fan-out run's CPU, the client's thread taking 48% (TECHNICAL_DESIGN.md, Performance).
struct SliceDecoder;

impl Decoder for SliceDecoder {
    type Item = WatchMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let len = buf.remaining();
        let decoded = if buf.chunk().len() == len {
            let decoded = WatchMessage::decode(buf.chunk());
            buf.advance(len);
            decoded
        } else {
            // The message spans chunks: gather it first.
            WatchMessage::decode(buf.copy_to_bytes(len))
        };
        decoded
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode a watch message: {e}")))
    }
}

/// The wall clock in microseconds since the epoch, comparable with CRM's `commit_time` (same
/// machine, same clock).
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Opens a watch from the log's current end. The server fixes the start position before it
/// answers, so once this returns the watcher will see every later event.
async fn open(channel: Channel) -> Result<Streaming<WatchMessage>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let request = Request::new(WatchCustomersRequest {
        resume_token: String::new(),
        start_position: StartPosition::Latest as i32,
        partition_filter: None,
    });
    Ok(grpc
        .server_streaming(
            request,
            PathAndQuery::from_static(WATCH_CUSTOMERS),
            WatchCodec,
        )
        .await?
        .into_inner())
}

/// What one watcher received.
pub struct Watcher {
    /// Commit-to-receipt delay of each event, in microseconds. Two significant digits: a
    /// thousand of these must stay small, and 1% is precise enough for a p99.
    pub delays: Histogram<u64>,
    /// Events received.
    pub received: u64,
    /// Sequence of the first event.
    pub first: i64,
    /// Sequence of the last event.
    pub last: i64,
    /// Events whose sequence did not follow the previous one's (a gap, a repeat or a reorder).
    pub out_of_order: u64,
    /// Why the stream ended early, if it did.
    pub error: Option<String>,
}

impl Watcher {
    fn new() -> Self {
        Self {
            delays: Histogram::new(2).expect("2 significant digits is a valid precision"),
            received: 0,
            first: 0,
            last: 0,
            out_of_order: 0,
            error: None,
        }
    }

    /// Counts an event: its sequence, and its delay from commit in microseconds.
    fn observe(&mut self, sequence: i64, delay_micros: i64) {
        record_micros(&mut self.delays, delay_micros.max(0) as u64);
        if self.received == 0 {
            self.first = sequence;
        } else if sequence != self.last + 1 {
            self.out_of_order += 1;
        }
        self.last = sequence;
        self.received += 1;
    }

    /// Whether it received exactly the events `first..=last`, in order.
    pub fn complete(&self, first: i64, last: i64) -> bool {
        self.received == (last - first + 1).max(0) as u64
            && (self.received == 0 || (self.first == first && self.last == last))
            && self.out_of_order == 0
    }
}

/// Watchers running in the background.
pub struct Fanout {
    /// One task per watcher.
    tasks: JoinSet<Watcher>,
    /// The sequence every watcher reads up to; `i64::MAX` until the load is done.
    target: watch::Sender<i64>,
    /// Events received by all watchers together, to tell progress from a stall.
    received: Arc<AtomicU64>,
    /// Ends every watcher when the wait for them gives up.
    stop: CancellationToken,
}

impl Fanout {
    /// Opens `watchers` streams from the log's end, spread over connections and over the CRM
    /// replicas `crm` names (one, outside a cluster); returns once every one is open.
    pub async fn start(crm: &[SocketAddr], watchers: usize) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        let connections = watchers.div_ceil(STREAMS_PER_CONNECTION).max(crm.len());
        for i in 0..connections {
            channels.push(connect(crm[i % crm.len()]).await?);
        }
        let mut opening = JoinSet::new();
        for i in 0..watchers {
            opening.spawn(open(channels[i % channels.len()].clone()));
        }
        let (target, _) = watch::channel(i64::MAX);
        let received = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        while let Some(opened) = opening.join_next().await {
            let stream = opened?.context("open WatchCustomers")?;
            tasks.spawn(receive(
                stream,
                target.subscribe(),
                Arc::clone(&received),
                stop.clone(),
            ));
        }
        Ok(Self {
            tasks,
            target,
            received,
            stop,
        })
    }

    /// Lets every watcher finish at sequence `last`, and collects them. Watchers still short
    /// of it when no watcher has received anything for `stall` are ended and come back
    /// incomplete.
    pub async fn finish(mut self, last: i64, stall: Duration) -> Vec<Watcher> {
        self.target.send_replace(last);
        let mut done = Vec::with_capacity(self.tasks.len());
        let (mut seen, mut last_change) = (self.received.load(Ordering::Relaxed), Instant::now());
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => match joined {
                    Some(Ok(watcher)) => done.push(watcher),
                    Some(Err(e)) => {
                        let mut watcher = Watcher::new();
                        watcher.error = Some(format!("watcher task failed: {e}"));
                        done.push(watcher);
                    }
                    None => return done,
                },
                _ = ticker.tick() => {
                    let now = self.received.load(Ordering::Relaxed);
                    if now != seen {
                        (seen, last_change) = (now, Instant::now());
                    } else if last_change.elapsed() > stall {
                        self.stop.cancel();
                    }
                }
            }
        }
    }
}

/// One watcher's loop: read events until the target sequence, a failure, or a stop.
async fn receive(
    mut stream: Streaming<WatchMessage>,
    mut target: watch::Receiver<i64>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Watcher {
    let mut watcher = Watcher::new();
    // Futures made once rather than in every `select!`: a new one per message registered and
    // unregistered a waiter each time, which cost the client as much as decoding.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut last_wanted = *target.borrow_and_update();
    let set = async move {
        // The target is set once, when the load is done; a dropped sender ends the watcher.
        match target.wait_for(|&t| t != i64::MAX).await {
            Ok(t) => *t,
            Err(_) => i64::MIN,
        }
    };
    tokio::pin!(set);
    loop {
        if watcher.received > 0 && watcher.last >= last_wanted {
            return watcher;
        }
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(WatchMessage { event: Some(event) })) => {
                    // Read the clock first: everything after is the watcher's own work.
                    let now = now_micros();
                    watcher.observe(event.sequence, now - micros(event.commit_time.as_ref()));
                    received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(WatchMessage { event: None })) => {} // a heartbeat
                Ok(None) => {
                    watcher.error = Some("the stream ended".to_owned());
                    return watcher;
                }
                Err(status) => {
                    watcher.error = Some(format!("the stream failed: {status}"));
                    return watcher;
                }
            },
            wanted = &mut set, if last_wanted == i64::MAX => {
                if wanted == i64::MIN {
                    return watcher;
                }
                last_wanted = wanted;
            }
            () = &mut stopped => {
                watcher.error = Some("no progress; gave up".to_owned());
                return watcher;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(sequences: &[i64]) -> Watcher {
        let mut watcher = Watcher::new();
        for &sequence in sequences {
            watcher.observe(sequence, 1000);
        }
        watcher
    }

    #[test]
    fn a_watcher_is_complete_only_with_every_event_once_in_order() {
        assert!(watcher(&[1, 2, 3]).complete(1, 3));
        assert!(!watcher(&[1, 3]).complete(1, 3), "gap");
        assert!(!watcher(&[1, 2, 2, 3]).complete(1, 3), "repeat");
        assert!(!watcher(&[2, 3]).complete(1, 3), "late start");
        assert!(!watcher(&[1, 2]).complete(1, 3), "ended early");
        assert!(!watcher(&[1, 3, 2]).complete(1, 3), "reordered");
    }
}
