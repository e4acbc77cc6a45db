"""
The fast paths: where twistedcluster goes beneath Twisted's public API for
speed (see docs/internals.md and docs/benchmarks.md for what each buys).

  - L{reactor}: C{LeanEPollReactor}, Twisted's epoll reactor without the
    legacy log context around every event;
  - L{fasttcp}: dialling, sending and closing plain TCP with fewer system
    calls and reactor turns;
  - L{transports}: what a transport has not sent yet, and its peer in text;
  - L{internals}: the one door to Twisted's private names: what each means,
    the canary that checks those meanings at start-up, and the switch to
    Twisted's plain paths when it fails.  Nothing else touches them.
"""
