"""
The access log: its formats, its writer thread, and how each way a client
connection can end is told (with in-memory transports; the end-to-end test
with real processes is in tests/test_e2e_observe.py).
"""

import io
import json
import threading

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twistedcluster.balancer import accesslog
from twistedcluster.balancer.accesslog import AccessLog, Record, formatJSON, formatText
from twistedcluster.balancer.proxy import ProxyFactory
from twistedcluster.balancer.traffic import Histogram, Traffic
from twistedcluster.core.cluster import Cluster

from tests.test_proxy import clusterOf, completeConnect, failConnect, startClient

RECORD = Record(
    time=1764607200.1234,
    listener="proxy",
    client="127.0.0.1:53422",
    backend="web1",
    attempts=1,
    connect=0.000412,
    duration=0.0123,
    bytesIn=64,
    bytesOut=65,
    end="client_closed",
)


def test_text_is_one_line_of_key_values_after_the_time():
    assert formatText(RECORD) == (
        "2025-12-01T16:40:00.123Z proxy client=127.0.0.1:53422 backend=web1 "
        "attempts=1 connect_ms=0.412 duration_ms=12.300 bytes_in=64 bytes_out=65 "
        "end=client_closed\n"
    )
    none = formatText(Record(0.5, "redirect", "?", None, 0, None, 0.0, 0, 0, "refused_no_backend"))
    assert "backend=- attempts=0 connect_ms=- " in none
    assert none.startswith("1970-01-01T00:00:00.500Z redirect ")


def test_json_has_the_same_fields():
    line = formatJSON(RECORD)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2025-12-01T16:40:00.123Z",
        "listener": "proxy",
        "client": "127.0.0.1:53422",
        "backend": "web1",
        "attempts": 1,
        "connect_ms": 0.412,
        "duration_ms": 12.3,  # 12.300 in the text
        "bytes_in": 64,
        "bytes_out": 65,
        "end": "client_closed",
    }


class Output(io.RawIOBase):
    """A stream the writer thread writes to; a test may hold it."""

    def __init__(self, gate=None):
        self.chunks = []
        self.gate = gate
        self.isClosed = False

    def write(self, b):
        if self.gate is not None:
            self.gate.wait(10)
        self.chunks.append(bytes(b))
        return len(b)

    def close(self):
        self.isClosed = True

    def text(self):
        return b"".join(self.chunks).decode()


def waitClosed(clock, d):
    for _ in range(2000):
        if d.called:
            return
        clock.advance(0.01)
        threading.Event().wait(0.001)
    raise AssertionError("the access log did not close")


def test_records_are_buffered_then_written_by_the_thread_on_a_timer():
    clock = Clock()
    out = Output()
    log = AccessLog(clock, out, "json")
    log.start()
    log.add(RECORD)
    log.add(RECORD)
    assert out.chunks == [] and log.written == 0  # buffered on the reactor
    clock.advance(accesslog.FLUSH_INTERVAL)
    assert log.written == 2
    waitClosed(clock, log.close())
    assert out.isClosed
    assert [json.loads(x)["end"] for x in out.text().splitlines()] == ["client_closed"] * 2


def test_a_blocked_output_drops_whole_chunks_instead_of_blocking(logged):
    clock = Clock()
    gate = threading.Event()
    out = Output(gate)
    log = AccessLog(clock, out)
    log.start()
    for _ in range(accesslog.QUEUE_CHUNKS + 3):
        log.add(RECORD)
        log.flush()
    assert log.dropped >= 1
    assert any("dropped" in line for line in logged)
    gate.set()
    waitClosed(clock, log.close())
    assert log.written + log.dropped == accesslog.QUEUE_CHUNKS + 3
    assert len(out.text().splitlines()) == log.written


def test_histogram_counts_cumulatively():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.sum - 3.65) < 1e-9


# -- how each connection ends, through the proxy's protocols ----------------


class Recorder:
    def __init__(self):
        self.records = []

    def add(self, record):
        self.records.append(record)


def proxyWithLog(cluster, **kw):
    mr = MemoryReactorClock()
    recorder = Recorder()
    factory = ProxyFactory(cluster, mr, traffic=Traffic(recorder), **kw)
    return factory, mr, recorder.records


def test_a_relayed_connection_closed_by_the_client():
    factory, mr, records = proxyWithLog(clusterOf(9001))
    client, clientT = startClient(factory)
    mr.advance(0.002)
    backend, backendT = completeConnect(mr)
    client.dataReceived(b"hello")
    backend.dataReceived(b"hello back")
    mr.advance(1)
    client.readConnectionLost()
    backend.connectionLost(Failure(ConnectionDone()))
    client.connectionLost(Failure(ConnectionDone()))
    [r] = records
    assert (r.listener, r.backend, r.attempts, r.end) == ("proxy", "b9001", 1, "client_closed")
    assert (r.bytesIn, r.bytesOut) == (5, 10)
    assert abs(r.connect - 0.002) < 1e-9 and abs(r.duration - 1.002) < 1e-9
    assert factory.traffic.ended[("proxy", "client_closed")] == 1
    assert factory.traffic.bytes["b9001"] == [5, 10]


def test_backend_closed_backend_reset_and_client_reset():
    for how, end in [
        (lambda c, b: b.connectionLost(Failure(ConnectionDone())), "backend_closed"),
        (lambda c, b: b.connectionLost(Failure(ConnectionLost())), "backend_reset"),
        (lambda c, b: c.connectionLost(Failure(ConnectionLost())), "client_reset"),
    ]:
        factory, mr, records = proxyWithLog(clusterOf(9001))
        client, _ = startClient(factory)
        backend, _ = completeConnect(mr)
        how(client, backend)
        if client.peer is None and not client._gone:
            client.connectionLost(Failure(ConnectionDone()))
        assert [r.end for r in records] == [end]


def test_refusals_connect_failures_idle_and_drain():
    # No backend at all.
    factory, mr, records = proxyWithLog(Cluster())
    client, _ = startClient(factory)
    client.connectionLost(Failure(ConnectionDone()))
    assert records[-1].end == "refused_no_backend" and records[-1].backend is None
    # Every attempt fails.
    factory, mr, records = proxyWithLog(clusterOf(9001, 9002), maxAttempts=2)
    client, _ = startClient(factory)
    failConnect(mr, 0)
    failConnect(mr, 1)
    client.connectionLost(Failure(ConnectionDone()))
    assert (records[-1].end, records[-1].attempts, records[-1].connect) == ("connect_failed", 2, None)
    # Idle timeout.
    factory, mr, records = proxyWithLog(clusterOf(9001), idleTimeout=5)
    client, clientT = startClient(factory)
    backend, _ = completeConnect(mr)
    mr.advance(6)
    client.connectionLost(Failure(ConnectionLost()))
    assert records[-1].end == "idle_timeout"
    # Reset by the balancer's drain deadline.
    factory, mr, records = proxyWithLog(clusterOf(9001))
    client, _ = startClient(factory)
    backend, _ = completeConnect(mr)
    factory.drain(1.0)
    mr.advance(2)
    client.connectionLost(Failure(ConnectionLost()))
    assert records[-1].end == "drained"


def test_queue_timeout_queue_full_and_max_connections():
    from twistedcluster.balancer.limits import ClientLimit

    c = Cluster()
    c.pool.register("full", "127.0.0.1", 9001, capacity=1, connections=1, load=1.0)
    factory, mr, records = proxyWithLog(c, queueSize=1, queueTimeout=2)
    first, _ = startClient(factory)
    second, _ = startClient(factory)
    assert records[-1:] == [] and factory.waiting == 1
    second.connectionLost(Failure(ConnectionDone()))
    assert records[-1].end == "refused_queue_full"
    mr.advance(3)
    first.connectionLost(Failure(ConnectionDone()))
    assert records[-1].end == "queue_timeout"
    factory.limit = ClientLimit(0, mr)
    assert factory.buildProtocol(None) is None
    assert records[-1].end == "refused_max_connections"
    assert factory.traffic.ended[("proxy", "refused_max_connections")] == 1


def test_bad_options_are_clear_usage_errors(tmp_path):
    import pytest
    from twisted.python import usage

    from twistedcluster.balancer.service import Options

    with pytest.raises(usage.UsageError, match="--access-log-format must be one of text, json"):
        Options().parseOptions(["--access-log-format=xml"])
    with pytest.raises(usage.UsageError, match="--access-log .*/missing/access.log: .*No such file"):
        Options().parseOptions([f"--access-log={tmp_path}/missing/access.log"])
    o = Options()
    o.parseOptions([f"--access-log={tmp_path}/access.log", "--access-log-format=json"])
    assert (tmp_path / "access.log").exists()
    o["access-log-output"].close()


def test_sighup_reopens_the_access_log_file_after_a_rotation(tmp_path):
    # logrotate moves the file away and sends SIGHUP: the records that
    # follow go to a new file at the path, not on into the moved one.
    from twistedcluster.balancer.service import Options, _DrainOnStop, makeService
    from twistedcluster.hangup import HangUpService

    path = tmp_path / "access.log"
    o = Options()
    o.parseOptions([f"--access-log={path}"])
    clock = MemoryReactorClock()
    top = makeService(o, reactor=clock)
    [log] = [s.accessLog for s in top if isinstance(s, _DrainOnStop)]
    [hangup] = [s for s in top if isinstance(s, HangUpService)]
    log.start()
    log.add(RECORD)
    log.flush()
    for _ in range(1000):
        if path.exists() and path.read_text():
            break
        threading.Event().wait(0.005)
    path.rename(tmp_path / "access.log.1")
    hangup.hangUp()
    log.add(attrs_evolve(RECORD, end="backend_closed"))
    waitClosed(clock, log.close())
    assert "end=client_closed" in (tmp_path / "access.log.1").read_text()
    assert "end=backend_closed" not in (tmp_path / "access.log.1").read_text()
    assert path.exists(), "SIGHUP did not reopen the access log"
    assert path.read_text().endswith("end=backend_closed\n")


def attrs_evolve(record, **changes):
    import attrs

    return attrs.evolve(record, **changes)


class ShortWrites(Output):
    """A raw stream that takes at most 10 bytes a call (a pipe, a signal)."""

    def write(self, b):
        b = bytes(b)[:10]
        self.chunks.append(b)
        return len(b)


class FailingOutput(Output):
    def write(self, b):
        raise OSError(28, "No space left on device")


def test_a_short_write_is_finished_not_cut(tmp_path):
    clock = Clock()
    out = ShortWrites()
    log = AccessLog(clock, out)
    log.start()
    log.add(RECORD)
    log.add(RECORD)
    waitClosed(clock, log.close())
    assert out.text() == formatText(RECORD) * 2


def test_records_a_failing_output_loses_are_counted_and_logged(logged):
    clock = Clock()
    log = AccessLog(clock, FailingOutput())
    log.start()
    log.add(RECORD)
    log.add(RECORD)
    log.flush()
    for _ in range(1000):
        if log._thread is not None and log._queue.empty() and log._lost:
            break
        threading.Event().wait(0.005)
    log.add(RECORD)
    log.flush()  # the reactor side hears of the loss at its next hand-over
    clock.advance(1.5)
    assert log.dropped >= 2
    assert any("dropped" in line and "No space left on device" in line for line in logged)
    waitClosed(clock, log.close())


def test_byte_counts_of_backends_gone_do_not_pile_up_unscraped():
    """
    Backends that come and go (new names, forgotten) leave no byte counts
    behind even when nobody scrapes /metrics: the counts stay within a
    bound of the pool's size.
    """
    from types import SimpleNamespace

    from twistedcluster.balancer.traffic import Traffic

    cluster = Cluster()
    cluster.pool.register("kept", "127.0.0.1", 1)
    traffic = Traffic()
    traffic.pool = cluster.pool
    for i in range(500):
        client = SimpleNamespace(
            _end="client_closed", _start=0.0, _connectAt=0.1,
            _backend=SimpleNamespace(received=2), _tried=[f"gone-{i}"], received=5,
        )
        traffic.proxyEnded(client, 1.0)
    assert len(traffic.bytes) <= 2 * len(cluster.pool) + 16
    assert traffic.ended[("proxy", "client_closed")] == 500
