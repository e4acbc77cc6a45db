"""
The main process's view of its workers' client-level figures
(L{twistedcluster.balancer.workers.WorkerFigures}): what /metrics reads
in place of the factories of one process.
"""

from twistedcluster.balancer.traffic import Traffic
from twistedcluster.balancer.workers import WorkerFigures


def test_gauges_are_summed_over_live_workers_and_counters_kept():
    traffic = Traffic()
    figures = WorkerFigures(traffic)
    n = len(traffic.connectTime.counts)
    figures.add(0, {"gauges": {"clients": 3, "count": 4, "limit": 10, "paused": 1},
                    "counters": {"waited": 2, "ended": {"proxy|normal": 5}, "bytes": {"a": [7, 8]},
                                 "connect": [1] + [0] * (n - 1) + [0.25, 1]}})
    figures.add(1, {"gauges": {"clients": 2, "count": 2, "limit": 10, "paused": 0},
                    "counters": {"waited": 1, "refused": 4}})
    assert len(figures.proxy.clients) == 5
    assert (figures.limit.count, figures.limit.maxConnections, figures.limit.paused) == (6, 20, False)
    assert figures.proxy.admission.waited == 3
    assert figures.redirect.refused == 4
    assert traffic.ended == {("proxy", "normal"): 5}
    assert traffic.bytes == {"a": [7, 8]}
    assert (traffic.connectTime.count, traffic.connectTime.sum) == (1, 0.25)
    figures.gone(0)
    assert len(figures.proxy.clients) == 2
    assert figures.proxy.admission.waited == 3  # counters outlive the worker
