"""
twistedcluster: a load balancer for Twisted — balancer, backends, admin.

Run it with ``twistd cluster-balancer``, ``twistd cluster-backend`` and
``cluster-admin``; see README.md.

The names exported here are the library's public API, for programs that
embed the balancer's core or dial through it:

  - L{Cluster}: a pool with its routing policy, what the balancer routes on;
  - L{Pool}, L{BackendStatus}, L{State}: the backends, a snapshot of one,
    and the states it can be in;
  - L{POLICIES}, L{makePolicy}: the routing policies by name;
  - L{RedirectClientEndpoint}, L{redirectEndpoint}: a client endpoint that
    asks a balancer's redirect listener which backend to use (also
    C{clientFromString(reactor, "cluster:host=H:port=P")}).

Public modules, each with its own C{__all__}: L{twistedcluster.wire.commands}
(the AMP contract), L{twistedcluster.wire.redirectline} (the redirect answer),
L{twistedcluster.testing} (an in-memory balancer for tests),
L{twistedcluster.backend.web} (a twisted.web site that joins the backend's
drain).  Other modules
are the programs' internals: importable, but not promised to stay.
"""

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.policies import POLICIES, makePolicy
from twistedcluster.core.pool import BackendStatus, Pool, State
from twistedcluster.client.redirectclient import RedirectClientEndpoint, redirectEndpoint

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "Cluster",
    "POLICIES",
    "Pool",
    "RedirectClientEndpoint",
    "State",
    "__version__",
    "makePolicy",
    "redirectEndpoint",
]
