"""
The ``mtls:`` server endpoint string (see twistedcluster.client.mtls).  Imports
nothing that touches the reactor.
"""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _MutualTLSServerParser:
    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from twistedcluster.client.mtls import mutualTLSServerEndpoint

        return mutualTLSServerEndpoint(reactor, *args, **kwargs)


mutualTLSServerParser = _MutualTLSServerParser()
