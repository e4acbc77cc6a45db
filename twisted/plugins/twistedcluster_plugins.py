"""
twistd plugins of twistedcluster: ``cluster-balancer`` and ``cluster-backend``.

ServiceMaker imports the named module only when the plugin is used, so this
file imports nothing that touches the reactor.
"""

from twisted.application.service import ServiceMaker

clusterBalancer = ServiceMaker(
    "twistedcluster balancer",
    "twistedcluster.balancer.service",
    "Load balancer: proxy and redirect listeners, backend control and admin channels.",
    "cluster-balancer",
)

clusterBackend = ServiceMaker(
    "twistedcluster backend",
    "twistedcluster.backend.service",
    "Cluster backend: serves a protocol factory, registers with balancers, reports load.",
    "cluster-backend",
)
