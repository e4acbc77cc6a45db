"""
twistd plugins of twistedcluster: ``cluster-balancer`` and ``cluster-backend``.

ServiceMaker imports the named module only when the plugin is used, so this
file imports nothing that touches the reactor.
"""

import sys

from twisted.application.service import ServiceMaker
from twisted.python import usage


class _ServiceMaker(ServiceMaker):
    """
    A C{ServiceMaker} whose service, when its options cannot be used (a
    takeover refused, a backend at the balancer's own address...), is not
    made, with one line on standard error and exit status 2, as twistd says
    of a bad option: twistd would print a traceback for the same error.
    """

    def makeService(self, options):  # type: ignore[override]
        try:
            return ServiceMaker.makeService.fget(self)(options)
        except usage.UsageError as e:
            sys.stderr.write(f"{self.tapname}: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None


clusterBalancer = _ServiceMaker(
    "twistedcluster balancer",
    "twistedcluster.balancer.service",
    "Load balancer: proxy and redirect listeners, backend control and admin channels.",
    "cluster-balancer",
)

clusterBackend = _ServiceMaker(
    "twistedcluster backend",
    "twistedcluster.backend.service",
    "Cluster backend: serves a protocol factory, registers with balancers, reports load.",
    "cluster-backend",
)
