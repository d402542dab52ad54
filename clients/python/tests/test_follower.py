"""follow_customers against a real CRM: restarts, watching disabled, an expired token.

Every test compares what the follower yielded with what it created: each customer's CREATED
event exactly once, in log order, nothing missing.
"""

import threading
import time
import unittest

import grpc

from mip_client import EVENT, LIVE, RELISTED, error_reason, follow_customers
from mip_client.crm.v1 import crm_pb2, crm_pb2_grpc
from mip_processes import Consumer, Crm, Writer, bound

# Short enough that reconnects and probes happen within a test, long enough that nothing
# spins: the defaults are for production (seconds).
QUICK = dict(
    poll_interval=0.1,
    stream_probe_interval=0.5,
    idle_timeout=5.0,
    call_timeout=2.0,
    initial_backoff=0.05,
    max_backoff=0.5,
)


def created_ids(items) -> list:
    return [i.customer.id for i in items
            if i.kind == EVENT and i.event.type == crm_pb2.CUSTOMER_EVENT_TYPE_CREATED]


class FollowerTest(unittest.TestCase):
    def setUp(self):
        bound(self, 120)

    def assert_exactly_once_in_order(self, items, expected_ids):
        events = [i for i in items if i.kind == EVENT]
        sequences = [i.event.sequence for i in events]
        self.assertEqual(sequences, sorted(set(sequences)),
                         "events repeated or out of log order")
        seen = created_ids(items)
        self.assertEqual(len(seen), len(set(seen)), "a CREATED event was yielded twice")
        self.assertEqual(seen, expected_ids, "CREATED events missing or in the wrong order")

    def test_follows_through_a_crm_crash_and_restart_without_missing_or_repeating(self):
        crm = Crm(self, "--heartbeat-interval", "1s")
        crm.start()
        writer = Writer(crm.channel(self))
        deadline = time.monotonic() + 90
        writer.create(10, deadline)
        consumer = Consumer(self, follow_customers(crm.channel(self), **QUICK))
        consumer.wait_for(lambda items: len(created_ids(items)) >= 10, 30, "the first 10")

        # Customers keep coming while CRM is killed mid-stream and started again.
        writing = threading.Thread(target=writer.create, args=(40, deadline), daemon=True)
        writing.start()
        while len(writer.ids) < 25 and writing.is_alive():
            time.sleep(0.01)
        crm.kill()
        crm.start()
        writing.join(timeout=60)
        self.assertFalse(writing.is_alive(), "the writer did not finish")
        self.assertEqual(len(writer.ids), 50)

        consumer.wait_for(lambda items: len(created_ids(items)) >= 50, 60, "all 50 customers")
        self.assert_exactly_once_in_order(consumer.items, writer.ids)
        self.assertGreaterEqual(consumer.follower.stats.streams_opened, 2,
                                "the follower never reconnected")
        # Had the outage made it fall back to polling, its probes bring it back to the stream.
        consumer.wait_for(lambda items: consumer.follower.mode == "stream", 30, "streaming")

    def test_polls_when_watching_is_disabled_and_streams_again_once_it_is_back(self):
        crm = Crm(self, "--disable-watch")
        crm.start()
        writer = Writer(crm.channel(self))
        deadline = time.monotonic() + 90
        writer.create(25, deadline)
        # A small page, so catching up takes several polls.
        follower = follow_customers(crm.channel(self), page_size=7, **QUICK)
        consumer = Consumer(self, follower)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 25, 30, "25 by polling")
        # Its probes of the stream keep failing (UNIMPLEMENTED) and it keeps polling.
        consumer.wait_for(lambda items: follower.stats.streams_opened >= 3, 30, "two probes")
        self.assertEqual(follower.mode, "poll")
        self.assertGreaterEqual(follower.stats.fallbacks_to_polling, 1)
        writer.create(10, deadline)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 35, 30, "10 more by polling")

        # Watching comes back: the follower's next probe finds it and streams again.
        crm.stop()
        crm.start("--heartbeat-interval", "1s")
        writer.create(10, deadline)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 45, 30, "10 after restart")
        consumer.wait_for(lambda items: follower.stats.returns_to_streaming >= 1, 30,
                          "the follower to stream again")
        self.assertEqual(follower.mode, "stream")
        writer.create(5, deadline)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 50, 30, "5 by streaming")
        self.assert_exactly_once_in_order(consumer.items, writer.ids)

    def test_relists_once_when_retention_has_passed_the_token_then_follows_new_events(self):
        crm = Crm(self, "--event-retention", "3s", "--heartbeat-interval", "1s")
        crm.start()
        channel = crm.channel(self)
        stub = crm_pb2_grpc.CrmServiceStub(channel)
        old_token = stub.ListCustomers(crm_pb2.ListCustomersRequest(), timeout=5).resume_token
        writer = Writer(channel)
        deadline = time.monotonic() + 90
        before = writer.create(6, deadline)
        stub.DeleteCustomer(crm_pb2.DeleteCustomerRequest(id=before[0]), timeout=5)
        current = before[1:]

        # Wait (bounded) until retention has deleted the events the old token needs.
        while True:
            try:
                stub.ListCustomerEvents(
                    crm_pb2.ListCustomerEventsRequest(resume_token=old_token), timeout=5)
            except grpc.RpcError as error:
                self.assertEqual(error.code(), grpc.StatusCode.FAILED_PRECONDITION)
                self.assertEqual(error_reason(error), "RESUME_TOKEN_EXPIRED")
                break
            self.assertLess(time.monotonic(), deadline, "retention never passed the token")
            time.sleep(0.1)

        follower = follow_customers(channel, token=old_token, **QUICK)
        consumer = Consumer(self, follower)
        consumer.wait_for(lambda items: len(items) >= len(current), 30, "the relist")
        relisted = [i for i in consumer.items if i.kind == RELISTED]
        self.assertEqual([i.customer.id for i in relisted], current,
                         "the relist must yield every current customer once, in order")
        self.assertTrue(all(i.relisted and i.event is None for i in relisted))
        # Until the last relisted customer, resuming must relist again rather than skip any.
        self.assertTrue(all(i.token == old_token for i in relisted[:-1]))
        self.assertNotEqual(relisted[-1].token, old_token)
        self.assertEqual(follower.stats.relists, 1)

        after = writer.create(5, deadline)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 5, 30, "the new customers")
        self.assertEqual(created_ids(consumer.items), after)
        self.assertEqual(follower.stats.relists, 1)
        self.assertEqual([i.kind for i in consumer.items], [RELISTED] * 5 + [EVENT] * 5)

    def test_a_saved_token_resumes_right_after_the_last_handled_item(self):
        crm = Crm(self, "--heartbeat-interval", "1s")
        crm.start()
        channel = crm.channel(self)
        writer = Writer(channel)
        deadline = time.monotonic() + 60
        writer.create(10, deadline)
        saved = None
        with follow_customers(channel, **QUICK) as follower:
            for index, item in enumerate(follower):
                saved = item.token
                if index == 3:
                    break
        writer.create(5, deadline)
        consumer = Consumer(self, follow_customers(channel, token=saved, **QUICK))
        consumer.wait_for(lambda items: len(created_ids(items)) >= 11, 30, "the rest")
        self.assert_exactly_once_in_order(consumer.items, writer.ids[4:])

    def test_the_live_signal_comes_once_the_backlog_has_been_yielded(self):
        crm = Crm(self, "--heartbeat-interval", "1s")
        crm.start()
        channel = crm.channel(self)
        writer = Writer(channel)
        deadline = time.monotonic() + 60
        writer.create(10, deadline)
        follower = follow_customers(channel, live_signals=True, **QUICK)
        consumer = Consumer(self, follower)
        consumer.wait_for(lambda items: any(i.kind == LIVE for i in items), 30, "live")
        self.assertTrue(follower.live)
        writer.create(3, deadline)
        consumer.wait_for(lambda items: len(created_ids(items)) >= 13, 30, "3 live events")
        self.assertEqual([i.kind for i in consumer.items[:14]], [EVENT] * 10 + [LIVE] + [EVENT] * 3)
        self.assert_exactly_once_in_order(consumer.items, writer.ids)

    def test_close_stops_a_follower_waiting_on_an_idle_stream_promptly(self):
        crm = Crm(self, "--heartbeat-interval", "1s")
        crm.start()
        follower = follow_customers(crm.channel(self), **QUICK)
        consumer = Consumer(self, follower)
        # A heartbeat has given it a token: it is on the stream, waiting for events.
        consumer.wait_for(lambda items: follower.token != "", 30, "a heartbeat")
        started = time.monotonic()
        consumer.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIsNone(consumer.error)
        self.assertEqual(follower.mode, "stream")

    def test_a_malformed_token_is_raised_not_retried(self):
        crm = Crm(self)
        crm.start()
        follower = follow_customers(crm.channel(self), token="not-a-token", **QUICK)
        with self.assertRaises(grpc.RpcError) as raised:
            next(follower)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        follower.close()


if __name__ == "__main__":
    unittest.main()
