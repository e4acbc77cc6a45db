"""
The backend's cost meter (twistedcluster.backend.cost): fed connection
counts at times of a task.Clock, it says what a connection costs.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from twistedcluster.backend.cost import MIN_EVIDENCE, WINDOW, CostMeter


def serial(meter: CostMeter, clock: Clock, service: float, arrivals) -> None:
    """
    Feed C{meter} a server that serves one connection at a time in
    C{service} seconds, connections arriving at the given times.
    """
    events = []  # (time, +1 / -1)
    free = 0.0
    for t in arrivals:
        start = max(t, free)
        free = start + service
        events.append((t, 1))
        events.append((free, -1))
    count = 0
    for t, delta in sorted(events, key=lambda e: (e[0], e[1])):
        clock.advance(t - clock.seconds())
        count += delta
        meter.changed(count)


def test_without_evidence_a_connection_costs_one_capacity_share():
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    assert meter.measured() is None
    assert meter.cost() == pytest.approx(0.001)
    # A few closes are not yet evidence.
    serial(meter, clock, 0.01, [k * 0.1 for k in range(MIN_EVIDENCE - 1)])
    assert meter.measured() is None
    assert meter.cost() == pytest.approx(0.001)


@pytest.mark.parametrize("service", [0.002, 0.008, 0.015])
def test_one_at_a_time_the_cost_is_the_service_time_whatever_the_queue(service):
    # Requests queue (several arrive at once), yet each costs its service
    # time, not its time in the queue.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    arrivals = []
    for burst in range(100):
        arrivals += [burst * 0.5] * 5  # five at once, twice a second
    serial(meter, clock, service, arrivals)
    assert meter.cost() == pytest.approx(service, rel=0.01)


def test_a_slower_service_costs_more():
    costs = []
    for service in (0.002, 0.008):
        clock = Clock()
        meter = CostMeter(clock, capacity=1000)
        serial(meter, clock, service, [k * 0.02 for k in range(300)])
        costs.append(meter.cost())
    assert costs[1] == pytest.approx(4 * costs[0], rel=0.01)


def test_never_less_than_a_capacity_share():
    # Many short connections served in parallel: the time per close is
    # tiny, the capacity limits the backend.
    clock = Clock()
    meter = CostMeter(clock, capacity=100)
    for k in range(10000):  # a second of it: such gaps are sampled at a bounded rate
        meter.changed(50)
        clock.advance(0.0001)
        meter.changed(49)
    assert meter.measured() < 0.01
    assert meter.cost() == pytest.approx(0.01)


def test_held_connections_closing_together_cost_nothing_each():
    # Clients hold 80 connections for seconds, then close them together
    # (the spread and newcomer benchmarks): a long busy time, then a burst
    # of closes.  That is no service time.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    for round in range(5):
        for k in range(80):
            clock.advance(0.005)
            meter.changed(k + 1)
        clock.advance(2.0)
        for k in range(80):
            clock.advance(0.00001)
            meter.changed(79 - k)
        clock.advance(3.0)
    assert meter.measured() < 0.001
    assert meter.cost() == pytest.approx(0.001)


def test_connections_that_close_rarely_are_counted_not_costed():
    # Always busy, a close a second: whatever it is, it holds connections.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000, horizon=0.25)
    meter.changed(100)
    for k in range(20):
        clock.advance(1.0)
        meter.changed(99)
        meter.changed(100)
        if k >= 12:  # the average of whole gaps is past the horizon
            assert meter.measured() is None
    assert meter.measured() is None
    assert meter.cost() == pytest.approx(0.001)


def test_an_idle_backend_keeps_the_cost_it_showed():
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.008, [k * 0.02 for k in range(300)])
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    clock.advance(3600)
    assert meter.cost() == pytest.approx(0.008, rel=0.01)


def test_the_newer_service_time_takes_over():
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.002, [k * 0.01 for k in range(500)])
    assert meter.cost() == pytest.approx(0.002, rel=0.01)
    start = clock.seconds() + 0.01
    serial(meter, clock, 0.008, [start + k * 0.02 for k in range(500)])
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    start = clock.seconds() + 0.01
    serial(meter, clock, 0.002, [start + k * 0.01 for k in range(500)])
    assert meter.cost() == pytest.approx(0.002, rel=0.01)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        CostMeter(Clock(), capacity=0)
    with pytest.raises(ValueError):
        CostMeter(Clock(), capacity=10, horizon=-1)


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 10_000),
    steps=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 50)), max_size=60),
)
def test_the_cost_is_always_a_finite_number_of_seconds_at_least_a_share(capacity, steps):
    clock = Clock()
    meter = CostMeter(clock, capacity=capacity)
    for wait, count in steps:
        clock.advance(wait)
        meter.changed(count)
        cost = meter.cost()
        assert math.isfinite(cost) and cost >= 1.0 / capacity


def test_a_burst_of_closes_without_service_keeps_the_cost():
    # A queue of 400 requests whose clients gave up closes at once: the
    # service wrote to none of them, and the 8 ms the backend showed stays
    # (it used to fall to 1/capacity until half a window of real closes).
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.008, [k * 0.02 for k in range(100)])
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    meter.changed(400)
    clock.advance(0.001)
    for k in range(400):
        meter.changed(399 - k, served=False)
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    # Served, the same closes are evidence: a backend closing 400
    # connections at once serves in parallel.
    meter.changed(400)
    clock.advance(0.001)
    for k in range(400):
        meter.changed(399 - k)
    assert meter.cost() == pytest.approx(0.001)


def test_a_give_up_burst_spread_over_a_few_milliseconds_keeps_the_cost():
    # The same closes as a proxy passes them on: one every 50 us for 20 ms.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.008, [k * 0.02 for k in range(100)])
    meter.changed(400)
    for k in range(400):
        clock.advance(0.00005)
        meter.changed(399 - k, served=False)
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    # The 20 ms they were open served nobody: the next answered close ends a
    # gap of its own service time only.
    meter.changed(1)
    clock.advance(0.008)
    meter.changed(0)
    assert meter._gaps[-1] == pytest.approx(0.008)


def test_the_busy_time_runs_on_through_a_close_without_service_while_others_wait():
    # One request in service for 8 ms; a probe connects and leaves meanwhile
    # (no answer): the request's close still ends an 8 ms gap.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    meter.changed(1)
    clock.advance(0.003)
    meter.changed(2)
    clock.advance(0.001)
    meter.changed(1, served=False)
    clock.advance(0.004)
    meter.changed(0)
    assert meter._gaps[-1] == pytest.approx(0.008)
    # A probe alone, then a request: the probe's time is not the request's.
    meter.changed(1)
    clock.advance(0.05)
    meter.changed(0, served=False)
    clock.advance(1.0)
    meter.changed(1)
    clock.advance(0.008)
    meter.changed(0)
    assert meter._gaps[-1] == pytest.approx(0.008)


def test_held_connections_closing_a_little_apart_still_cost_a_share():
    # Held connections that their client closes in a loop: some in the
    # same turn, the others a millisecond or two apart.  Each close is one
    # of a served connection, but none took service time: the near-zero
    # gaps keep the cost at 1/capacity (sampling them at a bounded rate let
    # the 1.5 ms gaps take over, and identical backends split 8:12).
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    for _ in range(3):
        meter.changed(20)
        clock.advance(1.0)
        for k in range(10):
            meter.changed(19 - 2 * k)
            meter.changed(18 - 2 * k)
            clock.advance(0.0015)
    assert meter.cost() == pytest.approx(0.001)


def test_closes_faster_than_capacity_allows_take_over_within_a_second():
    # A service that served one at a time in 8 ms starts serving in
    # parallel, a close every 0.1 ms: its cost falls to 1/capacity, after
    # at most a second of it.
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.008, [k * 0.02 for k in range(100)])
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    count = 50
    meter.changed(count)
    for k in range(10000):
        clock.advance(0.0001)
        meter.changed(count - 1)
        meter.changed(count)
        if meter.cost() == pytest.approx(0.001):
            break
    assert meter.cost() == pytest.approx(0.001)
    assert k * 0.0001 < 1.0, k


def test_moved_says_when_the_cost_left_what_was_told():
    clock = Clock()
    meter = CostMeter(clock, capacity=1000)
    serial(meter, clock, 0.004, [k * 0.01 for k in range(40)])
    assert meter.cost() == pytest.approx(0.004, rel=0.01)
    assert not meter.moved(0.1)
    start = clock.seconds() + 0.01
    serial(meter, clock, 0.0042, [start + k * 0.01 for k in range(40)])
    assert not meter.moved(0.1)  # 5%: within the tolerance
    start = clock.seconds() + 0.01
    moved = False
    for k in range(40):
        serial(meter, clock, 0.008, [start + k * 0.02])
        moved = moved or meter.moved(0.1)
    assert moved
    assert meter.cost() == pytest.approx(0.008, rel=0.01)
    assert not meter.moved(0.1)
