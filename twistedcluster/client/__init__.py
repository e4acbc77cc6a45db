"""
Clients of the balancer in Twisted programs.

  - L{redirectclient}: the ``cluster:`` client endpoint (ask a redirect
    listener, then connect to the backend it names);
  - L{mtls}: the ``mtls:`` endpoint (TLS that requires a client
    certificate), for listeners and their clients.
"""
