"""
The balancer (``twistd cluster-balancer``).

  - L{service}: its options and the composition of its listeners;
  - proxy mode: L{proxy} ties together L{relay} (the bytes), L{dialer}
    (connecting to a backend), L{passivehealth} (taking out backends that
    fail) and L{admission} (clients waiting for room);
  - L{redirect}: the redirect listener;
  - L{control}: where backends register and report load;
  - L{admin}: where cluster-admin steers the cluster, with L{statefile}
    keeping what operators set;
  - L{healthcheck}: active checks of static backends, added at start-up or
    at runtime; L{staticbackend}: what a static backend is and how
    C{--backend} writes one;
  - L{metrics}: the web listener (/metrics, /status.json, /healthz,
    /readyz) and L{statuspage} (/);
  - L{traffic}: what became of each client connection (counts for the
    metrics), and L{accesslog}, its record when there is an access log;
  - L{limits}, L{listeners}: the client connection limit, accept errors and
    listen backlogs.
"""
