"""Separate hosts on one machine: network namespaces joined by a bridge, and network cuts made with nft.

    with network(hosts=2) as net, tansu_broker(net) as bootstrap:
        worker = net.start(net.hosts[0], [FRAMELABEL, "run", ...])  # a Popen; the caller stops it
        net.cut(net.hosts[0])   # host 0 reaches nothing but itself: no broker, no other host
        net.heal(net.hosts[0])  # and everything again

What it builds (needs root, `ip` and `nft`):

    namespace ...-h0      eth0 10.231.N.2   ─┐
    namespace ...-h1      eth0 10.231.N.3   ─┼─ bridge br0 10.231.N.1 in namespace ...-broker
    root namespace   flnPIDnK 10.231.N.254  ─┘  (the test process itself; never cut)

The test process is wired to the bridge too, so the existing in-process clients
(tests/kafka.py `read_topic`, `raw_records`) reach the broker at the address
`tansu_broker` yields.
N is picked per run among the /24s the root namespace does not use yet, so runs in
parallel never share addresses. Every name starts with `fln{pid}n{k}`: on exit the
run's processes, namespaces and root veth are removed, and whatever a run that
crashed left behind (its pid is gone) is removed before a new one starts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.broker import STOP_SIGNAL, STOP_TIMEOUT_S, bundled_tansu
from pipeline.processes import stop_process
from tests.cameras import wait_until

PREFIX = "fln"
SUBNET = "10.231"  # 10.231.N.0/24 for one run; nothing else here uses 10.231.0.0/16
BRIDGE = "br0"
CUT_TABLE = "framelabel_cut"
TANSU_PORT = 9092  # every port is free in a namespace of our own
PROCESS_STOP_TIMEOUT_S = 10.0
BROKER_START_TIMEOUT_S = 20.0
RUN = re.compile(rf"{PREFIX}(\d+)n\d+")  # a run's name: the pid of the process that made it, a count
_runs = itertools.count()


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (Debian packages iproute2, nftables)" if missing else None


@dataclass(frozen=True)
class Namespace:
    name: str  # for `ip netns exec NAME ...`
    address: str  # its IPv4 address on the run's network


@dataclass
class Network:
    """The broker side and the hosts of one run; see the module docstring."""

    name: str  # the prefix of every name the run made
    broker: Namespace
    hosts: list[Namespace]
    test_address: str  # the root namespace's own address on the network
    _started: list[subprocess.Popen[Any]] = field(default_factory=list)
    _cut: set[str] = field(default_factory=set)

    def start(self, where: Namespace, command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """`command` run inside `where` (environment passed through); `popen`: subprocess.Popen's options.

        The caller stops it; whatever still runs when the network is torn down is stopped then."""
        process: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", where.name, *command], **popen)
        self._started.append(process)
        return process

    def cut(self, host: Namespace) -> None:
        """Drop every packet into and out of `host` except on its loopback, until `heal(host)`.

        Packets vanish (no reset, no refusal), as when a cable is pulled: open connections hang."""
        if host.name in self._cut:
            return
        _nft(
            host,
            f"""table inet {CUT_TABLE} {{
                chain input {{ type filter hook input priority 0; policy drop; iif lo accept; }}
                chain output {{ type filter hook output priority 0; policy drop; oif lo accept; }}
            }}""",
        )
        self._cut.add(host.name)

    def heal(self, host: Namespace) -> None:
        """Undo `cut(host)`."""
        if host.name in self._cut:
            _nft(host, f"delete table inet {CUT_TABLE}")
            self._cut.discard(host.name)

    def _stop_started(self) -> None:
        for process in self._started:
            stop_process(process, PROCESS_STOP_TIMEOUT_S)


@contextlib.contextmanager
def network(hosts: int = 1) -> Iterator[Network]:
    """A broker namespace and `hosts` host namespaces on one bridge, the test process wired to it too.

    Everything it made is removed on exit, whatever happened inside."""
    if hosts < 1:
        raise ValueError(f"a network needs at least one host, not {hosts}")
    remove_stale()
    run = f"{PREFIX}{os.getpid()}n{next(_runs)}"
    subnet = _free_subnet()
    net = Network(
        name=run,
        broker=Namespace(f"{run}-broker", f"{subnet}.1"),
        hosts=[Namespace(f"{run}-h{index}", f"{subnet}.{index + 2}") for index in range(hosts)],
        test_address=f"{subnet}.254",
    )
    try:
        _build(net)
        yield net
    finally:
        net._stop_started()
        _remove(run)


@contextlib.contextmanager
def tansu_broker(net: Network) -> Iterator[str]:
    """Tansu in the broker namespace, listening on and advertising its address; yields the bootstrap address."""
    address = f"{net.broker.address}:{TANSU_PORT}"
    url = f"tcp://{address}"
    with tempfile.TemporaryFile() as output:
        command = [str(bundled_tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        process = net.start(net.broker, command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        try:
            # Reached from the test process: the same path its own clients take.
            wait_until(lambda: _accepts(address) or process.poll() is not None, "Tansu", BROKER_START_TIMEOUT_S)
            if process.poll() is not None:
                output.seek(0)
                raise RuntimeError(f"Tansu exited with {process.returncode}:\n{output.read().decode(errors='replace')}")
            yield address
        finally:
            stop_process(process, STOP_TIMEOUT_S, STOP_SIGNAL)


def remove_stale() -> None:
    """Remove the namespaces and root veths of runs whose process is gone (a crash, a SIGKILL)."""
    runs = {match.group(0, 1) for match in map(RUN.match, ours()) if match}
    for run, pid in runs:
        if not running(int(pid)):
            _remove(run)


def ours() -> list[str]:
    """The names of the namespaces, root-namespace links and root-namespace nft tables that runs made."""
    namespaces = [line.split()[0] for line in _output("ip", "netns", "list").splitlines() if line.strip()]
    links = re.findall(r"^\d+: ([^:@]+)", _output("ip", "-o", "link"), flags=re.MULTILINE)
    tables = [line.split()[-1] for line in _output("nft", "list", "tables").splitlines()]
    return [name for name in namespaces + links + tables if RUN.match(name) or name == CUT_TABLE]


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie nobody reaped yet has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _build(net: Network) -> None:
    broker, root_veth = net.broker.name, net.name
    _ip("netns", "add", broker)
    _ip("-n", broker, "link", "set", "lo", "up")
    _ip("-n", broker, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", broker, "addr", "add", f"{net.broker.address}/24", "dev", BRIDGE)
    _ip("-n", broker, "link", "set", BRIDGE, "up")
    for index, host in enumerate(net.hosts):
        _ip("netns", "add", host.name)
        _ip("-n", host.name, "link", "set", "lo", "up")
        _plug(net, f"h{index}", ("netns", host.name), "eth0")
        _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.name, "link", "set", "eth0", "up")
    _plug(net, "test", (), root_veth)
    _ip("addr", "add", f"{net.test_address}/24", "dev", root_veth)
    _ip("link", "set", root_veth, "up")


def _plug(net: Network, port: str, where: tuple[str, ...], name: str) -> None:
    """A veth pair: `name` in `where` (a netns, or the root namespace), its peer `port` on the broker's bridge."""
    _ip("link", "add", name, *where, "type", "veth", "peer", "name", port, "netns", net.broker.name)
    _ip("-n", net.broker.name, "link", "set", port, "master", BRIDGE, "up")


def _remove(run: str) -> None:
    """Kill what still runs in the run's namespaces, then delete them and its root veth (which takes its peer).

    Another process may be removing the same stale run: what it removed first is not an error, what is left is."""
    namespaces = [name for name in ours() if name.startswith(f"{run}-")]
    with contextlib.suppress(RuntimeError):
        for namespace in namespaces:
            for pid in _output("ip", "netns", "pids", namespace).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for command in [("link", "del", run)] + [("netns", "del", namespace) for namespace in namespaces]:
        with contextlib.suppress(RuntimeError):
            _ip(*command)
    left = [name for name in ours() if name == run or name.startswith(f"{run}-")]
    if left:
        raise RuntimeError(f"could not remove {', '.join(left)}")


def _free_subnet() -> str:
    """10.231.N for an N no address or route of the root namespace uses, starting from one the pid picks."""
    used = _output("ip", "-4", "-o", "addr") + _output("ip", "-4", "route")
    start = os.getpid() % 253
    for offset in range(253):
        subnet = f"{SUBNET}.{(start + offset) % 253 + 1}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError(f"every {SUBNET}.N.0/24 is in use in the root namespace")


def _nft(host: Namespace, script: str) -> None:
    _run(["ip", "netns", "exec", host.name, "nft", "-f", "-"], script)


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _output(*command: str) -> str:
    return _run(list(command))


def _run(command: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
        return True
    return False
