#!/usr/bin/env bash
# The balancer's unit under a real systemd, on a host whose PID 1 is not
# systemd: systemctl restart, a crash (kill -9, Restart=on-failure) and
# systemctl reload while a client keeps opening connections; prints, for
# each, the connects refused and the connections cut.  The figures in
# docs/operations.md ("Checked with systemd 252") come from it.
#
#     sudo bench/systemd_restart.sh            # from the repository root
#
# Needs root, /lib/systemd/systemd, unshare and /usr/bin/python3 (or
# $PYTHON) with venv.  systemd
# runs as PID 1 of new pid, mount, uts, ipc and network namespaces: its
# /etc, /var and /opt are overlays whose changes go to $WORK, its /run and
# /tmp are its own, only the units below are there (this host's enabled
# units are hidden, and every unit that could touch the host from a shared
# kernel, such as systemd-tmpfiles, udev, sysctl or binfmt, is masked), and
# its processes listen in their own network namespace.  On the host it
# leaves $WORK and a cgroup named after it in the systemd and unified
# hierarchies, removed at the end.
#
# In such a namespace systemd 252 gave services an empty credentials folder
# (LoadCredential=), so a drop-in passes --secret-file a plain file instead;
# everything else is deploy/systemd as shipped.
set -euo pipefail
[ "${1:-}" = "--inside" ] || cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/tc-systemd-check}
NAME=$(basename "$WORK")
MASK="cryptsetup.target dev-hugepages.mount dev-mqueue.mount integritysetup.target
kmod-static-nodes.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount
sys-fs-fuse-connections.mount sys-kernel-config.mount sys-kernel-debug.mount
sys-kernel-tracing.mount systemd-ask-password-console.path systemd-binfmt.service
systemd-firstboot.service systemd-machine-id-commit.service systemd-modules-load.service
systemd-pcrphase-sysinit.service systemd-pcrphase.service systemd-random-seed.service
systemd-repart.service systemd-sysctl.service systemd-sysusers.service
systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup.service
systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service systemd-udev-trigger.service
systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
systemd-update-utmp.service systemd-initctl.socket systemd-journald-audit.socket
swap.target local-fs.target remote-fs.target apparmor.service systemd-remount-fs.service
systemd-fsck-root.service e2scrub_reap.service systemd-hwdb-update.service ldconfig.service
systemd-journal-catalog-update.service systemd-update-done.service getty.target
systemd-logind.service systemd-quotacheck.service systemd-boot-system-token.service
systemd-pstore.service systemd-rfkill.socket"

if [ "${1:-}" = "--inside" ]; then
  # PID 1's parent, in the new namespaces: lay the file system, then exec systemd.
  mount --make-rprivate /
  for d in etc var opt; do
    mkdir -p "$WORK/$d-up" "$WORK/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$WORK/$d-up,workdir=$WORK/$d-work" "/$d"
  done
  mount -t tmpfs tmpfs /run
  mount -t tmpfs tmpfs /etc/systemd/system
  mkdir -p /opt/twistedcluster /etc/twistedcluster
  mount --bind "$WORK/opt/twistedcluster" /opt/twistedcluster
  cp "$WORK"/units/* /etc/systemd/system/
  for u in $MASK; do ln -sf /dev/null "/etc/systemd/system/$u"; done
  for u in cluster-balancer.service cluster-backend@.service; do
    mkdir -p "/etc/systemd/system/$u.d" && cp "$WORK/dropin/$u.conf" "/etc/systemd/system/$u.d/"
  done
  cp "$WORK"/units/*.env /etc/twistedcluster/
  ( umask 077; head -c 32 /dev/urandom | base64 > /etc/twistedcluster/secret )
  install -m 0644 /etc/twistedcluster/secret /etc/twistedcluster/test-secret
  mount --bind "$WORK" /mnt
  mount -t tmpfs tmpfs /tmp
  mkdir -p "$WORK" && mount --bind /mnt "$WORK"
  echo "$NAME" > /etc/hostname
  hostname "$NAME"
  export container=unshare
  exec /lib/systemd/systemd --system --unit=tc-check.target
fi

[ "$(id -u)" -eq 0 ] || { echo "$0: run as root" >&2; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK/units" "$WORK/dropin" "$WORK/opt"
chmod 755 "$WORK"
echo "== the project in a virtual environment, at /opt/twistedcluster inside"
# The interpreter must be one the units' dynamic user may run: not under
# /root or /home (ProtectHome=yes), so the system's by default.
"${PYTHON:-/usr/bin/python3}" -m venv "$WORK/opt/twistedcluster"
"$WORK/opt/twistedcluster/bin/python" -m pip install -q . > "$WORK/pip.log" 2>&1
"$WORK/opt/twistedcluster/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
grep -l "^#!$WORK/opt/twistedcluster/bin/python" "$WORK"/opt/twistedcluster/bin/* \
  | xargs sed -i "1s|^#!$WORK/opt/twistedcluster/bin/python|#!/opt/twistedcluster/bin/python|"
cp deploy/systemd/* "$WORK/units/"
cp "$0" "$WORK/run.sh"
cat > "$WORK/units/tc-check.target" <<'EOF'
[Unit]
Description=the balancer under a real systemd: nothing else
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service
EOF
# The drop-ins: the unit's own command lines, the secret from a plain file.
python3 - "$WORK" <<'EOF'
import sys
work = sys.argv[1]
for unit, keys in (("cluster-balancer.service", ("ExecStart=", "ExecReload=")),
                   ("cluster-backend@.service", ("ExecStart=",))):
    text = open(f"{work}/units/{unit}").read()
    out = ["[Service]", "LoadCredential="] + list(keys)
    for key in keys:
        start = text.index("\n" + key) + 1
        lines = []
        for line in text[start:].split("\n"):
            lines.append(line)
            if not line.endswith("\\"):
                break
        out.append("\n".join(lines).replace("%d/secret", "/etc/twistedcluster/test-secret"))
    open(f"{work}/dropin/{unit}.conf", "w").write("\n".join(out) + "\n")
EOF
cat > "$WORK/load.py" <<'EOF'
# New connections until STOP exists: proxied echoes (3 threads) and
# connects to the admin port (1); prints the figures as JSON.
import json, os, socket, sys, threading, time
stop = sys.argv[1]
lock = threading.Lock()
f = {"proxied": 0, "refused": 0, "connectFailed": 0, "cut": 0, "corrupted": 0,
     "adminConnects": 0, "adminRefused": 0, "slowestSeconds": 0.0}
def count(key):
    with lock:
        f[key] += 1
def proxy():
    while not os.path.exists(stop):
        t = time.monotonic()
        try:
            s = socket.create_connection(("127.0.0.1", 8000), timeout=30)
        except ConnectionRefusedError:
            count("refused"); time.sleep(0.01); continue
        except OSError:
            count("connectFailed"); time.sleep(0.01); continue
        p, got = os.urandom(200), b""
        try:
            s.sendall(p)
            while len(got) < len(p):
                d = s.recv(65536)
                if not d:
                    break
                got += d
        except OSError:
            pass
        s.close()
        with lock:
            f["slowestSeconds"] = max(f["slowestSeconds"], round(time.monotonic() - t, 2))
        count("proxied" if got == p else "cut" if p.startswith(got) else "corrupted")
def admin():
    while not os.path.exists(stop):
        try:
            socket.create_connection(("127.0.0.1", 8101), timeout=30).close()
            count("adminConnects")
        except ConnectionRefusedError:
            count("adminRefused")
        except OSError:
            count("connectFailed")
        time.sleep(0.02)
threads = [threading.Thread(target=proxy) for _ in range(3)] + [threading.Thread(target=admin)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(f))
EOF

echo "== systemd as PID 1 of its own namespaces"
for h in systemd unified; do mkdir -p "/sys/fs/cgroup/$h/$NAME"; done
( for h in systemd unified; do echo $BASHPID > "/sys/fs/cgroup/$h/$NAME/cgroup.procs"; done
  exec unshare --kill-child --pid --fork --mount --uts --ipc --net --mount-proc "$WORK/run.sh" --inside
) > "$WORK/pid1.log" 2>&1 < /dev/null &
LAUNCHER=$!
PID1=""
cleanup() {
  # Killing a pid namespace's PID 1 kills every process in it.
  [ -n "$PID1" ] && kill -KILL "$PID1" 2>/dev/null || true
  kill "$LAUNCHER" 2>/dev/null || true
  sleep 2
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$NAME" ] && find "$h$NAME" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}
trap cleanup EXIT
for _ in $(seq 50); do
  PID1=$(pgrep -f "^/lib/systemd/systemd --system --unit=tc-check.target" || true)
  [ -n "$PID1" ] && break
  sleep 0.2
done
[ -n "$PID1" ] || { cat "$WORK/pid1.log"; exit 1; }
NS="nsenter -t $PID1 -a"
for _ in $(seq 50); do
  state=$($NS systemctl is-system-running 2>/dev/null || true)
  [ "$state" = running ] || [ "$state" = degraded ] && break
  sleep 0.2
done
$NS systemctl --version | head -1
$NS systemctl start cluster-balancer.socket cluster-balancer.service
$NS systemctl start cluster-backend@9001 cluster-backend@9002 cluster-backend@9003
sleep 3
$NS /opt/twistedcluster/bin/cluster-admin --secret-file /etc/twistedcluster/test-secret status

show() {
  echo "   $1: $($NS systemctl show cluster-balancer -p MainPID -p NFileDescriptorStore -p NRestarts | tr '\n' ' ')"
}
scenario() {
  local tag=$1
  echo "== $tag"
  rm -f "$WORK/STOP"
  $NS python3 "$WORK/load.py" "$WORK/STOP" > "$WORK/load-$tag.json" &
  local load=$!
  sleep 3
  show before
  $NS systemctl restart cluster-balancer && show "after systemctl restart"
  sleep 4
  $NS kill -9 "$($NS systemctl show cluster-balancer -p MainPID --value)"
  sleep 6 && show "after kill -9 (Restart=on-failure)"
  $NS systemctl reload cluster-balancer && show "after systemctl reload"
  sleep 4
  touch "$WORK/STOP"
  wait "$load"
  echo "   clients: $(cat "$WORK/load-$tag.json")"
}
scenario "proxy port from cluster-balancer.socket"
$NS sh -c 'systemctl stop cluster-balancer.service cluster-balancer.socket
  rm /etc/systemd/system/cluster-balancer.socket
  sed -i "s/^BALANCER_LISTEN=.*/BALANCER_LISTEN=tcp:8000/" /etc/twistedcluster/balancer.env
  systemctl daemon-reload && systemctl start cluster-balancer.service'
sleep 3
scenario "proxy port tcp:8000 (no socket unit)"
$NS sh -c 'printf "[Service]\nFileDescriptorStoreMax=0\nEnvironment=FDSTORE=0\n" \
  > /etc/systemd/system/cluster-balancer.service.d/nostore.conf
  systemctl daemon-reload && systemctl restart cluster-balancer'
sleep 3
scenario "the same without the fd store (FileDescriptorStoreMax=0)"
