"""
The once-an-interval log summary shared by the limits, the proxy and the
redirect listener.
"""

from twisted.internet.task import Clock

from twistedcluster.summary import Summary, window


def test_the_first_is_told_at_once_the_rest_summed_once_an_interval():
    clock = Clock()
    told = []
    summary = Summary(clock, lambda counts, seconds: told.append((counts, seconds)))
    for _ in range(100):
        summary.count("no backend available")
    summary.add(other=2)
    assert told == [({"no backend available": 1}, 0.0)]
    clock.advance(0.5)
    assert len(told) == 1
    clock.advance(0.5)
    assert told[1] == ({"no backend available": 99, "other": 2}, 1.0)
    # Quiet for a while: the next is told at once again.
    clock.advance(5)
    summary.count("x")
    assert told[2] == ({"x": 1}, 5.0)
    assert len(told) == 3


def test_stopping_tells_what_is_pending_at_once():
    # A service that stops (a listener closing on SIGTERM) must not drop
    # the last line: the process may be gone before the interval is over.
    clock = Clock()
    told = []
    summary = Summary(clock, lambda counts, seconds: told.append(counts))
    summary.count("a")
    summary.count("a")
    summary.stop()
    assert told == [{"a": 1}, {"a": 1}]
    assert not clock.getDelayedCalls()
    clock.advance(10)
    assert len(told) == 2
    summary.stop()  # nothing pending: nothing told
    assert len(told) == 2


def test_a_line_names_the_newest_example_of_what_it_sums():
    # One client among a thousand refused is what the line shows: the
    # newest, as it stands when the line is told.
    clock = Clock()
    told = []
    summary = Summary(clock, lambda counts, seconds: told.append((sum(counts.values()), summary.last)))
    assert summary.last is None
    summary.count("refused", example="10.0.0.1")
    summary.count("refused", example="10.0.0.2")
    summary.count("refused")  # no example: the one before stands
    clock.advance(1)
    assert told == [(1, "10.0.0.1"), (2, "10.0.0.2")]


def test_window_text():
    assert window(0.0) == "just now"
    assert window(1.25) == "in the last 1.2 s"
