"""
The passive health check: who is to blame, ejection and readmission, on a
Clock.
"""

import pytest
from twisted.internet.task import Clock

from twistedcluster.balancer.passivehealth import PassiveHealth, blames
from twistedcluster.core.pool import Pool, State


@pytest.mark.parametrize(
    "clean, clientDone, elapsed, expected",
    [
        (False, False, 0.1, True),  # a reset, early
        (False, True, 0.1, True),  # a reset even after the client's EOF
        (True, False, 0.1, True),  # closed before the client was done
        (True, True, 0.1, False),  # a service that only reads
        (False, False, 3.0, False),  # past the window: it served a while
    ],
)
def test_blames(clean, clientDone, elapsed, expected):
    assert blames(clean, clientDone, elapsed, window=3.0) is expected


def pool(*names):
    p = Pool()
    for n in names:
        p.register(n, "h", 1)
    p.maxEjectedPercent = 100
    return p


def test_failures_in_a_row_take_a_backend_out_for_a_while(logged):
    p, clock = pool("a", "b"), Clock()
    health = PassiveHealth(p, clock, ejectAfter=2, ejectFor=10)
    health.failed("a", 1)
    assert p.get("a").state is State.UP
    health.failed("a", 2)
    assert p.get("a").state is State.DOWN
    clock.advance(10)
    assert p.get("a").state is State.UP
    assert any("is tried again" in line for line in logged)


def test_an_early_close_counts_only_when_the_backend_is_to_blame():
    p, clock = pool("a", "b"), Clock()
    health = PassiveHealth(p, clock, ejectAfter=2, ejectFor=10, earlyCloseWindow=3)
    health.endedEarly("a", clean=True, clientDone=True, madeAt=0)  # not to blame
    assert p.get("a").failures == 0
    health.endedEarly("a", clean=False, clientDone=False, madeAt=0)
    health.endedEarly("a", clean=False, clientDone=False, madeAt=0)
    assert p.get("a").state is State.DOWN


def test_stopping_cancels_readmissions():
    p, clock = pool("a", "b"), Clock()
    health = PassiveHealth(p, clock, ejectAfter=1, ejectFor=10)
    health.failed("a", 1)
    health.stop()
    assert not clock.getDelayedCalls()


def test_the_share_of_ejections_is_kept():
    p, clock = pool("a", "b"), Clock()
    p.maxEjectedPercent = 50
    health = PassiveHealth(p, clock, ejectAfter=1, ejectFor=10)
    health.failed("a", 1)
    health.failed("b", 1)
    assert [s.state for s in p.snapshot()].count(State.DOWN) == 1
    assert health.ejectionsSkipped == 1
