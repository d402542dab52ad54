"""Following CRM's customer feed the way the platform's integration service does.

`follow_customers(channel)` yields every change to customers, in log order, and keeps going
through what a long-running reader meets: a CRM restart or a dropped connection (reconnect
with jittered backoff from the last token), a server with watching disabled (poll
`ListCustomerEvents`, try the stream again now and then), and a resume token that retention
has overtaken or that another database issued (relist every customer, then watch from the
listing's snapshot). The rules mirror crates/integration/src/engine.rs, so this client and
the service agree on when to fall back, when to return and where to resume.

    with follow_customers(channel, token=load_token()) as feed:
        for item in feed:
            handle(item)              # item.kind: "event", "relisted" (or "live")
            save_token(item.token)    # resume here next time

Save the token after handling an item and the next follower resumes right after it; a crash
between handling and saving replays that one item, so make handling idempotent (the event's
`event_id`, or the customer's `id` and `version`).
"""

import dataclasses
import queue
import random
import threading
import time
from typing import Callable, Generator, Iterator, Optional, Sequence, Tuple, Union

import grpc

from mip_client._reader import read_stream
from mip_client.crm.v1 import crm_pb2, crm_pb2_grpc
from mip_client.status import error_reason, retry_delay

#: An event from the change log (`item.event`; `item.customer` is its customer).
EVENT = "event"
#: A customer from a relist (`item.customer`; `item.event` is None): the resume token was no
#: longer usable, so every current customer is listed once, for the user to reconcile.
RELISTED = "relisted"
#: The follower has caught up with the log: everything committed so far has been yielded,
#: and what follows is live (only with `live_signals=True`). Yielded once caught up after the
#: start, and again after each reconnect, fallback to polling or relist, once caught up again.
LIVE = "live"

#: `ErrorInfo.reason`s that mean "relist, then watch from the snapshot".
RELIST_REASONS = ("RESUME_TOKEN_EXPIRED", "RESUME_TOKEN_UNKNOWN_LOG")

# Failures worth retrying: the server or the network may recover. Everything else (a malformed
# or future token, missing credentials, ...) cannot succeed by retrying and is raised.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
})

_START_POSITIONS = {
    "earliest": crm_pb2.START_POSITION_EARLIEST,
    "latest": crm_pb2.START_POSITION_LATEST,
}

# The longest wait a server's RetryInfo can impose between two attempts.
_MAX_RETRY_HINT = 30.0

# Messages the stream reader thread may hold for a slow consumer before HTTP/2 flow control
# holds the server back.
_READ_AHEAD = 256


@dataclasses.dataclass(frozen=True)
class FeedItem:
    """One thing the follower yields."""

    #: EVENT, RELISTED or LIVE.
    kind: str
    #: The resume token to save once this item is handled: a follower started from it
    #: continues with the next item.
    token: str
    #: The change-log position `token` stands for (the event's `sequence`; for a relisted
    #: customer, the listing's snapshot position).
    sequence: int
    #: The event, for EVENT items.
    event: Optional[crm_pb2.CustomerEvent] = None
    #: The customer: the event's (its state after the change; for DELETED, before it), or the
    #: listed one for RELISTED items. None for LIVE.
    customer: Optional[crm_pb2.Customer] = None

    @property
    def relisted(self) -> bool:
        """True for customers listed by a relist rather than read from the log."""
        return self.kind == RELISTED


@dataclasses.dataclass
class FollowerStats:
    """What the follower went through, for logs and tests."""

    #: Watch streams opened (the first one included).
    streams_opened: int = 0
    #: Failed feed calls that were retried after a backoff.
    retries: int = 0
    #: Switches from streaming to polling.
    fallbacks_to_polling: int = 0
    #: Switches from polling back to streaming.
    returns_to_streaming: int = 0
    #: Relists done because the token was no longer usable.
    relists: int = 0
    #: Events dropped because one at or below their sequence was already yielded.
    duplicates_dropped: int = 0


@dataclasses.dataclass(frozen=True)
class _Failure:
    """How a feed call ended, when it did not end because the follower was closed."""

    code: grpc.StatusCode
    message: str
    reason: Optional[str] = None
    #: Whether the stream delivered anything before failing.
    progressed: bool = False
    #: The original error, raised as-is if the failure is not retryable.
    error: Optional[grpc.RpcError] = None
    #: Seconds the server asked to wait before retrying (google.rpc.RetryInfo), if it did.
    retry_delay: float = 0.0


class _Closed(Exception):
    """The follower was closed while a call was in flight."""


def _failure(error: grpc.RpcError, progressed: bool = False) -> _Failure:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _Failure(code, details or "", error_reason(error), progressed, error,
                    retry_delay(error))


class CustomerFollower:
    """Iterates over CRM's customer feed; see `follow_customers` for the parameters.

    Use it from one thread. `close()` may be called from any thread and stops the iteration
    promptly (the in-flight call is cancelled); so does leaving a `with` block.
    """

    def __init__(
        self,
        target: Union[grpc.Channel, crm_pb2_grpc.CrmServiceStub],
        *,
        token: str = "",
        start_position: Union[str, int] = "earliest",
        mode: str = "auto",
        poll_interval: float = 0.5,
        page_size: int = 1000,
        stream_probe_interval: float = 10.0,
        stream_failures_before_poll: int = 3,
        idle_timeout: float = 30.0,
        call_timeout: float = 5.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        live_signals: bool = False,
        metadata: Optional[Sequence[Tuple[str, str]]] = None,
        rng: Optional[random.Random] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in ("auto", "stream", "poll"):
            raise ValueError(f"mode must be auto, stream or poll, not {mode!r}")
        if isinstance(start_position, str):
            if start_position not in _START_POSITIONS:
                raise ValueError(
                    f"start_position must be earliest or latest, not {start_position!r}")
            start_position = _START_POSITIONS[start_position]
        for name, value in (("poll_interval", poll_interval), ("idle_timeout", idle_timeout),
                            ("call_timeout", call_timeout), ("initial_backoff", initial_backoff),
                            ("max_backoff", max_backoff),
                            ("stream_probe_interval", stream_probe_interval)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        # A stub (or anything shaped like one, such as a test double), else a channel.
        self._stub = (target if hasattr(target, "WatchCustomers")
                      else crm_pb2_grpc.CrmServiceStub(target))
        self._token = token
        # Highest change-log position passed (yielded, or announced by a heartbeat or a poll),
        # in the log the token belongs to; 0 while unknown (a saved token carries none).
        self._sequence = 0
        self._start_position = start_position
        self._mode = mode
        self._poll_interval = poll_interval
        self._page_size = page_size
        self._probe_interval = stream_probe_interval
        self._failures_before_poll = max(1, stream_failures_before_poll)
        self._idle_timeout = idle_timeout
        self._call_timeout = call_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._live_signals = live_signals
        self._metadata = tuple(metadata or ())
        self._rng = rng or random.Random()
        self._clock = clock
        self._closed = threading.Event()
        self._lock = threading.Lock()
        # The call in flight (a stream or a unary future), cancelled by close().
        self._call = None
        self._failures = 0
        self._live = False
        # Set while a stream tried from polling (a probe) has not opened yet.
        self._probing = False
        # "stream" or "poll": how the loop reads the feed (a probe counts as streaming).
        self._reading = "poll" if mode == "poll" else "stream"
        #: Counters of what happened so far.
        self.stats = FollowerStats()
        self._items = self._run()

    # The public surface.

    @property
    def token(self) -> str:
        """The resume token to save: everything up to it has been yielded (heartbeats and empty
        polls move it too, so a saved token stays ahead of retention)."""
        return self._token

    @property
    def mode(self) -> str:
        """How the feed is being read: "stream" (WatchCustomers) or "poll"
        (ListCustomerEvents). While polling, a probe of the stream counts as polling until the
        stream has opened."""
        return "poll" if self._probing else self._reading

    @property
    def live(self) -> bool:
        """Whether the follower has caught up with the log since it last (re)connected: the
        events it yields now are live, not history."""
        return self._live

    def __iter__(self) -> Iterator[FeedItem]:
        return self

    def __next__(self) -> FeedItem:
        return next(self._items)

    def close(self) -> None:
        """Stops the follower: the in-flight call is cancelled and iteration ends."""
        self._closed.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed.is_set()

    def __enter__(self) -> "CustomerFollower":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
        try:
            self._items.close()
        except ValueError:
            pass  # still running in another thread, which close() has just stopped

    # The loop, as in the integration service's engine (`follow` and `on_feed_error`).

    def _run(self) -> Generator[FeedItem, None, None]:
        last_probe = self._clock()
        while not self._closed.is_set():
            if self._reading == "stream":
                failure = yield from self._stream()
                if failure is None:
                    return
                if self._probing:
                    # The probe stream did not open: keep polling, as the engine does when it
                    # cannot open a stream while polling.
                    self._probing = False
                    self._reading = "poll"
                    continue
                if failure.progressed:
                    self._failures = 0
                switch = yield from self._on_failure(failure, streaming=True)
                if switch == "poll":
                    self._reading = "poll"
                    self._live = False
                    self.stats.fallbacks_to_polling += 1
            else:
                if (self._mode == "auto"
                        and self._clock() - last_probe >= self._probe_interval):
                    last_probe = self._clock()
                    self._reading = "stream"
                    self._probing = True
                    self._failures = 0
                    continue
                try:
                    caught_up = yield from self._poll_once()
                except _Closed:
                    return
                except grpc.RpcError as error:
                    yield from self._on_failure(_failure(error), streaming=False)
                    continue
                self._failures = 0
                if caught_up:
                    if self._live_signals and not self._live:
                        self._live = True
                        yield FeedItem(LIVE, self._token, self._sequence)
                    self._live = True
                    self._closed.wait(self._poll_interval)

    def _on_failure(self, failure: _Failure, streaming: bool):
        """Relists for an unusable token, raises what retrying cannot fix, else backs off.
        Returns "poll" when streaming should give way to polling."""
        if self._closed.is_set():
            return None
        if (failure.code == grpc.StatusCode.FAILED_PRECONDITION
                and failure.reason in RELIST_REASONS):
            yield from self._relist()
            return None
        if streaming and self._mode == "auto":
            if failure.code == grpc.StatusCode.UNIMPLEMENTED:
                return "poll"
        if failure.code not in _TRANSIENT and not (
                streaming and failure.code == grpc.StatusCode.UNIMPLEMENTED):
            raise failure.error if failure.error is not None else RuntimeError(failure.message)
        if streaming and self._mode == "auto":
            self._failures += 1
            if self._failures >= self._failures_before_poll:
                self._failures = 0
                return "poll"
        else:
            self._failures += 1
        self.stats.retries += 1
        # A server that says when to come back (shutting down, too many watchers) is taken at
        # its word, within reason; otherwise the backoff decides.
        hint = min(failure.retry_delay, _MAX_RETRY_HINT)
        self._closed.wait(max(self._backoff(self._failures), hint))
        return None

    def _backoff(self, failures: int) -> float:
        """Doubles per consecutive failure up to the cap; jittered down by up to half, so
        clients cut off together do not come back together."""
        delay = min(self._max_backoff, self._initial_backoff * 2 ** min(max(failures - 1, 0), 20))
        return delay * (0.5 + self._rng.random() / 2)

    # Reading the feed.

    def _stream(self):
        """Follows one watch stream until it fails (returns the _Failure) or the follower is
        closed (returns None), yielding its events."""
        request = crm_pb2.WatchCustomersRequest(resume_token=self._token)
        if not self._token:
            request.start_position = self._start_position
        # No deadline on the stream itself, which lives as long as it is followed; the open
        # deadline and the idle timeout below bound how long a dead one can go unnoticed.
        call = self._stub.WatchCustomers(request, metadata=self._metadata)
        self.stats.streams_opened += 1
        # Caught up again is signalled again after every reconnect.
        self._live = False
        if not self._track(call):
            call.cancel()
            return None
        messages: queue.Queue = queue.Queue(maxsize=_READ_AHEAD)
        stop = threading.Event()
        reader = threading.Thread(target=read_stream, args=(call, messages, stop),
                                  name="mip-client-watch", daemon=True)
        reader.start()
        opened = progressed = False
        beats = 0
        try:
            while True:
                # Opening has the unary calls' deadline, as in the engine; once open, the
                # stream may be quiet up to the idle timeout (heartbeats come more often).
                try:
                    kind, payload = messages.get(
                        timeout=self._idle_timeout if opened else self._call_timeout)
                except queue.Empty:
                    why = (f"no event or heartbeat for {self._idle_timeout} s" if opened else
                           f"opening the watch stream took over {self._call_timeout} s")
                    return _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, why, progressed=progressed)
                if self._closed.is_set():
                    return None
                if kind == "open":
                    opened = True
                    if self._probing:
                        # The engine goes back to streaming as soon as a probe stream opens.
                        self._probing = False
                        self.stats.returns_to_streaming += 1
                    continue
                if kind == "end":
                    if payload is None:
                        return _Failure(grpc.StatusCode.UNAVAILABLE,
                                        "CRM ended the watch stream", progressed=progressed)
                    return _failure(payload, progressed)
                progressed = True
                which = payload.WhichOneof("kind")
                if which == "event":
                    item = self._accept(payload.event)
                    if item is not None:
                        yield item
                elif which == "heartbeat":
                    beat = payload.heartbeat
                    self._advance(beat.resume_token, beat.sequence)
                    first_heartbeat, beats = beats == 0, beats + 1
                    if _caught_up(beat, first_heartbeat) and not self._live:
                        self._live = True
                        if self._live_signals:
                            yield FeedItem(LIVE, self._token, self._sequence)
        finally:
            stop.set()
            call.cancel()
            self._track(None)

    def _poll_once(self):
        """One ListCustomerEvents call, yielding its events. Returns whether the follower is
        caught up (the page was empty and nothing remains)."""
        request = crm_pb2.ListCustomerEventsRequest(resume_token=self._token,
                                                    page_size=self._page_size)
        if not self._token:
            request.start_position = self._start_position
        response = self._unary(self._stub.ListCustomerEvents, request)
        for event in response.events:
            if self._closed.is_set():
                return False
            item = self._accept(event)
            if item is not None:
                yield item
        self._advance(response.next_resume_token, response.next_sequence)
        return not response.events and response.remaining_events == 0

    def _relist(self):
        """Yields every current customer as RELISTED, then moves the token to the listing's
        snapshot: the position when its first page was read, so that no change after it is
        missed. Until the last customer is yielded, items carry the old token: a follower
        resumed from one relists again rather than skip the customers not yet seen."""
        self.stats.relists += 1
        page_token = ""
        snapshot = None
        failures = 0
        while not self._closed.is_set():
            request = crm_pb2.ListCustomersRequest(page_size=self._page_size,
                                                   page_token=page_token)
            try:
                page = self._unary(self._stub.ListCustomers, request)
            except _Closed:
                return
            except grpc.RpcError as error:
                if error.code() not in _TRANSIENT:
                    raise
                # Retry the same page: the customers already yielded are not yielded again.
                failures += 1
                self.stats.retries += 1
                self._closed.wait(self._backoff(failures))
                continue
            failures = 0
            if snapshot is None:
                snapshot = (page.resume_token, page.resume_sequence)
            last_page = not page.next_page_token
            for index, customer in enumerate(page.customers):
                if last_page and index == len(page.customers) - 1:
                    self._reset(*snapshot)
                yield FeedItem(RELISTED, self._token, snapshot[1], customer=customer)
            if last_page:
                self._reset(*snapshot)
                return
            page_token = page.next_page_token

    # Position bookkeeping.

    def _accept(self, event: crm_pb2.CustomerEvent) -> Optional[FeedItem]:
        """The item for an event, or None if one at or past its position was already passed."""
        if self._sequence and event.sequence <= self._sequence:
            self.stats.duplicates_dropped += 1
            return None
        self._token = event.resume_token
        self._sequence = event.sequence
        return FeedItem(EVENT, self._token, self._sequence, event=event, customer=event.customer)

    def _advance(self, token: str, sequence: int) -> None:
        """Moves to a position announced without an event (a heartbeat, an empty poll)."""
        if token and sequence >= self._sequence:
            self._token = token
            self._sequence = sequence

    def _reset(self, token: str, sequence: int) -> None:
        """Jumps to a relist's snapshot, even backwards: a replaced database numbers its log
        anew."""
        self._token = token
        self._sequence = sequence
        self._live = False

    # Calls that close() can interrupt.

    def _track(self, call) -> bool:
        """Makes `call` the one close() cancels; False if the follower is already closed."""
        with self._lock:
            self._call = call
            return call is None or not self._closed.is_set()

    def _unary(self, method, request):
        future = method.future(request, timeout=self._call_timeout, metadata=self._metadata)
        if not self._track(future):
            future.cancel()
            raise _Closed()
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise _Closed() from None
        except grpc.RpcError:
            if self._closed.is_set():
                raise _Closed() from None
            raise
        finally:
            self._track(None)


def _caught_up(beat: crm_pb2.Heartbeat, first: bool) -> bool:
    """Whether a heartbeat says the stream has caught up. CRM sets `caught_up` on the one it
    sends as soon as the stream has replayed its backlog, always the stream's first heartbeat;
    servers older than the field (or contracts without it) sent heartbeats only once caught
    up, so a stream's first heartbeat says so whatever its flag."""
    if "caught_up" in beat.DESCRIPTOR.fields_by_name and getattr(beat, "caught_up"):  # noqa: B009
        return True
    return first


def follow_customers(
    target: Union[grpc.Channel, crm_pb2_grpc.CrmServiceStub],
    *,
    token: str = "",
    start_position: Union[str, int] = "earliest",
    mode: str = "auto",
    poll_interval: float = 0.5,
    page_size: int = 1000,
    stream_probe_interval: float = 10.0,
    stream_failures_before_poll: int = 3,
    idle_timeout: float = 30.0,
    call_timeout: float = 5.0,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    live_signals: bool = False,
    metadata: Optional[Sequence[Tuple[str, str]]] = None,
    rng: Optional[random.Random] = None,
    clock: Callable[[], float] = time.monotonic,
) -> CustomerFollower:
    """Follows CRM's customer feed; iterate over the result for `FeedItem`s.

    target: a channel to CRM, or a CrmServiceStub.
    token: a saved resume token (`item.token` or `follower.token`); empty to start at
        `start_position`, "earliest" (every event CRM still keeps) or "latest" (only new
        ones).
    mode: "auto" streams (WatchCustomers) and polls (ListCustomerEvents) when the stream is
        UNIMPLEMENTED or fails `stream_failures_before_poll` times in a row without
        delivering anything, trying the stream again every `stream_probe_interval` seconds;
        "stream" or "poll" use one only. A probe that opens a stream ends the polling.
    poll_interval: seconds between polls once caught up.
    page_size: events per poll and customers per relist page.
    idle_timeout: a stream silent for this long (no event, no heartbeat) is reconnected;
        keep it above CRM's heartbeat interval (5 s by default).
    call_timeout: deadline of every unary call (polls, relist pages) and of opening the
        watch stream.
    initial_backoff, max_backoff: reconnect backoff after a failure, doubled per consecutive
        failure up to the cap, each jittered down by up to half.
    live_signals: also yield a LIVE item each time the follower catches up with the log.
    metadata: sent with every call, for example [("authorization", "Bearer ...")].
    rng, clock: the jitter source and the clock, replaceable in tests.

    Items come in log order and no event is yielded twice by one follower, across reconnects
    and fallbacks. When the token is no longer usable (FAILED_PRECONDITION with reason
    RESUME_TOKEN_EXPIRED or RESUME_TOKEN_UNKNOWN_LOG) every current customer is yielded once
    as a RELISTED item, and the feed continues from the listing's snapshot. Errors that
    retrying cannot fix (INVALID_ARGUMENT for a malformed token, OUT_OF_RANGE for a token
    ahead of the log, UNAUTHENTICATED, ...) are raised from the iteration as the call's
    grpc.RpcError.
    """
    return CustomerFollower(
        target, token=token, start_position=start_position, mode=mode,
        poll_interval=poll_interval, page_size=page_size,
        stream_probe_interval=stream_probe_interval,
        stream_failures_before_poll=stream_failures_before_poll, idle_timeout=idle_timeout,
        call_timeout=call_timeout, initial_backoff=initial_backoff, max_backoff=max_backoff,
        live_signals=live_signals, metadata=metadata, rng=rng, clock=clock,
    )
