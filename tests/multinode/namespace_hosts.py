"""Test hosts made on this machine with network namespaces: a bridge in the root namespace with the
first address of a private /24 that nothing else on the machine uses, and one namespace per host joined
to it by a veth pair (the host's `eth0`, with the next address, and `lo` up).

What a host shares with the machine, and what it does not:
- The filesystem is shared: the run dir, the shards and munge's socket are "shared storage" for free.
- The network is the host's own: its eth0 address, its own loopback and ports.
- Its name resolves through a hosts file of the test network (the machine's /etc/hosts plus one line per
  test host), bind-mounted over /etc/hosts in a private mount namespace of each process started on the
  host. So SLURM_JOB_NODELIST names (h1, h2) resolve on every host, the machine's /etc/hosts is never
  edited, and nothing is left behind when a test session is killed.
- The hostname (UTS namespace) is the machine's: every host reports the same `hostname`, which resolves
  to loopback, so gloo needs GLOO_SOCKET_IFNAME=eth0 on a host (and the bridge's name on the root side).

Commands run on a host through `nsenter --net=/var/run/netns/NS`, never `ip netns exec`: the latter also
remounts /sys, which hides the cgroup filesystem from slurmd.

Only the addresses of this /24 and loopback are ever contacted. A process belongs to a host when its
network namespace is the host's, which is how a host is "crashed" (every process on it killed) and how
teardown finds what is left, without touching any process that the tests did not start there.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
# Every /24 tried, in order; the first that no address or route of the machine overlaps is used.
CANDIDATE_SUBNETS = tuple(ipaddress.ip_network(f"10.213.{third}.0/24") for third in range(10, 250))
# Serialises subnet choice between test sessions running at the same time on one machine.
LOCK_FILE = Path("/tmp/vilscale-testnet.lock")
# Interface and namespace names start with this and the owning test session's PID (15-character limit).
NAME_PREFIX = "vs"
# Namespaces and bridges this process made and has not torn down (never pruned as stale).
_LIVE_NAMES: set[str] = set()


class HostsUnavailable(RuntimeError):
    """This machine cannot make test hosts (not root, no `ip`/`nsenter`); the message says why."""


def unavailable_reason() -> str | None:
    """Why test hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace test hosts need root (ip netns add, veth pairs, a bridge)"
    for binary in ("ip", "nsenter", "unshare", "mount"):
        if _binary(binary) is None:
            package = "iproute2" if binary == "ip" else "util-linux"
            return f"`{binary}` is not installed (apt-get install {package}; `make setup` installs it)"
    return None


def _binary(name: str) -> str | None:
    """``name`` on PATH or in the system folders (a non-login root shell may lack /usr/sbin on PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([_binary("ip") or "ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _netns_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.st_dev, stat.st_ino


def processes_in_netns(netns_path: Path) -> list[int]:
    """PIDs of every process whose network namespace is the one bound at ``netns_path``."""
    target = _netns_id(netns_path)
    if target is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _netns_id(entry / "ns" / "net") == target:
            pids.append(int(entry.name))
    return pids


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of an address or route on this machine (all tables)."""
    used = []
    for entry in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        destination = route.get("dst", "")
        if destination and destination != "default":
            with contextlib.suppress(ValueError):  # e.g. a multicast or broadcast entry
                used.append(ipaddress.ip_network(destination, strict=False))
    return used


def _owner_alive(name: str) -> bool:
    """Whether the test session whose PID the name ``vs<PID>...`` carries is still running."""
    digits = ""
    for char in name[len(NAME_PREFIX):]:
        if not char.isdigit():
            break
        digits += char
    if not digits:
        return True  # not one of ours: leave it alone
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(digits) != os.getpid()  # our own PID: names left by a dead session whose PID we reuse


def prune_stale() -> list[str]:
    """Remove namespaces and bridges that test sessions which no longer run left behind (a session killed
    before its teardown), when no process is left in them. Returns what was removed."""
    removed = []
    if NETNS_DIR.is_dir():
        for path in NETNS_DIR.iterdir():
            stale = (path.name.startswith(NAME_PREFIX) and path.name not in _LIVE_NAMES
                     and not _owner_alive(path.name) and not processes_in_netns(path))
            if stale and _ip("netns", "del", path.name, check=False).returncode == 0:
                removed.append(path.name)
    for link in json.loads(_ip("-j", "link", "show", "type", "bridge").stdout or "[]"):
        name = link.get("ifname", "")
        stale = name.startswith(NAME_PREFIX) and name.endswith("br") and name not in _LIVE_NAMES
        if stale and not _owner_alive(name) and _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


@dataclass
class TestHost:
    """One host: a network namespace with `eth0` on the test network."""

    name: str
    """Its hostname on the test network (resolves on every host), e.g. the SLURM NodeName."""
    address: str
    """Its eth0 address."""
    netns: str
    """The network namespace's system-wide name (/var/run/netns/NETNS)."""
    root_veth: str
    """The root-namespace end of its veth pair, attached to the bridge."""
    hosts_file: Path
    interface: str = "eth0"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def launch_prefix(self) -> tuple[str, ...]:
        """Command prefix that runs a program on this host: its network namespace, and a private mount
        namespace in which the test network's hosts file is /etc/hosts. Processes started under it, and
        their children, stay on the host."""
        return (_binary("nsenter") or "nsenter", f"--net={self.netns_path}", "--", _binary("unshare") or "unshare",
                "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts_file))

    def run(self, *args: str, env: dict | None = None, timeout_s: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command on this host and wait for it (output captured as text)."""
        result = subprocess.run([*self.launch_prefix, *args], capture_output=True, text=True, timeout=timeout_s,
                                env={**os.environ, **(env or {})}, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"on {self.name}: {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def popen(self, args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start a long-running command on this host (its PID is the command's own: nothing forks)."""
        return subprocess.Popen([*self.launch_prefix, *args], env={**os.environ, **(env or {})}, **kwargs)

    def pids(self) -> list[int]:
        """Every process running on this host."""
        return processes_in_netns(self.netns_path)

    def crash(self, timeout_s: float = 10) -> list[int]:
        """SIGKILL every process on this host, as when a machine dies with its processes (the kernel closes
        their sockets, so peers see connections reset at once). Returns the PIDs killed."""
        killed = []
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return killed
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} on host {self.name} survived SIGKILL for {timeout_s} s")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def disconnect(self) -> None:
        """Cut this host's link (its veth end on the bridge goes down): packets to and from it are dropped
        silently, as when a machine loses power or its network. `reconnect` restores it."""
        _ip("link", "set", self.root_veth, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.root_veth, "up")


@dataclass
class TestNetwork:
    """A bridge on one private /24 and the hosts attached to it."""

    subnet: ipaddress.IPv4Network
    bridge: str
    root: Path
    """Temporary folder of this network (its hosts file)."""
    hosts: dict[str, TestHost] = field(default_factory=dict)

    @property
    def bridge_address(self) -> str:
        """The root namespace's address on the test network (the first of the /24)."""
        return str(self.subnet.network_address + 1)

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    def add_host(self, name: str) -> TestHost:
        """A new host with the next free address of the /24, joined to the bridge."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already on this test network")
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise ValueError(f"host name {name!r}: use letters, digits and '-' (at most 20 characters)")
        index = len(self.hosts) + 1
        address = str(self.subnet.network_address + 1 + index)
        owner = f"{NAME_PREFIX}{os.getpid()}"
        host = TestHost(name=name, address=address, netns=f"{owner}-{name}", root_veth=f"{owner}v{index}",
                        hosts_file=self.hosts_file)
        _ip("netns", "add", host.netns)
        _LIVE_NAMES.add(host.netns)
        self.hosts[name] = host
        _ip("link", "add", host.root_veth, "type", "veth", "peer", "name", host.interface, "netns", host.netns)
        _ip("link", "set", host.root_veth, "master", self.bridge)
        _ip("link", "set", host.root_veth, "up")
        for args in (("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", host.interface),
                     ("link", "set", host.interface, "up"), ("link", "set", "lo", "up")):
            _ip("-n", host.netns, *args)
        self._write_hosts_file()
        return host

    def _write_hosts_file(self) -> None:
        # Written in place (same inode): processes already running have it bind-mounted over /etc/hosts.
        lines = Path("/etc/hosts").read_text()
        lines += "\n# vilscale test network\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts.values())
        with open(self.hosts_file, "r+" if self.hosts_file.exists() else "w") as handle:
            handle.seek(0)
            handle.write(lines)
            handle.truncate()

    def teardown(self) -> None:
        """Kill every process left on the hosts, delete the namespaces (their veth pairs go with them) and
        the bridge. Touches nothing that the hosts did not hold."""
        errors = []
        for host in self.hosts.values():
            try:
                host.crash()
            except RuntimeError as error:
                errors.append(str(error))
            _ip("netns", "del", host.netns, check=False)
            _LIVE_NAMES.discard(host.netns)
        _ip("link", "del", self.bridge, check=False)
        _LIVE_NAMES.discard(self.bridge)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))


def make_network() -> TestNetwork:
    """A bridge with the first address of the first candidate /24 that this machine does not use.
    Raises HostsUnavailable when this machine cannot make test hosts."""
    reason = unavailable_reason()
    if reason:
        raise HostsUnavailable(reason)
    bridge = f"{NAME_PREFIX}{os.getpid()}br"
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prune_stale()
        used = _used_networks()
        subnet = next((net for net in CANDIDATE_SUBNETS if not any(net.overlaps(u) for u in used)), None)
        if subnet is None:
            raise HostsUnavailable(f"every candidate /24 ({CANDIDATE_SUBNETS[0]} ... {CANDIDATE_SUBNETS[-1]}) "
                                   "is in use on this machine")
        root = Path(tempfile.mkdtemp(prefix="vsnet-", dir="/tmp"))
        root.chmod(0o755)
        network = TestNetwork(subnet=subnet, bridge=bridge, root=root)
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _LIVE_NAMES.add(bridge)
            _ip("addr", "add", f"{network.bridge_address}/{subnet.prefixlen}", "dev", bridge)
            _ip("link", "set", bridge, "up")
            network._write_hosts_file()
        except BaseException:
            network.teardown()
            raise
    return network
