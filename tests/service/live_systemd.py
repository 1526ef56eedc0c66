"""A real systemd booted as PID 1 of its own namespaces, to run the units in systemd/ for real.

`LiveSystemd.boot()` unshares cgroup, pid, mount, uts and ipc namespaces, builds a root from a
tmpfs-backed overlay of the host's own `/` (so every host binary is there and every write
vanishes at `down()`), and execs `/lib/systemd/systemd` in it. The network is the host's: a
server inside is reached on 127.0.0.1 from the test. Commands run inside with `nsenter`;
files are read and written through `/proc/<PID 1>/root`. Needs root, util-linux and a
writable cgroup2 hierarchy; `unavailable_reason()` says what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT_S = 60.0
DOWN_TIMEOUT_S = 30.0
POLL_S = 0.2
# Host units that must not start inside (they would touch the host's kernel or hardware, or
# have nothing to do in a container). Masking a unit the host lacks is harmless.
MASKED_UNITS = (
    "getty@tty1.service", "systemd-timesyncd.service", "systemd-modules-load.service",
    "systemd-binfmt.service", "kmod-static-nodes.service", "systemd-pstore.service",
    "postgresql.service", "timers.target",
)
# The environment commands inside get: a plain PATH, plus how this host reaches PyPI.
PASSED_ENV_PREFIXES = ("PIP_", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
                       "HTTPS_PROXY", "NO_PROXY")

# Runs as PID 1 of the new pid namespace with $1 = the state directory, then becomes systemd.
_BOOT_SCRIPT = r"""
set -eu
B=$1; R=$B/root
mount -t tmpfs -o mode=755 live-rw "$B/rw"; mkdir "$B/rw/upper" "$B/rw/work"
mount -t overlay live-root -o "lowerdir=/,upperdir=$B/rw/upper,workdir=$B/rw/work" "$R"
mount -t proc proc "$R/proc"; mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro sysfs "$R/sys"; mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755 live-dev "$R/dev"; mount -t tmpfs -o mode=1777 live-tmp "$R/tmp"
for d in null zero full random urandom tty; do
  touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 shm "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
touch "$R/dev/console"; mount --bind "$B/console" "$R/dev/console"
E=$R/etc/systemd/system
# A minimal target: no getty, no timers, nothing that needs hardware.
printf '%s\n' '[Unit]' 'Description=live systemd' 'Requires=sysinit.target sockets.target' \
  'After=sysinit.target sockets.target' 'AllowIsolate=yes' > "$E/live.target"
shift
for unit in "$@"; do ln -sf /dev/null "$E/$unit"; done
echo live-systemd > "$R/etc/hostname"
cd "$R"; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot
# systemd leaves / as it finds it in a container; LoadCredential= needs shared propagation
# to reach the service (without it the service sees an empty credentials directory).
mount --make-rshared /
exec env -i container=other TERM=dumb /lib/systemd/systemd --unit=live.target
"""


class LiveSystemdError(Exception):
    """The container could not be booted, or a command inside it failed."""


def unavailable_reason() -> str | None:
    """Why a live systemd cannot be booted on this machine, or None when it can be tried."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} is not installed"
    for tool in ("unshare", "nsenter", "pivot_root", "mount"):
        if shutil.which(tool) is None:
            return f"util-linux `{tool}` is not installed"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted"
    return None


def cgroup2_mount() -> Path | None:
    """Where the host mounts the cgroup2 hierarchy (alone or beside v1), if it does."""
    for line in Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


class LiveSystemd:
    """One booted systemd; `run` commands in it, `path` reaches its files, `down` ends it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        cgroup_root = cgroup2_mount()
        assert cgroup_root is not None, unavailable_reason()
        # Its own cgroup, so that several runs (or a leftover) never share one.
        self.cgroup = cgroup_root / f"procpoll-live-{os.getpid()}-{id(self):x}"
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    def boot(self, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        """Start systemd and wait until it is up (running, or degraded by a host unit)."""
        for sub in ("rw", "root"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.state_dir / "console").touch()
        self.cgroup.mkdir()
        # The unshare process joins our cgroup first: it becomes the container's cgroup root.
        join_then_exec = 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"'
        argv = ["sh", "-c", join_then_exec, "sh", str(self.cgroup),
                "unshare", "--cgroup", "--pid", "--fork", "--mount", "--uts", "--ipc",
                "--propagation", "private",
                "bash", "-c", _BOOT_SCRIPT, "live-boot", str(self.state_dir), *MASKED_UNITS]
        with (self.state_dir / "boot.log").open("wb") as log:
            self._unshare = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until(self._find_pid1, timeout_s):
            raise LiveSystemdError(f"no PID 1 appeared:\n{self.boot_log()}")
        if not wait_until(lambda: self.system_state() in ("running", "degraded"), timeout_s):
            raise LiveSystemdError(f"systemd did not come up ({self.system_state()}):\n"
                                   f"{self.boot_log()}")

    def _find_pid1(self) -> bool:
        assert self._unshare is not None
        if self._unshare.poll() is not None:
            raise LiveSystemdError(f"unshare exited with {self._unshare.returncode}:\n"
                                   f"{self.boot_log()}")
        pid = self._unshare.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            found = children.read_text(encoding="ascii").split()
        except OSError:
            return False
        if found:
            self.pid1 = int(found[0])
        return bool(found)

    def boot_log(self) -> str:
        """What the boot script and systemd wrote before the console was theirs."""
        return (self.state_dir / "boot.log").read_text(encoding="utf-8", errors="replace")

    def system_state(self) -> str:
        """`systemctl is-system-running`: starting, running, degraded, … or the error."""
        result = self.run("systemctl", "is-system-running", check=False, timeout_s=10)
        return (result.stdout.strip() or result.stderr.strip()) or "unknown"

    def run(self, *argv: str, check: bool = True, timeout_s: float = 60,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside every namespace of the container; raise on failure when `check`."""
        assert self.pid1 is not None, "not booted"
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        env |= {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv], env=env,
                                input=input_text, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            raise LiveSystemdError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                   f"{result.stdout}{result.stderr}")
        return result

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (through PID 1's root)."""
        assert self.pid1 is not None, "not booted"
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Create or replace a file inside the container, with its directories."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.chmod(mode)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of the named properties, as a dict."""
        args = [arg for name in properties for arg in ("-p", name)]
        out = self.run("systemctl", "show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def down(self) -> None:
        """Power off (systemd stops every unit), then reap; nothing is left on the host."""
        if self.pid1 is not None:
            # SIGRTMIN+4 = poweroff. Not `systemctl poweroff`: shutdown would wait on nsenter.
            _signal(self.pid1, signal.SIGRTMIN + 4)
            if not wait_until(lambda: not _alive(self.pid1), DOWN_TIMEOUT_S):
                _signal(self.pid1, signal.SIGKILL)
        if self._unshare is not None:
            try:
                self._unshare.wait(timeout=DOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self._unshare.pid, signal.SIGKILL)
                self._unshare.wait(timeout=DOWN_TIMEOUT_S)
        self.pid1 = None
        # Empty cgroups are removed deepest first; the kernel refuses a non-empty one.
        if self.cgroup.exists():
            nested = [p for p in self.cgroup.rglob("*") if p.is_dir()]
            for directory in [*sorted(nested, key=lambda p: len(p.parts), reverse=True),
                              self.cgroup]:
                wait_until(partial(_rmdir, directory), DOWN_TIMEOUT_S)


def _alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists() and _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return "gone"
    return stat.rpartition(")")[2].split()[0]


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True

