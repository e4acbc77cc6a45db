"""
``cluster-admin``: the operator's command-line client of the admin channel.

    cluster-admin [--admin ENDPOINT] COMMAND [ARGS] [--json]

Commands: status, drain, enable, disable, weight, policy, forget, and add /
remove for static backends.

Exit status: 0 done; 1 the balancer refused (unknown backend, bad weight…);
2 bad usage; 3 the balancer could not be reached or did not answer in time;
4 authentication failed (missing or wrong --secret-file); 5 the change was
applied but not saved to the balancer's state file (a restart would lose it);
6 the balancers' shared state store (etcd) is unreachable: the change was
refused, nothing changed.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from twistedcluster.core.policies import POLICIES
from twistedcluster.wire import commands
from twistedcluster.address import formatHostPort, parseHostPort
from twistedcluster.wire.auth import SecretFileError, authenticate, loadSecret
from twistedcluster.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed, react
from twistedcluster.client.mtls import explainConnectError

DEFAULT_ADMIN = "tcp:host=127.0.0.1:port=8101"

__all__ = [
    "CommandFailed",
    "DEFAULT_ADMIN",
    "EXIT_AUTH",
    "EXIT_NOT_SAVED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_STORE_UNAVAILABLE",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "execute",
    "formatTable",
    "listAll",
    "main",
    "parser",
    "run",
]

#: The balancer refused (unknown backend, bad weight...).
EXIT_REFUSED = 1
#: Authentication failed (missing or wrong --secret-file).
EXIT_AUTH = 4
#: The change was applied but not saved to the balancer's state file.
EXIT_NOT_SAVED = 5
#: The balancers' shared state store is unreachable: the change was refused.
EXIT_STORE_UNAVAILABLE = 6


def _done(result: Dict, out: Dict, text: str, asJSON: bool) -> str:
    """
    What to print for a change; L{CommandFailed} with L{EXIT_NOT_SAVED} when
    the balancer applied it but could not save it.
    """
    why = result.get("notSaved")
    if why:
        out = {**out, "notSaved": why}
    output = json.dumps(out) if asJSON else text
    if why:
        raise CommandFailed(
            f"applied but not saved, a balancer restart would undo it: {why}",
            EXIT_NOT_SAVED,
            output,
        )
    return output


def parser() -> argparse.ArgumentParser:
    # --json may come before or after the command; the subcommands' copy
    # must not reset what the main parser saw.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON instead of text",
    )
    p = argparse.ArgumentParser(
        prog="cluster-admin",
        description="Steer a twistedcluster balancer through its admin channel.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="ENDPOINT",
        help=f"the balancer's admin endpoint, a Twisted client endpoint "
        f"string (default {DEFAULT_ADMIN})",
    )
    p.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the balancer's shared secret, when it has one",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up when the balancer has not answered in this time (default 10)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="list backends and their load")
    for name, text in [
        ("drain", "stop new connections to a backend; existing ones finish"),
        ("enable", "put a drained or disabled backend back in rotation"),
        ("disable", "take a backend out of rotation"),
    ]:
        sp = sub.add_parser(name, parents=[common], help=text)
        sp.add_argument("name", help="the backend's name, as status lists it")
    sp = sub.add_parser(
        "forget", parents=[common], help="remove a backend that is down from the list"
    )
    sp.add_argument("name", help="the backend's name, as status lists it")
    sp = sub.add_parser(
        "add",
        parents=[common],
        help="add a static backend, checked by TCP (kept in the state file)",
    )
    sp.add_argument("name", help="the name it will have")
    sp.add_argument("address", metavar="HOST:PORT", help="where it listens ([::1]:9000 for IPv6)")
    sp.add_argument("--weight", type=int, metavar="W", help="its weight, 0..256 (default 1)")
    sp.add_argument(
        "--capacity", type=int, metavar="C", help="connections it is sized for (default 1000)"
    )
    sp = sub.add_parser(
        "remove", parents=[common], help="remove a static backend (its connections go on)"
    )
    sp.add_argument("name", help="the backend's name, as status lists it")
    sp = sub.add_parser("weight", parents=[common], help="set a backend's weight (0..256)")
    sp.add_argument("name")
    sp.add_argument("weight", type=int)
    sp = sub.add_parser(
        "policy", parents=[common], help="show, or set, the routing policy"
    )
    sp.add_argument("policy", nargs="?", help=", ".join(sorted(POLICIES)))
    sp = sub.add_parser(
        "top",
        parents=[common],
        help="a live view of the backends, refreshed until q (like the status page)",
    )
    sp.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS",
        help="seconds between views (default 1)",
    )
    sp.add_argument(
        "--iterations", type=int, default=0, metavar="N",
        help="show N views, one after another, then exit (default 0: until q)",
    )
    sp.add_argument(
        "--once", dest="iterations", action="store_const", const=1,
        help="show one view and exit (--iterations 1)",
    )
    return p


def formatTable(policy: str, backends: Sequence[Dict]) -> str:
    """
    ``status`` as a human reads it.
    """
    headers = ["NAME", "ADDRESS", "STATE", "WEIGHT", "CONNS", "LOAD", "ROUTED", "ACTIVE"]
    rows = [
        [
            b["name"],
            formatHostPort(b["host"], b["port"]),
            b["state"] + (" (static)" if b.get("static") else ""),
            str(b["weight"]),
            str(b["connections"]),
            f"{b['load']:.3f}",
            str(b["routed"]),
            str(b["active"]),
        ]
        for b in backends
    ]
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    lines = [f"policy: {policy}    backends: {len(backends)} "
             f"({sum(1 for b in backends if b['state'] == 'up')} up)", ""]
    for r in [headers] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not backends:
        lines.append("(no backend has registered)")
    return "\n".join(lines)


async def _call(proto: amp.AMP, command, **kw):
    try:
        return await proto.callRemote(command, **kw)
    except amp.TooLong as e:
        # Raised before anything is sent: the command cannot be carried.
        what = e.keyName.decode("ascii", "replace") if e.keyName else "a key"
        raise CommandFailed(
            f"{what} is too long: AMP carries at most 65,535 bytes in one value",
            EXIT_USAGE,
        ) from None
    except commands.NotAuthenticated as e:
        raise CommandFailed(f"{e}; give --secret-file PATH", EXIT_AUTH) from None
    except commands.StateStoreUnavailable as e:
        raise CommandFailed(str(e), EXIT_STORE_UNAVAILABLE) from None
    except commands.ClusterError as e:
        raise CommandFailed(str(e), EXIT_REFUSED) from None
    except amp.UnknownRemoteError as e:
        raise CommandFailed(f"the balancer failed: {e}", EXIT_REFUSED) from None
    except amp.RemoteAmpError as e:
        raise CommandFailed(f"the balancer refused: {e}", EXIT_REFUSED) from None


async def listAll(proto: amp.AMP) -> Tuple[str, List[Dict]]:
    """
    The policy and every backend, page after page.
    """
    backends: List[Dict] = []
    while True:
        # As JSON, in a few large pages, from a balancer that offers it.
        result = await _call(proto, commands.ListBackends, offset=len(backends), json=True)
        page = result["table"] if result.get("table") is not None else result["backends"]
        backends.extend(page)
        if not page or len(backends) >= result["total"]:
            return result["policy"], backends


async def execute(proto: amp.AMP, args, reactor=None) -> str:
    """
    Run one parsed command on a connected admin channel; return what to print.
    """
    cmd = args.command
    if cmd == "top":
        from twistedcluster.cli.top import top

        if reactor is None:
            from twisted.internet import reactor
        return await top(reactor, lambda: listAll(proto), args)
    if cmd == "status":
        policy, backends = await listAll(proto)
        if args.json:
            return json.dumps(backends, indent=2)
        return formatTable(policy, backends)
    if cmd in ("drain", "enable", "disable"):
        command = {
            "drain": commands.DrainBackend,
            "enable": commands.EnableBackend,
            "disable": commands.DisableBackend,
        }[cmd]
        result = await _call(proto, command, name=args.name)
        out = {"name": args.name, "state": result["state"]}
        return _done(result, out, f"{args.name}: {result['state']}", args.json)
    if cmd == "forget":
        result = await _call(proto, commands.ForgetBackend, name=args.name)
        out = {"name": args.name, "forgotten": True}
        return _done(result, out, f"{args.name}: forgotten", args.json)
    if cmd == "add":
        try:
            host, port = parseHostPort(args.address)
        except ValueError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
        extra = {k: getattr(args, k) for k in ("weight", "capacity") if getattr(args, k) is not None}
        result = await _call(proto, commands.AddBackend, name=args.name, host=host, port=port, **extra)
        out = {"name": args.name, "host": host, "port": port, **extra, "state": result["state"]}
        text = f"{args.name}: added at {formatHostPort(host, port)} ({result['state']})"
        return _done(result, out, text, args.json)
    if cmd == "remove":
        result = await _call(proto, commands.RemoveBackend, name=args.name)
        out = {"name": args.name, "removed": True}
        return _done(result, out, f"{args.name}: removed", args.json)
    if cmd == "weight":
        result = await _call(proto, commands.SetWeight, name=args.name, weight=args.weight)
        out = {"name": args.name, "weight": args.weight, "state": result["state"]}
        return _done(result, out, f"{args.name}: weight {args.weight}", args.json)
    if cmd == "policy":
        if args.policy is None:
            result = await _call(proto, commands.ListBackends)
            policy = result["policy"]
            return json.dumps({"policy": policy}) if args.json else policy
        result = await _call(proto, commands.SetPolicy, policy=args.policy)
        out = {"policy": args.policy, "previous": result["previous"]}
        text = f"policy: {args.policy} (was {result['previous']})"
        return _done(result, out, text, args.json)
    raise CommandFailed(f"unknown command {cmd}", EXIT_USAGE)


async def run(reactor, args) -> str:
    secret = None
    if args.secret_file is not None:
        try:
            secret = loadSecret(args.secret_file)
        except SecretFileError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
    try:
        endpoint = clientFromString(reactor, args.admin)
    except Exception as e:
        raise CommandFailed(f"--admin {args.admin}: {e}", EXIT_USAGE) from None
    connecting = endpoint.connect(Factory.forProtocol(amp.AMP))
    connecting.addTimeout(args.timeout, reactor)
    try:
        proto = await connecting
    except defer.TimeoutError:
        raise CommandFailed(
            f"cannot reach the balancer at {args.admin}: no answer in {args.timeout} s",
            EXIT_UNREACHABLE,
        ) from None
    except Exception as e:
        raise CommandFailed(
            f"cannot reach the balancer at {args.admin}: {explainConnectError(e)}",
            EXIT_UNREACHABLE,
        ) from None
    async def authenticated():
        try:
            proving = defer.ensureDeferred(authenticate(proto, secret, "admin"))
            if args.command == "top":
                proving.addTimeout(args.timeout, reactor)
            await proving
        except commands.AuthenticationFailed as e:
            raise CommandFailed(str(e), EXIT_AUTH) from None
        if args.command == "top":
            # Runs until q: each view has its own --timeout.
            return await execute(proto, args, reactor)
        return await execute(proto, args)

    try:
        work = defer.ensureDeferred(authenticated())
        if args.command != "top":
            work.addTimeout(args.timeout, reactor)
        try:
            return await work
        except defer.TimeoutError:
            raise CommandFailed(
                f"the balancer at {args.admin} did not answer in {args.timeout} s",
                EXIT_UNREACHABLE,
            ) from None
        except amp.ProtocolSwitched:
            raise
        except CommandFailed:
            raise
        except Exception as e:
            raise CommandFailed(
                f"lost the balancer at {args.admin}: {explainConnectError(e)}",
                EXIT_UNREACHABLE,
            ) from None
    finally:
        proto.transport.loseConnection()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)

    async def work(reactor) -> int:
        output = await run(reactor, args)
        if output:
            print(output)
        return EXIT_OK

    react("cluster-admin", work)


if __name__ == "__main__":
    main()
