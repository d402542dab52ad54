"""The follower's rules, against a scripted CRM double: what the real server cannot easily be
made to do on cue (replay events already delivered, fail a stream exactly three times, page a
relist across a snapshot change). Time and jitter are injected; no network, no processes.
"""

import datetime
import threading
import time
import unittest

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from mip_client import EVENT, LIVE, RELISTED, follow_customers
from mip_client.follower import RELIST_REASONS
from mip_client.crm.v1 import crm_pb2
from mip_processes import bound

FAST = {"poll_interval": 0.01, "initial_backoff": 0.001, "max_backoff": 0.004,
        "call_timeout": 1.0, "idle_timeout": 5.0}


class FakeError(grpc.RpcError):
    """A failed call, with an ErrorInfo reason and a RetryInfo delay in its details when given
    them."""

    def __init__(self, code: grpc.StatusCode, reason: str = "", retry_after: float = 0.0):
        super().__init__(code.name)
        self._code = code
        self._reason = reason
        self._retry_after = retry_after

    def code(self):
        return self._code

    def details(self):
        return f"scripted {self._code.name}"

    def trailing_metadata(self):
        details = []
        if self._reason:
            details.append(any_pb2.Any())
            details[-1].Pack(error_details_pb2.ErrorInfo(reason=self._reason,
                                                         domain="crm.mip.example.com"))
        if self._retry_after:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=self._retry_after))
            details.append(any_pb2.Any())
            details[-1].Pack(retry)
        if not details:
            return ()
        status = status_pb2.Status(code=self._code.value[0], message="x", details=details)
        return (("grpc-status-details-bin", status.SerializeToString()),)


HOLD = object()  # the stream stays open, silent, until cancelled
NEVER_OPENS = object()  # as the first step: the server never answers the call


class FakeStream:
    def __init__(self, script):
        self.script = script
        self.cancelled = threading.Event()

    def __iter__(self):
        for step in self.script:
            if step is NEVER_OPENS:
                continue
            if step is HOLD:
                self.cancelled.wait(10)
                raise FakeError(grpc.StatusCode.CANCELLED)
            if isinstance(step, Exception):
                raise step
            yield step

    def initial_metadata(self):
        if self.script and self.script[0] is NEVER_OPENS:
            self.cancelled.wait(10)
        return ()

    def done(self):
        # A stream whose script starts with an error was refused before it opened.
        return bool(self.script) and isinstance(self.script[0], Exception)

    def cancel(self):
        self.cancelled.set()


class FakeFuture:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self):
        return False


class FakeUnary:
    def __init__(self, outcomes, last=None):
        self.outcomes = list(outcomes)
        self.last = last
        self.requests = []

    def future(self, request, timeout=None, metadata=None):
        assert timeout, "every unary call needs a deadline"
        self.requests.append(request)
        outcome = self.outcomes.pop(0) if self.outcomes else self.last
        return FakeFuture(outcome)


class FakeCrm:
    """Hands out the scripted streams in order; unary calls answer from their lists."""

    def __init__(self, streams, events=(), customers=(), events_after=None):
        self.streams = list(streams)
        self.watch_requests = []
        self.ListCustomerEvents = FakeUnary(events, last=events_after
                                            or crm_pb2.ListCustomerEventsResponse())
        self.ListCustomers = FakeUnary(customers)

    def WatchCustomers(self, request, metadata=None):
        self.watch_requests.append(request)
        return FakeStream(self.streams.pop(0) if self.streams else [HOLD])


def event(sequence: int, customer: str = "") -> crm_pb2.WatchCustomersResponse:
    return crm_pb2.WatchCustomersResponse(event=crm_pb2.CustomerEvent(
        event_id=f"e{sequence}", type=crm_pb2.CUSTOMER_EVENT_TYPE_CREATED,
        customer=crm_pb2.Customer(id=customer or f"c{sequence}"),
        resume_token=f"t{sequence}", sequence=sequence))


def heartbeat(sequence: int, caught_up: bool = False) -> crm_pb2.WatchCustomersResponse:
    """A heartbeat; `caught_up` for the one CRM sends once a stream has replayed its backlog
    (set where the contract has the field: without it, every heartbeat means caught up)."""
    beat = crm_pb2.Heartbeat(resume_token=f"t{sequence}", sequence=sequence)
    if "caught_up" in beat.DESCRIPTOR.fields_by_name:
        beat.caught_up = caught_up
    return crm_pb2.WatchCustomersResponse(heartbeat=beat)


def page(*sequences: int, remaining: int = 0) -> crm_pb2.ListCustomerEventsResponse:
    events = [event(s).event for s in sequences]
    last = sequences[-1] if sequences else 0
    return crm_pb2.ListCustomerEventsResponse(
        events=events, next_resume_token=f"t{last}", next_sequence=last,
        remaining_events=remaining)


def take(follower, count: int) -> list:
    return [next(follower) for _ in range(count)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FollowerRulesTest(unittest.TestCase):
    def setUp(self):
        # A follower that waits for an item the script never sends would wait for good.
        bound(self, 10)

    def follow(self, crm, **options):
        follower = follow_customers(crm, **{**FAST, **options})
        self.addCleanup(follower.close)
        return follower

    def test_events_at_or_below_the_last_yielded_sequence_are_dropped_after_a_reconnect(self):
        unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
        crm = FakeCrm([[event(1), event(2), event(3), unavailable],
                       [event(2), event(3), event(4), HOLD]])
        follower = self.follow(crm)
        items = take(follower, 4)
        self.assertEqual([i.sequence for i in items], [1, 2, 3, 4])
        self.assertEqual(follower.stats.duplicates_dropped, 2)
        self.assertEqual(crm.watch_requests[1].resume_token, "t3",
                         "the reconnect must resume from the last yielded event")
        self.assertEqual(follower.token, "t4")

    def test_unimplemented_switches_to_polling_at_once_and_a_later_probe_streams_again(self):
        clock = Clock()
        crm = FakeCrm([[FakeError(grpc.StatusCode.UNIMPLEMENTED)], [event(3), HOLD]],
                      events=[page(1, 2, remaining=0)])
        follower = self.follow(crm, clock=clock, stream_probe_interval=10)
        self.assertEqual([i.sequence for i in take(follower, 2)], [1, 2])
        self.assertEqual(follower.mode, "poll")
        self.assertEqual(follower.stats.fallbacks_to_polling, 1)
        self.assertEqual(follower.stats.retries, 0, "UNIMPLEMENTED must not back off first")
        clock.now += 10
        self.assertEqual(next(follower).sequence, 3)
        self.assertEqual(follower.mode, "stream")
        self.assertEqual(follower.stats.returns_to_streaming, 1)
        self.assertEqual(crm.watch_requests[1].resume_token, "t2")

    def test_a_probe_stream_that_opens_ends_polling_before_anything_arrives(self):
        clock = Clock()
        crm = FakeCrm([[FakeError(grpc.StatusCode.UNIMPLEMENTED)], [HOLD]],
                      events=[page(1)])
        follower = self.follow(crm, clock=clock, stream_probe_interval=10)
        self.assertEqual(next(follower).sequence, 1)
        clock.now += 10
        consumer = threading.Thread(target=lambda: list(follower), daemon=True)
        consumer.start()
        while follower.stats.returns_to_streaming == 0 and consumer.is_alive():
            consumer.join(0.01)
        self.assertEqual((follower.mode, follower.stats.returns_to_streaming), ("stream", 1))
        follower.close()
        consumer.join(5)
        self.assertFalse(consumer.is_alive())

    def test_a_stream_that_never_opens_fails_at_the_call_deadline(self):
        crm = FakeCrm([[NEVER_OPENS], [event(1), HOLD]])
        follower = self.follow(crm, call_timeout=0.05, idle_timeout=5.0)
        self.assertEqual(next(follower).sequence, 1)
        self.assertEqual(len(crm.watch_requests), 2)
        self.assertEqual(follower.stats.retries, 1)

    def test_a_probe_that_fails_keeps_polling_without_counting_a_failure(self):
        clock = Clock()
        unimplemented = FakeError(grpc.StatusCode.UNIMPLEMENTED)
        crm = FakeCrm([[unimplemented], [unimplemented]],
                      events=[page(1), page(), page(), page(2)])
        follower = self.follow(crm, clock=clock, stream_probe_interval=10)
        self.assertEqual(next(follower).sequence, 1)
        clock.now += 10
        self.assertEqual(next(follower).sequence, 2)
        self.assertEqual(len(crm.watch_requests), 2)
        self.assertEqual(follower.mode, "poll")
        self.assertEqual((follower.stats.fallbacks_to_polling, follower.stats.retries), (1, 0))

    def test_three_stream_failures_in_a_row_fall_back_to_polling_delivering_restarts_count(self):
        unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
        # Two failures; a stream that delivers, then fails (the count starts again at one);
        # two more failures make three in a row.
        crm = FakeCrm([[unavailable], [unavailable], [event(1), unavailable],
                       [unavailable], [unavailable]],
                      events=[page(2)])
        follower = self.follow(crm, stream_probe_interval=3600)
        self.assertEqual(next(follower).sequence, 1)
        self.assertEqual(follower.mode, "stream")
        self.assertEqual(next(follower).sequence, 2)
        self.assertEqual(follower.mode, "poll")
        self.assertEqual(len(crm.watch_requests), 5)
        self.assertEqual(follower.stats.fallbacks_to_polling, 1)
        self.assertEqual(crm.ListCustomerEvents.requests[0].resume_token, "t1")

    def test_stream_mode_never_falls_back_to_polling(self):
        unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
        crm = FakeCrm([[unavailable]] * 5 + [[event(1), HOLD]])
        follower = self.follow(crm, mode="stream")
        self.assertEqual(next(follower).sequence, 1)
        self.assertEqual(follower.stats.fallbacks_to_polling, 0)
        self.assertEqual(crm.ListCustomerEvents.requests, [])

    def test_backoff_doubles_per_failure_up_to_the_cap_jittered_down_by_at_most_half(self):
        class Fixed:
            def __init__(self, value):
                self.value = value

            def random(self):
                return self.value

        low = follow_customers(FakeCrm([]), initial_backoff=0.1, max_backoff=5.0, rng=Fixed(0.0))
        high = follow_customers(FakeCrm([]), initial_backoff=0.1, max_backoff=5.0,
                                rng=Fixed(0.999999))
        self.assertEqual([round(high._backoff(n), 3) for n in range(1, 9)],
                         [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual([round(low._backoff(n), 3) for n in range(1, 9)],
                         [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])

    def test_relist_items_carry_the_old_token_until_the_last_then_watch_from_the_snapshot(self):
        expired = FakeError(grpc.StatusCode.FAILED_PRECONDITION, "RESUME_TOKEN_EXPIRED")
        customers = [
            crm_pb2.ListCustomersResponse(
                customers=[crm_pb2.Customer(id="a"), crm_pb2.Customer(id="b")],
                next_page_token="p2", resume_token="snapshot", resume_sequence=10),
            FakeError(grpc.StatusCode.UNAVAILABLE),  # retried: the same page again
            crm_pb2.ListCustomersResponse(
                customers=[crm_pb2.Customer(id="c")],
                resume_token="later", resume_sequence=12),
        ]
        crm = FakeCrm([[expired], [event(10, "a"), event(11, "d"), HOLD]], customers=customers)
        follower = self.follow(crm, token="old")
        items = take(follower, 4)
        self.assertEqual([(i.kind, i.customer.id) for i in items],
                         [(RELISTED, "a"), (RELISTED, "b"), (RELISTED, "c"), (EVENT, "d")])
        self.assertEqual([i.token for i in items[:3]], ["old", "old", "snapshot"])
        self.assertEqual([r.page_token for r in crm.ListCustomers.requests], ["", "p2", "p2"])
        self.assertEqual(crm.watch_requests[1].resume_token, "snapshot",
                         "the watch resumes from the first page's snapshot")
        self.assertEqual(follower.stats.duplicates_dropped, 1, "event 10 is in the snapshot")
        self.assertEqual(follower.stats.relists, 1)

    def test_the_other_relist_reason_relists_too_and_a_new_log_may_number_lower(self):
        unknown = FakeError(grpc.StatusCode.FAILED_PRECONDITION, "RESUME_TOKEN_UNKNOWN_LOG")
        crm = FakeCrm([[event(50), unknown], [event(3), HOLD]], customers=[
            crm_pb2.ListCustomersResponse(customers=[crm_pb2.Customer(id="x")],
                                          resume_token="new-log", resume_sequence=2)])
        follower = self.follow(crm)
        items = take(follower, 3)
        self.assertEqual([(i.kind, i.sequence) for i in items],
                         [(EVENT, 50), (RELISTED, 2), (EVENT, 3)])

    def test_heartbeats_move_the_token_and_yield_only_an_optional_live_signal(self):
        script = [event(5), heartbeat(5, caught_up=True), heartbeat(6), event(7), heartbeat(7),
                  event(8), HOLD]
        follower = self.follow(FakeCrm([list(script)]), token="t4", live_signals=True)
        items = take(follower, 4)
        # Live once, where the backlog ends: later events are live too.
        self.assertEqual([(i.kind, i.token) for i in items],
                         [(EVENT, "t5"), (LIVE, "t5"), (EVENT, "t7"), (EVENT, "t8")])
        self.assertTrue(follower.live)
        quiet = self.follow(FakeCrm([list(script)]))
        self.assertEqual([i.sequence for i in take(quiet, 3)], [5, 7, 8])
        self.assertEqual(quiet.token, "t8")

    def test_a_heartbeat_moves_the_token_to_save_without_an_item(self):
        follower = self.follow(FakeCrm([[event(1), heartbeat(9, caught_up=True), HOLD]]))
        self.assertEqual(next(follower).token, "t1")
        consumer = threading.Thread(target=lambda: list(follower), daemon=True)
        consumer.start()
        while follower.token != "t9" and consumer.is_alive():
            consumer.join(0.01)
        self.assertEqual(follower.token, "t9")
        follower.close()
        consumer.join(5)

    def test_a_retry_delay_from_the_server_is_waited_out_before_reconnecting(self):
        shutting_down = FakeError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", retry_after=0.3)
        crm = FakeCrm([[event(1), shutting_down], [event(2), HOLD]])
        follower = self.follow(crm)
        self.assertEqual(next(follower).sequence, 1)
        started = time.monotonic()
        self.assertEqual(next(follower).sequence, 2)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)

    def test_a_server_older_than_caught_up_is_live_at_its_first_heartbeat(self):
        # Such a server sent heartbeats only once caught up, and never set the flag.
        crm = FakeCrm([[event(5), heartbeat(5), event(6), heartbeat(6), HOLD]])
        follower = self.follow(crm, live_signals=True)
        self.assertEqual([(i.kind, i.token) for i in take(follower, 3)],
                         [(EVENT, "t5"), (LIVE, "t5"), (EVENT, "t6")])

    def test_live_is_signalled_again_once_caught_up_after_a_reconnect(self):
        unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
        crm = FakeCrm([[heartbeat(5, caught_up=True), heartbeat(5), unavailable],
                       [heartbeat(5, caught_up=True), HOLD]])
        follower = self.follow(crm, token="t5", live_signals=True)
        self.assertEqual([i.kind for i in take(follower, 2)], [LIVE, LIVE])
        self.assertEqual(len(crm.watch_requests), 2)

    def test_the_relist_reasons_are_names_of_crms_error_reason_enum(self):
        from mip_client.crm.v1 import error_reason_pb2

        names = error_reason_pb2.ErrorReason.keys()
        self.assertTrue(set(RELIST_REASONS) <= set(names), names)

    def test_errors_that_retrying_cannot_fix_are_raised(self):
        for code, reason in ((grpc.StatusCode.OUT_OF_RANGE, ""),
                             (grpc.StatusCode.FAILED_PRECONDITION, "SOMETHING_ELSE"),
                             (grpc.StatusCode.UNAUTHENTICATED, "")):
            with self.subTest(code=code):
                follower = self.follow(FakeCrm([[FakeError(code, reason)]]))
                with self.assertRaises(grpc.RpcError) as raised:
                    next(follower)
                self.assertEqual(raised.exception.code(), code)

    def test_a_silent_stream_is_reconnected_after_the_idle_timeout(self):
        crm = FakeCrm([[event(1), HOLD], [event(2), HOLD]])
        follower = self.follow(crm, idle_timeout=0.05)
        self.assertEqual([i.sequence for i in take(follower, 2)], [1, 2])
        self.assertEqual(crm.watch_requests[1].resume_token, "t1")

    def test_close_from_another_thread_ends_an_iteration_blocked_on_the_stream(self):
        follower = self.follow(FakeCrm([[HOLD]]))
        threading.Timer(0.05, follower.close).start()
        self.assertEqual(list(follower), [])


if __name__ == "__main__":
    unittest.main()
