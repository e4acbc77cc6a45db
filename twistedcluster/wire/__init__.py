"""
The wire: what balancer, backends and cluster-admin say to each other.

  - L{commands}: the AMP commands and errors of the control and admin
    channels (the contract every side shares);
  - L{redirectline}: the redirect listener's one-line answer;
  - L{auth}: the shared-secret handshake;
  - L{guardedamp}: the AMP protocol base that survives hostile peers.
"""
