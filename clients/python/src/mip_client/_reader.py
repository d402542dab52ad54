"""The thread that reads one watch stream for the follower.

grpc's blocking stream iterator cannot be waited on with a timeout, and close() from another
thread must interrupt it: the follower reads from this thread's queue instead, with its idle
timeout, and cancelling the call ends the thread. The queue is bounded, so a slow consumer
holds the server back (HTTP/2 flow control) instead of filling memory.
"""

import queue
import threading

import grpc


def _offer(messages: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts `item` on the queue unless the follower stops reading first."""
    while not stop.is_set():
        try:
            messages.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def read_stream(call, messages: queue.Queue, stop: threading.Event) -> None:
    """Reads one watch stream onto `messages`: ("open", None) once the server has accepted
    it, then ("message", each message), ending with ("end", the error or None)."""
    end = None
    try:
        # Returns once the server has answered: with headers for a stream it accepted, or
        # with the call already over for one it refused (UNIMPLEMENTED, an expired token).
        call.initial_metadata()
        if not call.done() and not _offer(messages, ("open", None), stop):
            return
        for message in call:
            if not _offer(messages, ("message", message), stop):
                return
    except grpc.RpcError as error:
        end = error
    _offer(messages, ("end", end), stop)
