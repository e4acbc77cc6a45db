"""
twistedcluster: a load balancer for Twisted — balancer, backends, admin.

Run it with ``twistd cluster-balancer``, ``twistd cluster-backend`` and
``cluster-admin``; see README.md.
"""

__version__ = "0.1.0"
