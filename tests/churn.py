"""
Clients that keep making new connections while a test restarts or upgrades
the balancer under them: proxied echoes, and redirect questions (optionally
followed by an echo straight to the backend named).  Each outcome is
counted: a connect refused apart from one that failed otherwise, and a
connection cut once made (those a killed process was relaying die with it)
apart from one whose bytes came back wrong.  Bounded in count and time, as
every load loop.
"""

import os
import socket
import threading
import time

#: What a connection can end as.
OUTCOMES = ("proxied", "redirected", "refused", "connectFailed", "cut", "noBackend", "corrupted")


class Churn:
    """
    C{threads} threads of proxied echoes and as many of redirect clients,
    until L{stop} (at most C{limit} connections each, for C{seconds}).

    @param echoRedirects: a redirect client then echoes through the backend
        it was given, straight to it; else the answer alone counts.
    """

    def __init__(self, proxyPort, redirectPort, threads=2, limit=20000, seconds=180.0,
                 echoRedirects=False):
        self.proxyPort = proxyPort
        self.redirectPort = redirectPort
        self.limit = limit
        self.echoRedirects = echoRedirects
        self.deadline = time.monotonic() + seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.figures = dict.fromkeys(OUTCOMES, 0)
        self.errors = []
        self.threads = [
            threading.Thread(target=self._run, args=(kind,), daemon=True)
            for kind in ("proxy", "redirect")
            for _ in range(threads)
        ]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)
        return dict(self.figures)

    def total(self):
        return self.figures["proxied"] + self.figures["redirected"]

    def _count(self, key, error=None):
        with self.lock:
            self.figures[key] += 1
            if error is not None and len(self.errors) < 30:
                self.errors.append(f"{time.monotonic():.2f} {error}")

    @staticmethod
    def _connect(host, port):
        try:
            return socket.create_connection((host, port), timeout=15), None
        except ConnectionRefusedError as e:
            return None, ("refused", f"connect {port}: {e!r}")
        except OSError as e:
            return None, ("connectFailed", f"connect {port}: {e!r}")

    def _echo(self, host, port, done):
        s, bad = self._connect(host, port)
        if s is None:
            return bad
        payload = os.urandom(200)
        got = b""
        try:
            s.sendall(payload)
            while len(got) < len(payload):
                data = s.recv(65536)
                if not data:
                    break
                got += data
        except OSError as e:
            return "cut", f"echo {port}: {e!r}"
        finally:
            s.close()
        if got == payload:
            return done, None
        if payload.startswith(got):
            return "cut", f"echo {port}: closed after {len(got)} of {len(payload)} bytes"
        return "corrupted", f"echo {port}: {len(got)} of {len(payload)} bytes, differ"

    def _redirect(self):
        s, bad = self._connect("127.0.0.1", self.redirectPort)
        if s is None:
            return bad
        answer = b""
        try:
            while not answer.endswith(b"\r\n"):
                data = s.recv(1024)
                if not data:
                    break
                answer += data
        except OSError as e:
            return "cut", f"redirect read: {e!r}"
        finally:
            s.close()
        if answer.startswith(b"ERROR no-backend"):
            return "noBackend", "redirect: no backend"
        try:
            host, port = answer.split()
            port = int(port)
        except ValueError:
            return "cut", f"redirect answer {answer!r}"
        if self.echoRedirects:
            return self._echo(host.decode(), port, "redirected")
        return "redirected", None

    def _run(self, kind):
        for _ in range(self.limit):
            if self.stopping.is_set() or time.monotonic() > self.deadline:
                return
            if kind == "proxy":
                key, error = self._echo("127.0.0.1", self.proxyPort, "proxied")
            else:
                key, error = self._redirect()
            self._count(key, error)
