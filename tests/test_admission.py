"""
The wait queue for clients that find every backend at capacity, on a Clock.
"""

from twisted.internet.task import Clock

from twistedcluster.balancer.admission import WaitQueue
from twistedcluster.core.pool import Pool


class Client:
    def __init__(self, log, name):
        self.log = log
        self.name = name

    def retry(self):
        self.log.append((self.name, "retry"))

    def refuse(self, why):
        self.log.append((self.name, "refuse", why))


def fullPool():
    pool = Pool()
    pool.register("a", "h", 1, capacity=1, connections=1)
    return pool


def test_waiters_are_retried_oldest_first_when_room_frees_up():
    pool, clock, log = fullPool(), Clock(), []
    queue = WaitQueue(pool, clock, size=10, timeout=5)
    for name in ("first", "second"):
        c = Client(log, name)
        queue.enqueue(c, c.retry, c.refuse)
    assert len(queue) == 2
    pool.report("a", connections=0, load=0.0)  # room
    assert log == []  # not from inside the pool's change
    clock.advance(0)
    assert log == [("first", "retry"), ("second", "retry")]
    assert len(queue) == 0


def test_a_waiter_is_refused_after_the_timeout_and_a_full_queue_at_once():
    pool, clock, log = fullPool(), Clock(), []
    queue = WaitQueue(pool, clock, size=1, timeout=5)
    a, b = Client(log, "a"), Client(log, "b")
    queue.enqueue(a, a.retry, a.refuse)
    queue.enqueue(b, b.retry, b.refuse)
    assert log == [("b", "refuse", "every backend is at capacity and 1 clients already wait")]
    clock.advance(5)
    assert log[-1] == ("a", "refuse", "every backend stayed at capacity for 5 s")
    assert len(queue) == 0 and not clock.getDelayedCalls()


def test_a_client_that_leaves_is_neither_retried_nor_refused():
    pool, clock, log = fullPool(), Clock(), []
    queue = WaitQueue(pool, clock, size=10, timeout=5)
    c = Client(log, "c")
    queue.enqueue(c, c.retry, c.refuse)
    queue.dequeue(c)
    pool.report("a", connections=0, load=0.0)
    clock.advance(10)
    assert log == [] and c not in queue


def test_closing_refuses_everyone_waiting():
    pool, clock, log = fullPool(), Clock(), []
    queue = WaitQueue(pool, clock, size=10, timeout=5)
    c = Client(log, "c")
    queue.enqueue(c, c.retry, c.refuse)
    queue.close("stopping")
    assert log == [("c", "refuse", "stopping")]
    assert not clock.getDelayedCalls()


def test_a_client_waiting_for_a_workers_share_waits_past_the_queue_size():
    """
    --queue-size 0 refuses at once when the cluster is full; a client that
    lacks only its worker's share of the room (forShare) waits for it,
    up to the default queue size, and is retried once the share comes.
    """
    pool, clock, log = Pool(), Clock(), []
    pool.register("a", "h", 1, capacity=2)
    pool.setQuota("a", 0)
    assert pool.get("a").full and not pool.candidates()
    queue = WaitQueue(pool, clock, size=0, timeout=5)
    full = Client(log, "full")
    queue.enqueue(full, full.retry, full.refuse)
    assert log[0][:2] == ("full", "refuse")
    waiter = Client(log, "waiter")
    queue.enqueue(waiter, waiter.retry, waiter.refuse, forShare=lambda: True)
    assert len(queue) == 1
    pool.setQuota("a", 1)  # the share comes
    clock.advance(0)
    assert log[1:] == [("waiter", "retry")]


def test_clients_past_the_queue_size_are_refused_once_the_room_they_wait_for_is_gone():
    """
    --queue-size 0: clients waiting for a worker's share are refused as
    soon as the cluster has no room left (not after the queue's timeout).
    """
    pool, clock, log = Pool(), Clock(), []
    pool.register("a", "h", 1, capacity=2)
    pool.setQuota("a", 0)
    queue = WaitQueue(pool, clock, size=0, timeout=5)
    room = [True]
    waiters = [Client(log, f"w{i}") for i in range(3)]
    for w in waiters:
        queue.enqueue(w, w.retry, w.refuse, forShare=lambda: room[0])
    assert len(queue) == 3 and log == []
    room[0] = False  # another worker took the room
    pool.report("a", connections=2, load=1.0)
    clock.advance(0)
    assert [(name, what) for name, what, *_ in log] == [(f"w{i}", "refuse") for i in range(3)]
    assert len(queue) == 0 and clock.getDelayedCalls() == []


def test_room_on_a_backend_tried_does_not_wake_a_client_and_a_woken_client_keeps_its_deadline():
    """
    A client whose connect to a failed: room on a alone leaves it waiting
    (it would be woken and queued again on every change); room on b wakes
    it.  Queued again with its first deadline, it is refused by that
    deadline, not a whole timeout after its last wake.
    """
    pool, clock, log = Pool(), Clock(), []
    pool.register("a", "h", 1, capacity=2)
    pool.register("b", "h", 2, capacity=2, connections=2)
    queue = WaitQueue(pool, clock, size=10, timeout=5)
    c = Client(log, "c")
    queue.enqueue(c, c.retry, c.refuse, exclude={"a"}, deadline=5)
    pool.report("a", connections=0, load=0.0)  # a changes, has room
    clock.advance(1)
    assert log == [] and c in queue
    pool.report("b", connections=1, load=0.5)
    clock.advance(0)
    assert log == [("c", "retry")]
    # b's room went to another: it waits again, by its first deadline.
    queue.enqueue(c, c.retry, c.refuse, exclude={"a"}, deadline=5)
    clock.advance(3.9)
    assert log == [("c", "retry")]
    clock.advance(0.1)
    assert log[-1][:2] == ("c", "refuse") and c not in queue


def test_past_the_queue_size_each_client_is_refused_only_once_its_own_room_is_gone():
    """
    Two clients wait past --queue-size 0 for a worker's share, one of them
    having tried b: when the room beyond the share is gone on a only, the
    one that may go only to a is refused, the other waits on (the last to
    come decided for all before).
    """
    pool, clock, log = Pool(), Clock(), []
    pool.register("a", "h", 1, capacity=2)
    pool.setQuota("a", 0)
    queue = WaitQueue(pool, clock, size=0, timeout=5)
    room = {"a": True, "b": True}
    forB, forA = Client(log, "forB"), Client(log, "forA")
    queue.enqueue(forB, forB.retry, forB.refuse, forShare=lambda: room["a"] or room["b"])
    queue.enqueue(forA, forA.retry, forA.refuse, forShare=lambda: room["a"], exclude={"b"})
    room["a"] = False
    pool.report("a", connections=2, load=1.0)
    clock.advance(0)
    assert [name for name, *_ in log] == ["forA"] and forB in queue
    room["b"] = False
    pool.report("a", connections=1, load=0.5)
    clock.advance(0)
    assert [name for name, *_ in log] == ["forA", "forB"] and len(queue) == 0
