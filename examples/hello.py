from twisted.web.resource import Resource

from twistedcluster.backend.web import DrainingSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello\n"


site = DrainingSite(Hello())
