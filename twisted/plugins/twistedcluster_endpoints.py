"""
The ``cluster:`` client endpoint string of twistedcluster's redirect mode.

    clientFromString(reactor, "cluster:host=127.0.0.1:port=8002")
    clientFromString(reactor, "cluster:host=lb.example:port=8002:timeout=2:attempts=5")

asks the balancer's redirect listener at C{host}:C{port} which backend to
use and connects there (see L{twistedcluster.client.redirectclient}).  Arguments:
C{host}, C{port} (required; positional C{cluster:HOST:PORT} works too),
C{timeout} (seconds for the balancer to answer and for each backend to
accept, default 5), C{attempts} (backends tried, default 3).  Escape the
colons of an IPv6 host: C{cluster:host=\\:\\:1:port=8002}.

Twisted scans this directory for plugins: this module imports only
interfaces, never the reactor; the endpoint module is imported on use.
"""

from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class ClusterEndpointParser:
    """
    Parses ``cluster:`` client endpoint strings.
    """

    prefix = "cluster"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from twistedcluster.client.redirectclient import (
            parseEndpointArguments,
            redirectEndpoint,
        )

        host, port, timeout, attempts = parseEndpointArguments(*args, **kwargs)
        return redirectEndpoint(reactor, host, port, timeout=timeout, attempts=attempts)


clusterEndpointParser = ClusterEndpointParser()
