"""
Every command the README shows works as written.

Each line of every ```sh block is split into simple commands, and each one
is either run for real (the local cluster and its client commands, and the
"Running it yourself" cluster, on 127.0.0.1 with free ports substituted) or
checked: twistd, cluster-admin, cluster-connect and bench/run.py command
lines go through their real option parsers, so a misspelled option fails;
pip extras must exist in setup.py; repository paths and unit names must
exist. A command this module does not know fails the test: a new README
command has to be classified here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from twisted.python import usage

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

#: Separators between simple commands, and redirections (dropped with their target).
SEPARATORS = {"&&", "||", "|", ";", "(", ")", "&"}
REDIRECTIONS = {"<", ">", ">>", "<(", "2>"}
#: Programs only the deployment files use; their repository paths are checked
#: here, the files themselves by tests/test_deploy.py.
EXTERNAL = {"install", "systemctl", "docker", "kubectl", "head", "base64", "umask",
            "printf", "cd", "mkdir", "openssl", "chmod", "echo", "curl"}


def shBlocks(text: str) -> List[Tuple[str, str]]:
    """
    Every ```sh block of C{text}, with the heading it sits under.
    """
    blocks = []
    heading = ""
    inside = None
    for line in text.splitlines():
        if inside is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.strip() == "```sh":
                inside = []
        elif line.strip() == "```":
            blocks.append((heading, "\n".join(inside)))
            inside = None
        else:
            inside.append(line)
    return blocks


def commandLines(block: str) -> List[str]:
    return [line for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def simpleCommands(line: str) -> List[List[str]]:
    """
    The simple commands of a shell line (comments, separators and
    redirections removed), program first.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    commands: List[List[str]] = [[]]
    tokens = list(lexer)
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in SEPARATORS:
            commands.append([])
        elif token in REDIRECTIONS:
            skip = token != "<("
            if token == "<(":
                commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def program(argv: List[str]) -> str:
    return Path(argv[0]).name


def splitEnv(argv: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """
    The C{NAME=value} assignments a shell command starts with, and the rest.
    """
    env: Dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, _, value = argv[0].partition("=")
        env[name] = value
        argv = argv[1:]
    return env, argv


def allCommands():
    for number, (heading, block) in enumerate(shBlocks(README)):
        for line in commandLines(block):
            for argv in simpleCommands(line):
                env, argv = splitEnv(argv)
                assert set(env) <= {"PYTHONPATH"}, line
                if env:
                    assert (ROOT / env["PYTHONPATH"]).is_dir(), line
                yield number, heading, line, argv


@contextlib.contextmanager
def pythonPathOf(line: str):
    """
    The C{PYTHONPATH=FOLDER} a README line gives its command, on sys.path
    meanwhile (so that --service finds the module it names).
    """
    env, _ = splitEnv(simpleCommands(line)[0])
    folder = str(ROOT / env["PYTHONPATH"]) if "PYTHONPATH" in env else None
    if folder is not None:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder is not None:
            sys.path.remove(folder)


# -- parse checks -------------------------------------------------------------


def checkTwistd(argv: List[str]) -> None:
    from twisted.scripts.twistd import ServerOptions

    config = ServerOptions()
    try:
        config.parseOptions(argv[1:])
    except usage.UsageError as e:
        pytest.fail(f"twistd rejects {shlex.join(argv)}: {e}")
    assert config.subCommand in ("cluster-balancer", "cluster-backend"), argv
    # Without it a second twistd in the same folder refuses to start
    # ("Another twistd server is running"): examples must work as written.
    assert config["pidfile"] == "", f"{shlex.join(argv)}: give --pidfile="


#: Where README commands find the programs: the venv of "Try it", or the
#: deployment's.
BINDIRS = (".venv/bin/", "/opt/twistedcluster/bin/")


def checkBinDir(argv: List[str]) -> None:
    """
    A program the README installs is run from where it installs it (a fresh
    shell has no venv activated).
    """
    assert argv[0].startswith(BINDIRS), f"{shlex.join(argv)}: run it as .venv/bin/{argv[0]}"


def checkArgparse(parser, argv: List[str]) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv[1:])
    except SystemExit as e:
        if e.code != 0:
            pytest.fail(f"{shlex.join(argv)} is rejected: {err.getvalue()}")


def benchParser():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("_readme_bench_run", ROOT / "bench" / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module.parseArgs


def checkPip(argv: List[str]) -> None:
    assert argv[1] == "install", argv
    setup = (ROOT / "setup.py").read_text()
    for target in argv[2:]:
        m = re.fullmatch(r"\.(?:\[(\w+)\])?", target)
        assert m, f"pip installs something other than this checkout: {target}"
        if m.group(1):
            assert re.search(rf'"{m.group(1)}"\s*:', setup), f"setup.py has no extra {m.group(1)}"


def checkPython(argv: List[str]) -> None:
    args = argv[1:]
    if args[:2] == ["-m", "venv"]:
        assert len(args) == 3, argv
    elif args[:2] == ["-m", "pytest"]:
        assert len(args) == 2, argv
    elif args[:1] == ["-c"]:
        r = subprocess.run([sys.executable, "-c", args[1]], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=_env())
        assert r.returncode == 0, f"{shlex.join(argv)}: {r.stderr}"
    elif args[:1] == ["bench/run.py"]:
        parse = benchParser()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parse(args[1:])
        except SystemExit:
            pytest.fail(f"{shlex.join(argv)} is rejected: {err.getvalue()}")
    else:
        pytest.fail(f"README runs python in a way this test does not know: {shlex.join(argv)}")


def checkExternal(argv: List[str], cwd: Path) -> Path:
    """
    Check the repository paths and unit names a deployment command names;
    return the folder the next command runs in.
    """
    name = program(argv)
    if name == "cd":
        target = cwd / argv[1]
        assert target.is_dir(), argv
        return target
    for token in argv[1:]:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if value.startswith("deploy/"):
            assert list(cwd.glob(value)), f"{shlex.join(argv)}: nothing at {value}"
    if name == "systemctl" and argv[1:3] == ["enable", "--now"]:
        for unit in argv[3:]:
            base, _, rest = unit.partition("@")
            kind = rest.rsplit(".", 1)[1] if "." in rest else "service"
            if "." in unit and not rest:
                base, kind = unit.rsplit(".", 1)
            filename = f"{base}@.{kind}" if rest else f"{base}.{kind}"
            assert (ROOT / "deploy" / "systemd" / filename).exists(), unit
    if name == "docker" and argv[1] == "compose":
        assert (cwd / "compose.yaml").exists() or (cwd / "docker-compose.yml").exists()
    return cwd


def _env() -> Dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_every_readme_command_is_known_and_parses():
    from twistedcluster.cli import admin as admincli
    from twistedcluster.cli import connect as connectcli

    seen = set()
    cwd, current = ROOT, None
    for number, heading, line, argv in allCommands():
        if number != current:
            # Each block starts at the top of a clone.
            cwd, current = ROOT, number
        name = program(argv)
        seen.add(name)
        if name in ("twistd", "cluster-admin", "cluster-connect", "cluster-local"):
            checkBinDir(argv)
        if name == "twistd":
            with pythonPathOf(line):
                checkTwistd(argv)
        elif name == "cluster-admin":
            checkArgparse(admincli.parser(), argv)
        elif name == "cluster-connect":
            checkArgparse(connectcli.parser(), argv)
        elif name == "cluster-local":
            assert argv[1:] == [], "test_readme_local_cluster_commands_run runs it bare"
        elif name == "pip":
            checkPip(argv)
        elif name in ("python", "python3"):
            checkPython(argv)
        elif name in EXTERNAL:
            cwd = checkExternal(argv, cwd)
        else:
            pytest.fail(f"README command under {heading!r} not checked by any test: {line}")
    assert {"twistd", "cluster-admin", "cluster-connect", "cluster-local", "pip"} <= seen


@pytest.mark.parametrize("bad", [
    "twistd -n cluster-balancer --lisen tcp:8000",
    "twistd -n cluster-backend --listen tcp:9001 --nmae web1",
    "cluster-admin --secret-file s stauts",
    "cluster-connect --drect 127.0.0.1:8000",
    "python bench/run.py --quik",
    "python3 -m venv .venv && .venv/bin/pip install '.[tests]'",
])
def test_a_misspelled_command_fails(bad, monkeypatch):
    """
    The checks above catch a README command with a misspelled option,
    command or extra.
    """
    monkeypatch.setattr(sys.modules[__name__], "README", f"# x\n\n```sh\n{bad}\n```\n")
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        _checkOnly()


def _checkOnly():
    """
    The parse checks alone (without the coverage assertion at the end).
    """
    from twistedcluster.cli import admin as admincli
    from twistedcluster.cli import connect as connectcli

    for _, heading, line, argv in allCommands():
        name = program(argv)
        if name == "twistd":
            with pythonPathOf(line):
                checkTwistd(argv)
        elif name == "cluster-admin":
            checkArgparse(admincli.parser(), argv)
        elif name == "cluster-connect":
            checkArgparse(connectcli.parser(), argv)
        elif name == "pip":
            checkPip(argv)
        elif name in ("python", "python3"):
            checkPython(argv)


# -- run for real ---------------------------------------------------------------


def blockUnder(heading: str, containing: str) -> List[str]:
    for h, block in shBlocks(README):
        if h == heading and containing in block:
            return commandLines(block)
    raise AssertionError(f"no sh block under {heading!r} with {containing!r}")


def asLocal(argv: List[str]) -> List[str]:
    """
    A README command line for this checkout's interpreter: console scripts
    run as their modules.
    """
    modules = {"cluster-admin": "twistedcluster.cli.admin",
               "cluster-connect": "twistedcluster.cli.connect",
               "cluster-local": "twistedcluster.cli.local"}
    return [sys.executable, "-m", modules[program(argv)], *argv[1:]]


def substitute(token: str, ports: Dict[int, int]) -> str:
    for readme, free in ports.items():
        token = re.sub(rf"(?<=127\.0\.0\.1:){readme}\b", str(free), token)
        token = re.sub(rf"^tcp:{readme}$", f"tcp:{free}:interface=127.0.0.1", token)
    return token


def runLine(line: str, ports: Dict[int, int], adminPort: int, cwd: Path) -> subprocess.CompletedProcess:
    commands = simpleCommands(line)
    stdin = "hello\n"
    if program(commands[0]) == "echo":
        stdin = " ".join(commands[0][1:]) + "\n"
        commands = commands[1:]
    [argv] = commands
    argv = [substitute(t, ports) for t in argv]
    local = asLocal(argv)
    if program(argv) == "cluster-admin":
        local[3:3] = ["--admin", f"tcp:host=127.0.0.1:port={adminPort}"]
    return subprocess.run(local, input=stdin, capture_output=True, text=True, timeout=30,
                          cwd=cwd, env=_env())


def freeRun(count: int, avoid: set) -> int:
    """
    The first of C{count} consecutive ports on 127.0.0.1 that were all free
    a moment ago and are not in C{avoid}.  Probed as Twisted listens
    (C{SO_REUSEADDR}): a port that other tests' connections left in
    TIME_WAIT is free to a listener.
    """
    import socket

    from twistedcluster.localcluster import freePort

    def probe():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sockets.append(s)
        return s

    for _ in range(200):
        sockets: list = []
        try:
            # Outside the kernel's ephemeral range (freePort): there, other
            # tests' outgoing connections hold ports a moment at a time.
            base = freePort()
            if base + count > 65536 or avoid & set(range(base, base + count)):
                continue
            for port in range(base, base + count):
                probe().bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.mark.e2e
def test_readme_local_cluster_commands_run(tmp_path):
    """
    "Try it": the first command's cluster-local, then every command of the
    next block against it, as written but for the ports.
    """
    import signal

    from twistedcluster.localcluster import freePort

    [first] = blockUnder("Try it: a local cluster", "cluster-local")
    local = [a for a in simpleCommands(first) if program(a) == "cluster-local"]
    assert local == [[".venv/bin/cluster-local"]]
    ports = {n: freePort() for n in (8000, 8002, 8100, 8101)}
    # cluster-local puts its three backends on consecutive ports.
    ports[9001] = freeRun(3, avoid=set(ports.values()))
    proc = subprocess.Popen(
        asLocal(local[0]) + [f"--port={ports[8000]}", f"--redirect-port={ports[8002]}",
                             f"--control-port={ports[8100]}", f"--admin-port={ports[8101]}",
                             f"--backend-port={ports[9001]}"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )
    try:
        out = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("Ctrl-C stops" in x for x in out):
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
        assert any("Ctrl-C stops" in x for x in out), "".join(out)
        for line in blockUnder("Try it: a local cluster", "cluster-admin"):
            r = runLine(line, ports, ports[8101], tmp_path)
            assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
            if "cluster-connect" in line:
                assert r.stdout == "hello\n", line
            if line.split("#")[0].rstrip().endswith("status"):
                assert "backend-1" in r.stdout
        r = runLine(".venv/bin/cluster-admin --secret-file cluster-run/secret status --json",
                    ports, ports[8101], tmp_path)
        assert {b["name"]: b["state"] for b in json.loads(r.stdout)}["backend-1"] == "up"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.e2e
def test_readme_running_it_yourself_commands_run(tmp_path):
    """
    "Running it yourself": the balancer and two backends as written (their
    ports free ones on 127.0.0.1, the default control and admin ports too),
    then cluster-admin status lists both backends up.
    """
    from twistedcluster.localcluster import TWISTD, Process, freePort, waitFor

    lines = blockUnder("Running it yourself", "cluster-admin status")
    ports = {n: freePort() for n in (8000, 9001, 9002)}
    control, admin = freePort(), freePort()
    processes = []
    try:
        names = []
        for line in lines:
            [argv] = simpleCommands(line)
            if program(argv) != "twistd":
                continue
            args = [substitute(t, ports) for t in argv[1:]]
            plugin = next(a for a in args if a.startswith("cluster-"))
            if plugin == "cluster-balancer":
                args += [f"--control=tcp:{control}:interface=127.0.0.1",
                         f"--admin=tcp:{admin}:interface=127.0.0.1"]
            else:
                args += [f"--balancer=tcp:host=127.0.0.1:port={control}"]
                names.append(args[args.index("--name") + 1])
            # As written: in one folder, twistd's own --pidfile and logging.
            proc = Process(plugin, [sys.executable, "-c", TWISTD, *args],
                           tmp_path / f"{len(processes)}.log", env=_env(), cwd=tmp_path)
            processes.append(proc)
        assert names == ["web1", "web2"]
        [status] = [line for line in lines if program(shlex.split(line)) == "cluster-admin"]

        def listed():
            r = runLine(status + " --json", ports, admin, tmp_path)
            if r.returncode != 0:
                return False
            states = {b["name"]: b["state"] for b in json.loads(r.stdout)}
            return all(states.get(n) == "up" for n in names)

        waitFor(listed, 20, "web1 and web2 up")
        assert all(proc.alive() for proc in processes)
        assert not (tmp_path / "twistd.pid").exists()
        r = runLine(status, ports, admin, tmp_path)
        assert r.returncode == 0 and "web1" in r.stdout and "web2" in r.stdout, r
    finally:
        for proc in reversed(processes):
            proc.stop()


def test_the_readme_web_example_is_examples_hello_py():
    """
    The twisted.web service the README shows is the file its command runs.
    """
    start = README.index("```python\nfrom twisted.web.resource import Resource")
    block = README[start:].split("\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "examples" / "hello.py").read_text()
