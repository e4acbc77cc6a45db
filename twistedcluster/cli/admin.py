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

from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from twistedcluster.core.policies import POLICIES
from twistedcluster.wire import commands
from twistedcluster.address import endpointProblem, formatHostPort, parseHostPort
from twistedcluster.wire.auth import SecretFileError, authenticate, loadSecret
from twistedcluster.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed, react

#: Interrupted (Ctrl-C, SIGTERM) before the answer, as the shell counts it.
EXIT_INTERRUPTED = 130
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
    "formatJSON",
    "formatTable",
    "listAll",
    "main",
    "formatMerged",
    "parser",
    "run",
    "runMany",
    "runOne",
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


def _seconds(text: str) -> float:
    """
    A time in seconds for --timeout and --interval: more than 0 (a timer
    of a negative time fails Twisted's assertion, and top at 0 would ask
    the balancer without a pause).
    """
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


class _Admins(argparse.Action):
    """
    C{--admin}, repeatable: every one in C{admins}, the first in C{admin}.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        admins = list(getattr(namespace, "admins", None) or [])
        admins.append(values)
        namespace.admins = admins
        namespace.admin = admins[0]


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
        action=_Admins,
        metavar="ENDPOINT",
        help=f"the balancer's admin endpoint, a Twisted client endpoint "
        f"string (default {DEFAULT_ADMIN}); repeat it to act on several "
        f"balancers: a change goes to each, status merges their views",
    )
    p.set_defaults(admins=None)
    p.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the balancer's shared secret, when it has one",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
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
    sp.add_argument(
        "--send-proxy",
        choices=("v1", "v2"),
        dest="sendProxy",
        help="start every connection to it with a PROXY protocol header of this version "
        "(as --backend ...,send-proxy=V)",
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
        "--interval", type=_seconds, default=1.0, metavar="SECONDS",
        help="seconds between views (default 1)",
    )
    sp.add_argument(
        "--iterations", type=_count, default=0, metavar="N",
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
            b["load"] if isinstance(b["load"], str) else f"{b['load']:.3f}",
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


def formatJSON(items: Sequence[Dict]) -> str:
    """
    A JSON list of C{items}, one object a line: what ``--json`` prints.

    Written with the json module's C encoder (an indented dump is written
    in Python, about four times slower: a third of ``status`` at 10,000
    backends).
    """
    if not items:
        return "[]"
    return "[\n  " + ",\n  ".join(map(json.dumps, items)) + "\n]"


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
            return formatJSON(backends)
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
        extra = {
            k: getattr(args, k)
            for k in ("weight", "capacity", "sendProxy")
            if getattr(args, k) is not None
        }
        result = await _call(proto, commands.AddBackend, name=args.name, host=host, port=port, **extra)
        if args.sendProxy is not None and result.get("sendProxy") != args.sendProxy:
            # A balancer older than --send-proxy ignores the argument.
            raise CommandFailed(
                f"this balancer does not know --send-proxy (too old): {args.name} was "
                f"added WITHOUT a PROXY header; cluster-admin remove {args.name}, and "
                "upgrade the balancer",
                EXIT_REFUSED,
            )
        out = {"name": args.name, "host": host, "port": port, **extra, "state": result["state"]}
        text = f"{args.name}: added at {formatHostPort(host, port)} ({result['state']})"
        if args.sendProxy is not None:
            text += f", PROXY {args.sendProxy} header"
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
    """
    Run the command on the balancer C{--admin} names, or on each of them
    when it is given more than once (L{runMany}); return what to print.
    """
    admins = getattr(args, "admins", None) or [args.admin]
    if len(admins) > 1:
        return await runMany(reactor, args, admins)
    return await runOne(reactor, args)


async def runMany(reactor, args, admins: Sequence[str]) -> str:
    """
    A change sent to every balancer at once, each one's result reported
    (L{CommandFailed} naming those that failed, with the first one's exit
    status); C{status} and C{policy} merge what the balancers say.
    """
    import copy

    if args.command == "top":
        raise CommandFailed("top watches one balancer: give one --admin", EXIT_USAGE)

    def on(admin, job=None):
        one = copy.copy(args)
        one.admin, one.admins = admin, [admin]
        return defer.ensureDeferred(runOne(reactor, one, job))

    if args.command == "status":
        results = await _gather([on(a, listAll) for a in admins])
    elif args.command == "policy" and args.policy is None:
        results = await _gather([on(a) for a in admins])
        results = [(r if isinstance(r, CommandFailed) else r.strip()) for r in results]
    else:
        results = await _gather([on(a) for a in admins])
    failed = [(a, r) for a, r in zip(admins, results) if isinstance(r, CommandFailed)]
    if args.command == "status":
        views = [(a, r) for a, r in zip(admins, results) if not isinstance(r, CommandFailed)]
        output = formatMerged(views, args.json)
    elif args.json:
        output = json.dumps([
            {"admin": a, "error": str(r), "exit": r.code}
            if isinstance(r, CommandFailed)
            else {"admin": a, **_asJSON(r)}
            for a, r in zip(admins, results)
        ])
    else:
        output = "\n".join(
            f"{a}: {'FAILED: ' + str(r) if isinstance(r, CommandFailed) else r}"
            for a, r in zip(admins, results)
        )
    if failed:
        raise CommandFailed(
            f"failed on {len(failed)} of {len(admins)} balancers: "
            + "; ".join(f"{a}: {r}" for a, r in failed),
            failed[0][1].code,
            output,
        )
    return output


def _asJSON(text: str) -> Dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


async def _gather(ds: List[defer.Deferred]) -> List:
    """
    Each Deferred's result, or the L{CommandFailed} it failed with.
    """
    results = []
    for d in ds:
        try:
            results.append(await d)
        except CommandFailed as e:
            results.append(e)
    return results


#: The fields ``status`` shows, and whether each is this balancer's own.
_MERGED = [("state", False), ("weight", False), ("connections", False), ("load", False),
           ("routed", True), ("active", True)]


def formatMerged(views: Sequence[Tuple[str, Tuple[str, List[Dict]]]], asJSON: bool) -> str:
    """
    Several balancers' C{status} as one: a row per backend; a field the
    balancers disagree on shows each one's value, in C{--admin} order
    (C{routed} and C{active}, each balancer's own, always do).
    """
    names: Dict[str, None] = {}
    byBalancer = []
    for _, (policy, backends) in views:
        byBalancer.append({b["name"]: b for b in backends})
        for b in backends:
            names.setdefault(b["name"])
    merged = []
    for name in sorted(names):
        items = [v.get(name) for v in byBalancer]
        first = next(i for i in items if i is not None)
        row = dict(first)
        for field, own in _MERGED:
            values = [i[field] if i is not None else None for i in items]
            if own:
                row[field] = sum(v or 0 for v in values)
            elif len(set(map(str, values))) > 1:
                row[field] = values if asJSON else "/".join("-" if v is None else (
                    f"{v:.3f}" if field == "load" else str(v)) for v in values)
        if asJSON:
            row["balancers"] = {a: i for (a, _), i in zip(views, items)}
        merged.append(row)
    if asJSON:
        return formatJSON(merged)
    policies = [p for _, (p, _) in views]
    policy = policies[0] if len(set(policies)) == 1 else "/".join(policies)
    lines = ["balancers: " + "  ".join(f"{n}={a}" for n, (a, _) in enumerate(views, 1))]
    lines.append(formatTable(policy, merged))
    return "\n".join(lines)


async def runOne(reactor, args, job=None) -> str:
    """
    Run the command (or C{job(proto)}, given) on the one balancer
    C{args.admin} names.
    """
    secret = None
    if args.secret_file is not None:
        try:
            secret = loadSecret(args.secret_file)
        except SecretFileError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
    try:
        endpoint = clientFromString(reactor, args.admin)
    except Exception as e:
        raise CommandFailed(
            f"--admin {args.admin}: {endpointProblem(args.admin, e, client=True)}", EXIT_USAGE
        ) from None
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
    # Whether the balancer has said anything: a connection it ends before
    # that is what a full admin listener does to a newcomer.
    heard: list = []
    boxReceived = proto.ampBoxReceived

    def ampBoxReceived(box):
        heard.append(True)
        return boxReceived(box)

    proto.ampBoxReceived = ampBoxReceived

    # Whether the balancer has proved it holds the secret: before that, an
    # answer that is not AMP, or our own command sent back, is some other
    # service (one of the balancer's other listeners, most often).
    proven: list = []

    async def authenticated():
        try:
            proving = defer.ensureDeferred(authenticate(proto, secret, "admin"))
            if args.command == "top":
                proving.addTimeout(args.timeout, reactor)
            await proving
        except commands.AuthenticationFailed as e:
            raise CommandFailed(str(e), EXIT_AUTH) from None
        if secret is not None:
            proven.append(True)
        if job is not None:
            return await job(proto)
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
            text = f"the balancer at {args.admin} did not answer in {args.timeout} s"
            if not heard:
                text += (
                    " (nothing came back: is it the balancer's admin listener, --admin? "
                    "An HTTP listener, such as --metrics, waits for a request)"
                )
            raise CommandFailed(text, EXIT_UNREACHABLE) from None
        except amp.ProtocolSwitched:
            raise
        except CommandFailed:
            raise
        except Exception as e:
            why = explainConnectError(e)
            if secret is not None and not proven and not isinstance(e, error.ConnectionClosed):
                said = (
                    f"it answered {e.description!s}"
                    if isinstance(e, amp.RemoteAmpError)
                    else f"its answer is not AMP ({why})"
                )
                raise CommandFailed(
                    f"{args.admin} does not speak the balancer's admin protocol: {said}. "
                    "Is it the balancer's admin listener (--admin)? Its proxy and redirect "
                    "listeners answer otherwise",
                    EXIT_UNREACHABLE,
                ) from None
            if isinstance(e, error.ConnectionClosed) and not heard:
                # Accepted, then closed before any answer: what a full
                # admin listener does to a newcomer (a reset when the
                # command had arrived, a clean close when it had not).
                why = why.rstrip(".") + (
                    " before answering (its admin listener may be full: "
                    "--max-admin-connections; or it is stopping)"
                )
            raise CommandFailed(f"lost the balancer at {args.admin}: {why}", EXIT_UNREACHABLE) from None
    finally:
        if proto.transport is not None:  # not lost meanwhile
            proto.transport.loseConnection()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)

    async def work(reactor) -> int:
        output = await run(reactor, args)
        if output:
            print(output)
        return EXIT_OK

    # Ctrl-C (or SIGTERM) while waiting: one line, no traceback; for top,
    # a way to quit (status 0), as q is.
    react("cluster-admin", work, EXIT_OK if args.command == "top" else EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
