"""
The pure core: who is in the cluster and which backend gets the next
connection.  No sockets, no reactor, no clock: plain values in, plain values
out, tested with plain functions and hypothesis.

  - L{pool}: the backends, their states, weights and load, and what this
    balancer has routed to each;
  - L{policies}: the routing policies (least-load, least-conn, round-robin);
  - L{cluster}: a pool with its policy: picks a backend for a connection.
"""
