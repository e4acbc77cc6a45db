"""
deploy/, checked without a cluster: the systemd units, the container image
and compose file, the Kubernetes manifests.

Every command line in them -- twistd with a plugin, cluster-admin -- goes
through the real option parsers (twistd's, which hands the plugin's part to
twistedcluster.balancer.service.Options or twistedcluster.backend.service.Options, and
twistedcluster.cli.admin.parser()), and every endpoint string through
Twisted's endpoint parsers.  The secret files those commands name must be
the ones the deployment provides (a systemd credential, a compose secret, a
Kubernetes Secret volume): each check puts a real secret where the
deployment would, maps the deployed path there, and fails if a command
names any other path.

Tools from outside the project are optional; a check whose tool is missing
is skipped and says what to install: systemd-analyze (Debian: systemd),
PyYAML, kubernetes-validate, compose-spec, dockerfile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from twisted.python import usage

from twistedcluster.address import endpointParts

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
KUBERNETES = DEPLOY / "kubernetes"

SECRET = b"deploy-test-secret-0123456789abcdef"
FOREGROUND = ["--nodaemon", "--pidfile=", "--logfile=-"]
PLUGINS = ("cluster-balancer", "cluster-backend")
# What a backend may spend telling the balancers it drains, before its
# drain timeout starts (twistedcluster.backend.service.BackendService._drain).
DRAIN_ACK = 2.0


def yamlModule():
    return pytest.importorskip("yaml", reason="PyYAML is needed: pip install pyyaml")


# -- the real parsers ----------------------------------------------------


def writeSecret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET + b"\n")
    os.chmod(path, 0o600)
    return path


def relocate(argv: List[str], places: Dict[str, Path]) -> List[str]:
    """
    Map the deployed paths the deployment provides (keys, directories) to
    where the test put them.
    """
    out = []
    for arg in argv:
        for deployed, here in sorted(places.items(), key=lambda kv: -len(kv[0])):
            arg = arg.replace(deployed.rstrip("/") + "/", str(here) + "/")
        out.append(arg)
    return out


def serverPort(description: str) -> Optional[int]:
    kind, args, kwargs = endpointParts(description)
    if kind in ("tcp", "tcp6", "ssl"):
        return int(kwargs.get("port", args[0] if args else 0))
    return None


def clientHostPort(description: str) -> Tuple[str, int]:
    kind, args, kwargs = endpointParts(description)
    assert kind in ("tcp", "ssl"), description
    return kwargs["host"], int(kwargs["port"])


@contextlib.contextmanager
def inheritedSockets(names: List[str]) -> Iterator[None]:
    """
    Within: Twisted's systemd: endpoint parser sees these named sockets, as
    a process that systemd started with them would.
    """
    from twisted.internet import endpoints
    from twisted.python.systemd import ListenFDs

    saved = endpoints._SystemdParser._sddaemon
    endpoints._SystemdParser._sddaemon = ListenFDs(
        list(range(3, 3 + len(names))), tuple(names)
    )
    try:
        yield
    finally:
        endpoints._SystemdParser._sddaemon = saved


def checkEndpoints(plugin: str, options) -> None:
    from twisted.internet.endpoints import clientFromString, serverFromString
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    if plugin == "cluster-balancer":
        servers = [options[k] for k in ("listen", "control", "admin", "redirect") if options[k]]
        clients = []
    else:
        from twistedcluster.backend.discovery import isSRV

        servers = [options["listen"]]
        # srv:NAME is a DNS record (checked by the option's own parser).
        clients = [b for b in options["balancers"] if not isSRV(b)]
    for description in servers:
        try:
            serverFromString(reactor, description)
        except Exception as e:
            pytest.fail(f"{plugin}: bad server endpoint {description!r}: {e!r}")
    for description in clients:
        try:
            clientFromString(reactor, description)
        except Exception as e:
            pytest.fail(f"{plugin}: bad client endpoint {description!r}: {e!r}")


def parseTwistd(argv: List[str]):
    """
    Parse a whole twistd command line (program name first) as twistd would;
    return the plugin's name and its parsed options.
    """
    from twisted.scripts.twistd import ServerOptions

    assert Path(argv[0]).name == "twistd", argv
    config = ServerOptions()
    try:
        config.parseOptions(list(argv[1:]))
    except usage.UsageError as e:
        pytest.fail(f"twistd rejects {shlex.join(argv)}: {e}")
    where = shlex.join(argv)
    assert config["nodaemon"], f"not in the foreground: {where}"
    assert config["pidfile"] == "", f"writes a pid file: {where}"
    assert config["logfile"] == "-", f"does not log to standard output: {where}"
    assert config.subCommand in PLUGINS, where
    options = config.subOptions
    checkEndpoints(config.subCommand, options)
    if config.subCommand == "cluster-balancer":
        from twistedcluster.balancer.service import isLocalOnly

        for role in ("control", "admin"):
            assert isLocalOnly(options[role]) or options["secret"] is not None, (
                f"{role} listener {options[role]} reachable from other hosts "
                f"without --secret-file: {where}"
            )
    return config.subCommand, options


def parseAdmin(argv: List[str]):
    """
    Parse a cluster-admin command line (program name first) with the real
    parser; its secret file must be readable, its endpoint parseable.
    """
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactor

    from twistedcluster.cli.admin import parser
    from twistedcluster.wire.auth import loadSecret

    assert Path(argv[0]).name == "cluster-admin", argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"cluster-admin rejects {shlex.join(argv)}: {err.getvalue()}")
    if args.secret_file is not None:
        loadSecret(args.secret_file)
    clientFromString(MemoryReactor(), args.admin)
    return args


# -- systemd -------------------------------------------------------------

INSTALLED_TWISTD = "/opt/twistedcluster/bin/twistd"
UNITS = ["cluster-balancer.socket", "cluster-balancer.service", "cluster-backend@.service"]
INSTANCE = "9001"
HOST = "web1"


def readUnit(name: str) -> Dict[str, List[Tuple[str, str]]]:
    """
    A unit file's sections, each a list of (key, value), continuation lines
    joined and comments dropped as systemd does.
    """
    lines, buf = [], None
    for raw in (SYSTEMD / name).read_text().splitlines():
        s = raw.strip()
        if s[:1] in ("#", ";") or (buf is None and not s):
            continue
        if s.endswith("\\"):
            buf = (buf or "") + s[:-1] + " "
            continue
        lines.append((buf or "") + s)
        buf = None
    assert buf is None, f"{name} ends in a continuation"
    sections: Dict[str, List[Tuple[str, str]]] = {}
    current = None
    for line in lines:
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None and "=" in line, f"{name}: {line!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def values(unit, section: str, key: str) -> List[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit, section: str, key: str) -> Optional[str]:
    found = values(unit, section, key)
    return found[-1] if found else None


def seconds(text: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "min": 60, "m": 60}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def specifiers(unitName: str, instance: Optional[str], tmp: Path) -> Dict[str, str]:
    prefix = unitName.split("@")[0].rsplit(".", 1)[0]
    full = unitName if instance is None else unitName.replace("@.", f"@{instance}.")
    return {
        "i": instance or "",
        "I": instance or "",
        "n": full,
        "N": full.rsplit(".", 1)[0],
        "p": prefix,
        "l": HOST,
        "H": HOST + ".example.org",
        "d": str(tmp / "credentials" / full),
        "S": str(tmp / "state"),
        # Short: a unix socket's path has at most 107 bytes.
        "t": "/tmp/tc-run-" + hashlib.sha1(str(tmp).encode()).hexdigest()[:12],
        "%": "%",
    }


def expandSpecifiers(text: str, spec: Dict[str, str]) -> str:
    def one(m):
        assert m.group(1) in spec, f"specifier %{m.group(1)} not expected in {text!r}"
        return spec[m.group(1)]

    return re.sub(r"%(.)", one, text)


def readEnvFile(path: Path) -> Tuple[Dict[str, str], List[Tuple[str, str]]]:
    """
    An EnvironmentFile's assignments, and its examples: lines "#NAME=value".
    """
    assignments, examples = {}, []
    for raw in path.read_text().splitlines():
        s = raw.strip()
        example = re.fullmatch(r"#([A-Z_][A-Z0-9_]*)=(.*)", s)
        if example:
            examples.append((example.group(1), example.group(2)))
            continue
        if not s or s.startswith("#"):
            continue
        key, val = s.split("=", 1)
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: {s!r}"
        assignments[key] = val
    return assignments, examples


def shippedEnvFile(deployed: str) -> Optional[Path]:
    """
    The file deploy/systemd/ ships for an EnvironmentFile= path, if any.
    """
    assert deployed.startswith("/etc/twistedcluster/"), deployed
    shipped = SYSTEMD / Path(deployed).name
    return shipped if shipped.exists() else None


def unitEnvironment(unit, spec, useShipped=True, overrides=()) -> Dict[str, str]:
    """
    The environment a unit's command line sees: Environment= lines, then the
    EnvironmentFile= files (the shipped ones stand for /etc), then
    C{overrides}.
    """
    env: Dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for word in shlex.split(expandSpecifiers(line, spec)):
            key, val = word.split("=", 1)
            env[key] = val
    for line in values(unit, "Service", "EnvironmentFile"):
        optional = line.startswith("-")
        deployed = expandSpecifiers(line.lstrip("-"), spec)
        shipped = shippedEnvFile(deployed)
        assert shipped is not None or optional, f"{deployed} is required but not shipped"
        if shipped is not None and useShipped:
            env.update(readEnvFile(shipped)[0])
    env.update(dict(overrides))
    return env


def execArgv(unit, env: Dict[str, str], spec, key: str = "ExecStart") -> List[str]:
    """
    ExecStart= (or C{key}) as systemd runs it: specifiers, then words, then
    ${NAME} (one word) and $NAME (split at white space).
    """
    (line,) = values(unit, "Service", key)
    line = expandSpecifiers(line, spec)
    assert line[:1] not in "-@:+!", f"unexpected ExecStart prefix: {line}"
    argv: List[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            assert whole.group(1) in env, f"${whole.group(1)} is never set"
            argv.extend(env[whole.group(1)].split())
            continue

        def one(m):
            assert m.group(1) in env, f"${{{m.group(1)}}} is never set"
            return env[m.group(1)]

        word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", one, word)
        assert "$" not in word, f"unexpanded variable in {word!r}"
        argv.append(word)
    return argv


def prepareUnit(unit, spec) -> None:
    """
    What systemd provides before ExecStart: credentials, the state folder.
    """
    for line in values(unit, "Service", "LoadCredential"):
        credential, source = line.split(":", 1)
        assert source.startswith("/etc/twistedcluster/"), source
        writeSecret(Path(spec["d"]) / credential)
    for line in values(unit, "Service", "StateDirectory"):
        for folder in line.split():
            (Path(spec["S"]) / folder).mkdir(parents=True, exist_ok=True)
    for line in values(unit, "Service", "RuntimeDirectory"):
        RUNTIME_FOLDERS.add(spec["t"])
        for folder in line.split():
            (Path(spec["t"]) / folder).mkdir(parents=True, exist_ok=True)


#: The short runtime folders (%t) made by prepareUnit, removed after the module.
RUNTIME_FOLDERS: set = set()


@pytest.fixture(scope="module", autouse=True)
def removeRuntimeFolders():
    yield
    for folder in RUNTIME_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
    RUNTIME_FOLDERS.clear()


def unitCommand(name: str, tmp: Path, useShipped=True, overrides=()):
    unit = readUnit(name)
    instance = INSTANCE if "@." in name else None
    spec = specifiers(name, instance, tmp)
    prepareUnit(unit, spec)
    env = unitEnvironment(unit, spec, useShipped, overrides)
    return unit, spec, execArgv(unit, env, spec)


def socketNames() -> List[str]:
    sock = readUnit("cluster-balancer.socket")
    return [value(sock, "Socket", "FileDescriptorName")]


def unitVariants(name: str) -> List[Tuple[str, bool, Tuple[Tuple[str, str], ...]]]:
    """
    The environments to check a unit's command line under: the unit's own
    defaults, with the shipped files, and each example line of those files.
    """
    variants = [("unit defaults", False, ()), ("shipped env files", True, ())]
    unit = readUnit(name)
    for line in values(unit, "Service", "EnvironmentFile"):
        shipped = shippedEnvFile(expandSpecifiers(line.lstrip("-"), specifiers(name, INSTANCE, Path("/x"))))
        if shipped is not None:
            for key, val in readEnvFile(shipped)[1]:
                variants.append((f"{shipped.name}: {key}={val}", True, ((key, val),)))
    return variants


SERVICE_VARIANTS = [
    pytest.param(name, variant, id=f"{name}|{variant[0]}")
    for name in ("cluster-balancer.service", "cluster-backend@.service")
    for variant in unitVariants(name)
]


@pytest.mark.parametrize("name,variant", SERVICE_VARIANTS)
def test_unit_command_line_is_accepted(name, variant, tmp_path):
    what, useShipped, overrides = variant
    unit, spec, argv = unitCommand(name, tmp_path, useShipped, overrides)
    assert argv[0] == INSTALLED_TWISTD
    assert argv[1:4] == FOREGROUND
    with inheritedSockets(socketNames()):
        plugin, options = parseTwistd(argv)
    assert options["secret"] == SECRET, "the unit must use its credential as the secret"
    if plugin == "cluster-balancer":
        assert name == "cluster-balancer.service"
        state = Path(options["state-file"])
        assert state.parent == Path(spec["S"]) / value(unit, "Service", "StateDirectory")
    else:
        assert name == "cluster-backend@.service"
        stop = seconds(value(unit, "Service", "TimeoutStopSec"))
        assert stop > options["drain-timeout"] + DRAIN_ACK, (
            f"TimeoutStopSec={stop} would kill a backend draining for "
            f"{options['drain-timeout']} s ({what})"
        )
        if not any(k in ("BACKEND_NAME", "BACKEND_LISTEN") for k, _ in overrides):
            assert options["name"] == f"{HOST}-{INSTANCE}"
            assert serverPort(options["listen"]) == int(INSTANCE)


def test_balancer_reload_is_a_takeover(tmp_path):
    """
    systemctl reload starts a balancer with ExecStart's options that takes
    over from the running one (the same --takeover socket, in the unit's
    runtime folder), as a daemon that returns once it has.
    """
    unit, spec, start = unitCommand("cluster-balancer.service", tmp_path)
    env = unitEnvironment(unit, spec)
    reload = execArgv(unit, env, spec, "ExecReload")
    assert reload[0] == INSTALLED_TWISTD
    twistdFlags = reload[1 : reload.index("cluster-balancer")]
    assert "--nodaemon" not in twistdFlags and "--pidfile=" in twistdFlags
    assert "--syslog" in twistdFlags, "a daemon cannot log to standard output"
    assert reload[reload.index("cluster-balancer"):] == start[start.index("cluster-balancer"):]
    with inheritedSockets(socketNames()):
        _, options = parseTwistd(start)
    path = Path(options["takeover"])
    assert path.parent == Path(spec["t"]) / value(unit, "Service", "RuntimeDirectory")
    assert value(unit, "Service", "RuntimeDirectoryMode") == "0700"


def test_socket_unit_feeds_the_balancer(tmp_path):
    sock = readUnit("cluster-balancer.socket")
    balancer, spec, argv = unitCommand("cluster-balancer.service", tmp_path)
    assert value(sock, "Socket", "Service") == "cluster-balancer.service"
    assert value(sock, "Socket", "Accept") in (None, "no", "false")
    assert "cluster-balancer.socket" in " ".join(values(balancer, "Unit", "Wants"))
    assert "cluster-balancer.socket" in " ".join(values(balancer, "Unit", "After"))
    (listen,) = [a.split("=", 1)[1] for a in argv if a.startswith("--listen=")]
    kind, _, kwargs = endpointParts(listen)
    assert kind == "systemd"
    assert kwargs["name"] == value(sock, "Socket", "FileDescriptorName")
    streams = values(sock, "Socket", "ListenStream")
    assert len(streams) == 1, "one listening socket, one systemd: endpoint"
    ipv6 = streams[0].startswith("[")
    assert kwargs["domain"] == ("INET6" if ipv6 else "INET"), (streams, listen)


def test_balancer_restart_keeps_its_sockets_in_the_fd_store(tmp_path):
    """
    systemctl restart (and Restart=on-failure) keeps the listening sockets:
    the unit gives the balancer a file-descriptor store with room for every
    listener it may store and its two memfds, says how much in $FDSTORE
    (systemd 254 and later say it themselves, older ones do not), and lets
    it notify (Type=notify).
    """
    from twistedcluster.balancer import fdstore

    unit, spec, _ = unitCommand("cluster-balancer.service", tmp_path)
    room = int(value(unit, "Service", "FileDescriptorStoreMax"))
    assert room >= len(fdstore.ROLES) + 2
    env = unitEnvironment(unit, spec)
    assert fdstore.capacity(dict(env, NOTIFY_SOCKET="/run/systemd/notify")) == room
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "Restart") == "on-failure"


@pytest.mark.parametrize("name", ["cluster-balancer.service", "cluster-backend@.service"])
def test_service_units_are_supervised_and_hardened(name):
    unit = readUnit(name)
    s = dict(unit["Service"])
    if name == "cluster-balancer.service":
        # A reload's new process becomes the main one (MAINPID=).
        assert (s["Type"], s["NotifyAccess"]) == ("notify", "all")
    else:
        assert s["Type"] == "simple"
    assert s["Restart"] == "on-failure"
    assert s["KillSignal"] == "SIGTERM"
    assert s["DynamicUser"] == "yes" and s["User"] == "twistedcluster"
    for key, want in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictNamespaces", "yes"),
    ]:
        assert s.get(key) == want, f"{name}: {key}={s.get(key)!r}, want {want!r}"
    assert s["LoadCredential"] == "secret:/etc/twistedcluster/secret"
    assert "multi-user.target" in value(unit, "Install", "WantedBy")


def test_shipped_env_files_are_used():
    used = set()
    for name in ("cluster-balancer.service", "cluster-backend@.service"):
        unit = readUnit(name)
        spec = specifiers(name, INSTANCE, Path("/x"))
        for line in values(unit, "Service", "EnvironmentFile"):
            shipped = shippedEnvFile(expandSpecifiers(line.lstrip("-"), spec))
            if shipped is not None:
                used.add(shipped.name)
    assert used == {p.name for p in SYSTEMD.glob("*.env")}


def realTwistd() -> str:
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if found is None:
        pytest.skip("no twistd executable to stand for /opt/twistedcluster/bin/twistd")
    return found


def unitsForSystemd(tmp_path: Path) -> Path:
    """
    The units in a folder of their own, with the installed twistd path
    pointed at this environment's (systemd-analyze checks it exists).
    """
    folder = tmp_path / "units"
    folder.mkdir()
    twistd = realTwistd()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        (folder / name).write_text(text.replace(INSTALLED_TWISTD, twistd))
    return folder


def systemdAnalyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = systemdAnalyze()
    folder = unitsForSystemd(tmp_path)
    names = ["cluster-balancer.socket", "cluster-balancer.service", f"cluster-backend@{INSTANCE}.service"]
    r = subprocess.run(
        [analyze, "verify", "--man=no", *(f"./{n}" for n in names)],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )
    output = (r.stdout + r.stderr).strip()
    # Anything said about these units is a mistake in them (verify exits 0
    # on unknown keys and bad values: it only warns).
    ours = [line for line in output.splitlines() if "cluster-" in line or str(folder) in line]
    assert r.returncode == 0 and not ours, output


@pytest.mark.parametrize("name", ["cluster-balancer.service", f"cluster-backend@{INSTANCE}.service"])
def test_units_exposure_is_low(name, tmp_path):
    analyze = systemdAnalyze()
    folder = unitsForSystemd(tmp_path)
    r = subprocess.run(
        [analyze, "security", "--offline=yes", f"./{name}"],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


# -- the container image -------------------------------------------------

DOCKERFILE = DOCKER / "Dockerfile"


def readDockerfile() -> List[Tuple[str, str]]:
    """
    (INSTRUCTION, arguments), continuation lines joined, comments dropped,
    ARGs declared before the first FROM substituted in FROM lines.
    """
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        line = buf + s
        buf = ""
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    assert not buf
    globalArgs = {}
    for instr, rest in out:
        if instr == "FROM":
            break
        if instr == "ARG":
            k, _, v = rest.partition("=")
            globalArgs[k] = v
    resolved = []
    for instr, rest in out:
        if instr == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: globalArgs[m.group(1)], rest)
        resolved.append((instr, rest))
    return resolved


def finalStage() -> List[Tuple[str, str]]:
    instructions = readDockerfile()
    last = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    return instructions[last:]


def execForm(instr: str) -> List[str]:
    (rest,) = [r for i, r in finalStage() if i == instr]
    assert rest.startswith("["), f"{instr} must use the exec form (no shell between)"
    return json.loads(rest)


def imageEntrypoint() -> List[str]:
    return execForm("ENTRYPOINT")


def imageUid() -> int:
    (user,) = [r for i, r in finalStage() if i == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_builds_a_small_non_root_image():
    instructions = readDockerfile()
    bases = [rest.split()[0] for instr, rest in instructions if instr == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases
    uid = imageUid()
    assert uid != 0
    (user,) = [r for i, r in finalStage() if i == "USER"]
    assert re.fullmatch(r"\d+:\d+", user), "numeric USER, so runAsNonRoot can check it"
    created = " ".join(r for i, r in finalStage() if i == "RUN")
    assert f"--uid {uid}" in created
    # The final stage copies the virtual environment only, not the sources.
    copies = [r for i, r in finalStage() if i == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), copies
    assert imageEntrypoint()[1:] == FOREGROUND
    assert ("STOPSIGNAL", "SIGTERM") in finalStage()


def test_dockerfile_default_command_is_accepted(tmp_path):
    argv = imageEntrypoint() + execForm("CMD")
    plugin, options = parseTwistd(argv)
    assert plugin == "cluster-balancer"
    exposed = {int(p) for i, r in finalStage() if i == "EXPOSE" for p in r.split()}
    assert serverPort(options["listen"]) in exposed


def test_dockerfile_parses_with_the_official_parser():
    dockerfile = pytest.importorskip(
        "dockerfile", reason="the official Dockerfile parser: pip install dockerfile"
    )
    parsed = dockerfile.parse_file(str(DOCKERFILE))
    assert [c.cmd.upper() for c in parsed] == [i for i, _ in readDockerfile()]
    for command in parsed:
        if command.cmd.upper() in ("ENTRYPOINT", "CMD"):
            assert command.json, f"{command.original}: use the exec form"
            assert list(command.value) == execForm(command.cmd.upper())


def ignored(path: str, patterns: List[str]) -> bool:
    """
    Whether .dockerignore-style C{patterns} (no negations) exclude C{path} or
    a folder above it.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch(p, pattern[3:]) for p in parts):
                return True
        elif any(fnmatch(p, pattern) for p in prefixes):
            return True
    return False


def test_build_context_holds_what_pip_install_needs():
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [s.strip() for s in lines if s.strip() and not s.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    needed = ["setup.py", "README.md"] + [
        str(p.relative_to(ROOT))
        for p in [*ROOT.glob("twistedcluster/*.py"), *ROOT.glob("twisted/plugins/*.py")]
    ]
    assert len(needed) > 4
    for path in needed:
        assert not ignored(path, patterns), f"the image build would miss {path}"
    for path in [".git/config", "tests/test_deploy.py", "deploy/docker/Dockerfile",
                 "twistedcluster/__pycache__/x.pyc", ".venv/bin/python"]:
        assert ignored(path, patterns), f"the build context would carry {path}"


# -- compose ----------------------------------------------------------------

COMPOSE = DOCKER / "compose.yaml"


def loadCompose() -> dict:
    return yamlModule().safe_load(COMPOSE.read_text())


def composeCommand(service: dict) -> List[str]:
    entrypoint = service.get("entrypoint", imageEntrypoint())
    command = service["command"]
    assert isinstance(command, list) and isinstance(entrypoint, list), "exec form, please"
    return entrypoint + command


def composeSecrets(compose: dict, service: dict, tmp: Path) -> Dict[str, Path]:
    """
    Put the secrets a compose service gets where the test can read them.
    """
    places = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            entry = {"source": entry}
        assert entry["source"] in compose["secrets"], entry
        target = entry.get("target", entry["source"])
        deployed = target if target.startswith("/") else f"/run/secrets/{target}"
        here = writeSecret(tmp / "secrets" / deployed.lstrip("/"))
        places[str(Path(deployed).parent)] = here.parent
        if "uid" in entry:
            assert int(entry["uid"]) == imageUid(), "secret owned by the image's user"
            assert int(entry["mode"]) & 0o077 == 0, "secret readable by others"
    return places


def composeRoles(compose) -> Dict[str, str]:
    return {name: service["command"][0] for name, service in compose["services"].items()}


def test_compose_file_has_one_balancer_and_three_backends():
    compose = loadCompose()
    roles = composeRoles(compose)
    assert sorted(roles.values()) == ["cluster-backend"] * 3 + ["cluster-balancer"]
    for service in compose["services"].values():
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    images = {s["image"] for s in compose["services"].values()}
    assert len(images) == 1, "every service runs the same image"


def test_compose_file_matches_the_compose_specification():
    yaml = yamlModule()
    spec = pytest.importorskip(
        "compose_spec", reason="compose file schema: pip install compose-spec"
    )
    # PyYAML applies the << merge keys; compose_spec does not know them.
    data = yaml.safe_load(COMPOSE.read_text())
    parsed = spec.PyCompose.from_json(json.dumps(data))
    assert sorted(parsed.service_names()) == sorted(data["services"])
    parsed.to_spec()


def test_compose_command_lines_are_accepted(tmp_path):
    compose = loadCompose()
    parsed = {}
    for name, service in compose["services"].items():
        places = composeSecrets(compose, service, tmp_path / name)
        plugin, options = parseTwistd(relocate(composeCommand(service), places))
        assert options["secret"] == SECRET, f"{name} must use the compose secret"
        parsed[name] = (plugin, options)
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        if Path(test[1]).name == "cluster-admin":
            args = parseAdmin(relocate(test[1:], places))
            assert serverPort(options["admin"]) == clientHostPort(args.admin)[1]
            assert clientHostPort(args.admin)[0] in ("127.0.0.1", "localhost")
        elif "/readyz" in " ".join(test):
            # The balancer's readiness, from its metrics listener.
            assert options["metrics"], f"{name}: /readyz needs --metrics"
            assert f"http://127.0.0.1:{serverPort(options['metrics'])}/readyz" in " ".join(test)
        else:
            assert f"('127.0.0.1', {serverPort(options['listen'])})" in " ".join(test)

    (balancer,) = [n for n, (p, _) in parsed.items() if p == "cluster-balancer"]
    bOptions = parsed[balancer][1]
    from twistedcluster.balancer.service import isLocalOnly

    assert not isLocalOnly(bOptions["control"]), "backends in other containers must reach it"
    assert isLocalOnly(bOptions["admin"]), "keep the admin listener inside the container"
    controlPort = serverPort(bOptions["control"])
    service = compose["services"][balancer]
    published = {int(str(p).split(":")[-2]) if str(p).count(":") else int(p): int(str(p).split(":")[-1]) for p in service["ports"]}
    assert set(published.values()) == {serverPort(bOptions["listen"])}, "publish the proxy only"
    stateDir = str(Path(bOptions["state-file"]).parent)
    assert service.get("read_only") is True
    assert any(v.split(":")[1] == stateDir for v in service["volumes"]), "state on a volume"

    names = set()
    for name, (plugin, options) in parsed.items():
        if plugin != "cluster-backend":
            continue
        assert [clientHostPort(b) for b in options["balancers"]] == [(balancer, controlPort)]
        grace = seconds(compose["services"][name]["stop_grace_period"])
        assert grace > options["drain-timeout"] + DRAIN_ACK, f"{name} killed mid-drain"
        assert compose["services"][name].get("stop_signal", "SIGTERM") == "SIGTERM"
        names.add(options["name"])
    assert len(names) == 3, "each backend its own name"


# -- Kubernetes ---------------------------------------------------------------

MANIFESTS = ["balancer.yaml", "backend.yaml", "networkpolicy.yaml"]
FIELD_SAMPLES = {
    "metadata.name": "cluster-backend-6b7f9c8d4-x7k2p",
    "metadata.namespace": "default",
    "status.podIP": "10.1.2.3",
}


def loadManifests() -> List[dict]:
    yaml = yamlModule()
    docs = []
    for name in MANIFESTS:
        docs.extend(d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d)
    return docs


def byKind(docs, kind) -> List[dict]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs) -> List[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def matches(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def expandKubernetes(word: str, env: Dict[str, str]) -> str:
    """
    $(NAME) as the kubelet expands it in command and args; $$ escapes.
    """
    def one(m):
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's env"
        return env[m.group(1)]

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, word)


def containerArgv(container: dict) -> List[str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = FIELD_SAMPLES[e["valueFrom"]["fieldRef"]["fieldPath"]]
    if "command" in container:
        argv = container["command"] + container.get("args", [])
    else:
        argv = imageEntrypoint() + container.get("args", execForm("CMD"))
    return [expandKubernetes(w, env) for w in argv]


def podPlaces(pod: dict, container: dict, tmp: Path) -> Dict[str, Path]:
    """
    Make the container's volumes under C{tmp}: Secret volumes hold the test
    secret under each item's path.
    """
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    places = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        here = tmp / mount["name"]
        here.mkdir(parents=True)
        if "secret" in volume:
            assert mount.get("readOnly") is True
            for item in volume["secret"]["items"]:
                writeSecret(here / item["path"])
        else:
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
        places[mount["mountPath"]] = here
    return places


def parsedContainers(tmp: Path):
    """
    Every container of every workload: (workload, pod spec, container,
    plugin, options).
    """
    out = []
    for w in workloads(loadManifests()):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            places = podPlaces(pod, c, tmp / w["metadata"]["name"] / c["name"])
            plugin, options = parseTwistd(relocate(containerArgv(c), places))
            options["places"] = places
            out.append((w, pod, c, plugin, options))
    return out


def test_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="Kubernetes schemas: pip install kubernetes-validate"
    )
    from kubernetes_validate.utils import all_versions

    docs = loadManifests()
    assert docs
    for version in sorted({all_versions()[0], kv.latest_version()}):
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {path}: {e.message}")


def test_kustomization_lists_every_manifest():
    yaml = yamlModule()
    k = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == sorted(MANIFESTS)
    assert sorted(MANIFESTS) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_kubernetes_command_lines_are_accepted(tmp_path):
    containers = parsedContainers(tmp_path)
    assert sorted(p for *_, p, _ in containers) == ["cluster-backend", "cluster-balancer"]
    for w, pod, c, plugin, options in containers:
        where = f"{w['kind']}/{w['metadata']['name']}"
        assert options["secret"] == SECRET, f"{where} must read the Secret volume"
        # Every TCP listener is a declared port; every declared port listens.
        listeners = [options["listen"]] + (
            [options["control"]] if plugin == "cluster-balancer" else []
        ) + ([options["metrics"]] if options.get("metrics") else [])
        ports = {p["containerPort"] for p in c["ports"]}
        assert ports == {serverPort(l) for l in listeners}, where
        if plugin == "cluster-balancer":
            from twistedcluster.balancer.service import isLocalOnly

            assert isLocalOnly(options["admin"]), f"{where}: admin listener outside the pod"
            state = Path(options["state-file"]).parent
            assert state in options["places"].values(), f"{where}: state file on a volume"
            assert os.access(state, os.W_OK)
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


#: What the kubelet writes in a pod's resolv.conf (the cluster's DNS domain
#: is cluster.local unless its administrator chose another).
POD_SEARCH = ["{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
POD_NDOTS = 5


def test_backends_find_every_balancer_in_the_headless_services_srv_record(tmp_path):
    """
    The backends' --balancer srv:NAME, looked up as a pod's resolver does,
    is the first name that Kubernetes DNS publishes for the port named
    cluster-control of the StatefulSet's headless Service, in the namespace
    the kustomization puts both in: scaling the balancers needs no change to
    the backends.
    """
    from twistedcluster.backend.discovery import isSRV, lookupNames, srvName

    yaml = yamlModule()
    docs = loadManifests()
    containers = parsedContainers(tmp_path)
    (sts,) = byKind(docs, "StatefulSet")
    (balancer,) = [o for w, *_, p, o in containers if p == "cluster-balancer"]
    (balancerContainer,) = [c for w, pod, c, p, o in containers if p == "cluster-balancer"]
    headless = [s for s in byKind(docs, "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"
    assert headless[0]["spec"].get("publishNotReadyAddresses") is True, (
        "a balancer is ready once a backend registered: it must be in the record before")
    assert matches(headless[0]["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    controlPort = serverPort(balancer["control"])
    (port,) = headless[0]["spec"]["ports"]
    assert port["port"] == controlPort and port["protocol"] == "TCP"
    named = {p["name"]: p["containerPort"] for p in balancerContainer["ports"]}
    assert named[port["targetPort"]] == controlPort
    # Every manifest lands in the kustomization's namespace (none names its own).
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    namespace = kustomization.get("namespace", "default")
    assert all("namespace" not in d["metadata"] for d in docs)
    published = f"_{port['name']}._{port['protocol'].lower()}.{headless[0]['metadata']['name']}" \
        f".{namespace}.svc.cluster.local"
    search = [d.format(namespace=namespace) for d in POD_SEARCH]

    backends = [o for *_, p, o in containers if p == "cluster-backend"]
    assert backends
    for options in backends:
        (only,) = options["balancers"]
        assert isSRV(only), f"backends find the balancers in DNS, not listed: {only}"
        assert options["dns-server"] is None, "the pod's own resolver"
        name = srvName(only)
        assert not name.endswith("."), "a short name: the namespace comes from the pod"
        assert lookupNames(name, search, POD_NDOTS)[0] == published, (name, published)
        assert options["name"] == FIELD_SAMPLES["metadata.name"]


def test_probes_services_and_budgets_line_up(tmp_path):
    docs = loadManifests()
    containers = parsedContainers(tmp_path)
    for w, pod, c, plugin, options in containers:
        where = f"{w['kind']}/{w['metadata']['name']}"
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert matches(w["spec"]["selector"]["matchLabels"], labels)
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            check = c[probe].get("tcpSocket") or c[probe]["httpGet"]
            port = check["port"]
            assert named.get(port, port) in named.values(), f"{where} {probe} port {port}"
            if "httpGet" in c[probe]:
                # The metrics listener serves it, on that port, for the kubelet.
                assert check["path"] in ("/healthz", "/readyz"), where
                assert options["metrics"], f"{where}: {check['path']} needs --metrics"
                assert serverPort(options["metrics"]) == named.get(port, port), where
        if plugin == "cluster-balancer":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", "ready means a backend up"
        budgets = [b for b in byKind(docs, "PodDisruptionBudget") if matches(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(budgets) == 1, f"{where}: one PodDisruptionBudget"
        spec = budgets[0]["spec"]
        if "minAvailable" in spec:
            assert spec["minAvailable"] < w["spec"]["replicas"], "a budget that blocks every eviction"
        else:
            assert spec["maxUnavailable"] >= 1
        # Stop: the preStop pause, then twistd's own shutdown (a backend
        # drains), all within the grace period.
        pause = 0
        hook = c.get("lifecycle", {}).get("preStop")
        if hook:
            command = hook["exec"]["command"]
            assert command[0] == "sleep"
            pause = float(command[1])
        drain = options["drain-timeout"] + DRAIN_ACK if plugin == "cluster-backend" else 1
        assert pod["terminationGracePeriodSeconds"] > pause + drain, where
        # Not root, nothing to escalate to, no API token.
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == imageUid()
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False
    for service in byKind(docs, "Service"):
        pods = [w for w in workloads(docs) if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1, service["metadata"]["name"]
        named = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, (service["metadata"]["name"], port)


def test_network_policies_open_the_listening_ports(tmp_path):
    docs = loadManifests()
    containers = parsedContainers(tmp_path)
    policies = byKind(docs, "NetworkPolicy")
    for w, pod, c, plugin, options in containers:
        labels = w["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if matches(p["spec"]["podSelector"]["matchLabels"], labels)]
        opened = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        assert opened == {p["containerPort"] for p in c["ports"]}, w["metadata"]["name"]


# -- the units, run for real under socket activation ------------------------


@pytest.mark.e2e
def test_units_serve_under_socket_activation(tmp_path):
    """
    The balancer's and a backend's ExecStart, run as systemd would run them
    (the proxy socket inherited as in cluster-balancer.socket), serve an
    echo through the inherited socket; the backend drains and stops on
    SIGTERM.
    """
    from twistedcluster.localcluster import (
        TWISTD,
        ProcessExited,
        adminCommand,
        echoOnce,
        freePort,
        waitFor,
    )

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    proxyPort = listener.getsockname()[1]
    control, admin, service = freePort(), freePort(), freePort()
    (fdName,) = socketNames()

    _, balancerSpec, balancerArgv = unitCommand(
        "cluster-balancer.service",
        tmp_path / "balancer",
        overrides=[
            ("BALANCER_CONTROL", f"tcp:{control}:interface=127.0.0.1"),
            ("BALANCER_ADMIN", f"tcp:{admin}:interface=127.0.0.1"),
        ],
    )
    backendUnit = readUnit("cluster-backend@.service")
    backendSpec = specifiers("cluster-backend@.service", str(service), tmp_path / "backend")
    prepareUnit(backendUnit, backendSpec)
    backendEnv = unitEnvironment(
        backendUnit, backendSpec,
        overrides=[("BACKEND_BALANCERS", f"--balancer=tcp:host=127.0.0.1:port={control}"),
                   ("BACKEND_DRAIN_TIMEOUT", "5")],
    )
    backendArgv = execArgv(backendUnit, backendEnv, backendSpec)
    name = f"{HOST}-{service}"

    def python(argv):
        assert argv[0] == INSTALLED_TWISTD
        return [sys.executable, "-c", TWISTD, *argv[1:]]

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # As systemd does: the socket at descriptor 3, LISTEN_* naming it, for
    # this very process (exec keeps the pid).
    activate = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES=sys.argv[2]); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    fd = listener.fileno()
    procs = []
    logs = []
    pidFile = tmp_path / "reloaded.pid"
    daemonPid: List[int] = []

    def start(tag, argv, **kw):
        log = open(tmp_path / f"{tag}.log", "wb")
        logs.append(log)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, **kw)
        procs.append(p)
        return p

    def logOf(tag):
        return (tmp_path / f"{tag}.log").read_text(errors="replace")

    try:
        balancer = start(
            "balancer",
            [sys.executable, "-c", activate, str(fd), fdName, *python(balancerArgv)],
            pass_fds=(fd,),
        )
        listener.close()  # the balancer holds the only copy now
        backend = start("backend", python(backendArgv))

        secret = str(Path(balancerSpec["d"]) / "secret")
        watched = [("balancer", balancer), ("backend", backend)]

        def up():
            for tag, p in watched:
                if p.poll() is not None:
                    raise ProcessExited(f"{tag} exited ({p.returncode}):\n{logOf(tag)[-3000:]}")
            r = subprocess.run(
                adminCommand(f"tcp:host=127.0.0.1:port={admin}",
                             ["--secret-file", secret, "--timeout", "3", "status", "--json"]),
                capture_output=True, text=True, timeout=30, env=env,
            )
            return r.returncode == 0 and any(
                b["name"] == name and b["state"] == "up" for b in json.loads(r.stdout)
            )

        waitFor(up, 30, f"backend {name} up behind the socket-activated balancer")
        for i in range(4):
            payload = b"through the inherited socket %d\n" % i
            assert echoOnce("127.0.0.1", proxyPort, payload) == payload

        # systemctl reload: ExecReload= as systemd runs it (no LISTEN_FDS
        # now), with a pid file here so that the daemon can be stopped.
        reloadArgv = execArgv(
            readUnit("cluster-balancer.service"),
            unitEnvironment(readUnit("cluster-balancer.service"), balancerSpec, overrides=[
                ("BALANCER_CONTROL", f"tcp:{control}:interface=127.0.0.1"),
                ("BALANCER_ADMIN", f"tcp:{admin}:interface=127.0.0.1"),
            ]),
            balancerSpec,
            "ExecReload",
        )
        reloadArgv[reloadArgv.index("--pidfile=")] = f"--pidfile={pidFile}"
        reloader = start("reload", python(reloadArgv))
        # twistd returns once the daemon has taken over.
        assert reloader.wait(60) == 0, logOf("reload")
        daemonPid.append(int(pidFile.read_text()))
        # The old balancer, with no connection left, exits at once.
        assert balancer.wait(30) in (0, -signal.SIGTERM), logOf("balancer")
        assert "this one stopped accepting" in logOf("balancer")
        watched.remove(("balancer", balancer))
        waitFor(up, 30, f"backend {name} up behind the new balancer")
        for i in range(4):
            payload = b"through the socket taken over %d\n" % i
            assert echoOnce("127.0.0.1", proxyPort, payload) == payload

        started = time.monotonic()
        backend.send_signal(signal.SIGTERM)
        # twistd stops cleanly, then ends by the signal it got: systemd
        # counts death by SIGTERM as a clean exit (no Restart=on-failure).
        assert backend.wait(20) in (0, -signal.SIGTERM), logOf("backend")
        assert time.monotonic() - started < 10
        assert "draining: telling balancers" in logOf("backend")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for pid in daemonPid:
            stopDaemon(pid)
        for log in logs:
            log.close()
    for tag in ("balancer", "backend"):
        text = logOf(tag)
        assert "Traceback" not in text and "Unhandled" not in text, f"{tag}:\n{text[-3000:]}"
    assert "systemd:domain=INET:name=proxy" in logOf("balancer")


def stopDaemon(pid: int, timeout: float = 15.0) -> None:
    """
    SIGTERM the daemon this test started (by its pid file), SIGKILL if it
    outlives C{timeout}.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
