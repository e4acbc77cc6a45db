"""
A web service that answers each client with the address it connected
from, as its protocol sees it in C{transport.getPeer()}: behind a balancer
that sends the PROXY protocol (C{--send-proxy}) to a backend that reads it
(C{--listen haproxy:tcp:...}), the client's own, not the balancer's.

``twistd cluster-backend --service twistedcluster.backend.whoami.site``;
also the README's example of a twisted.web service behind the balancer.
"""

from twisted.web.resource import Resource
from twisted.web.server import Site


class WhoAmI(Resource):
    isLeaf = True

    def render_GET(self, request):
        client = request.getClientAddress()
        request.setHeader(b"content-type", b"text/plain")
        return f"you are {client.host} port {client.port}\n".encode()


site = Site(WhoAmI())
