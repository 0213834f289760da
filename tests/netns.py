"""Several "hosts" on one machine: Linux network namespaces joined to the machine by veth pairs.

    with network_hosts(2) as hosts:
        proc = hosts[0].popen([sys.executable, "-m", "modelbus.workers"], env=...)   # runs inside namespace 0
        url = f"redis://{hosts[0].host_ip}:6379/0"                          # how host 0 reaches the machine

Host ``i`` is the namespace ``mb-<pid>-<i>`` holding one end of a veth pair (``<ns_ip>/30``, with a
default route to the machine); the machine keeps the other end (``<host_ip>/30``). A process in a
namespace has its own loopback: ``127.0.0.1`` there is not the machine's, so anything that quietly
relies on sharing loopback with Redis or a server fails. The filesystem is shared, standing in for the
shared volume a real deployment needs.

Creating namespaces needs root (CAP_NET_ADMIN) and ``ip`` from iproute2. When either is missing, or
``MODELBUS_TEST_NO_NETNS=1`` is set, :func:`network_hosts` raises :class:`NetnsUnavailable` before it
creates anything, and tests skip with its message. On exit (also after a failure) it kills what it
started in the namespaces, then deletes the namespaces and the machine-side links.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DISABLE_ENV = "MODELBUS_TEST_NO_NETNS"
# 10.<x>.<i>.0/30 per host: x is picked per run from this range, skipping any /16 the machine already
# routes, so the test networks neither collide with real ones nor with a concurrent run's
SECOND_OCTETS = range(160, 250)
STOP_TIMEOUT = 15.0


class NetnsUnavailable(RuntimeError):
    """Network namespaces or veth links cannot be created here (the message says why)."""


@dataclass
class Host:
    """One namespace: its name, its address, and the machine's address as seen from it."""

    index: int
    netns: str
    host_link: str   # the machine's end of the veth pair
    host_ip: str     # the machine, as this host reaches it (a Redis bound here serves this host)
    ns_ip: str       # this host's own address
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    made: set[str] = field(default_factory=set)  # what _create got as far as making: only that is removed

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this namespace, in a session of its own (stopped with its children on exit)."""
        proc = subprocess.Popen(self.command(argv), start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this namespace to the end; its output as text."""
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              **kwargs)

    def stop_processes(self) -> None:
        """SIGTERM (a warm stop for RQ workers), SIGKILL after STOP_TIMEOUT, for what popen started."""
        for proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _must(*args: str) -> None:
    result = _ip(*args)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, judged before creating anything (None: try)."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return f"network namespaces disabled by {DISABLE_ENV}"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespace support (/proc/self/ns/net missing)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not on PATH"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine has an address in or a route to."""
    nets = []
    for args in (("-o", "-4", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for word in _ip(*args).stdout.split():
            try:
                nets.append(ipaddress.IPv4Network(word, strict=False))
            except ValueError:
                continue
    return [n for n in nets if n.prefixlen > 0]  # "default" parses as nothing; 0.0.0.0/0 overlaps all


def _pick_second_octet() -> int:
    used = _used_networks()
    start = os.getpid() % len(SECOND_OCTETS)
    for step in range(len(SECOND_OCTETS)):
        octet = SECOND_OCTETS[(start + step) % len(SECOND_OCTETS)]
        block = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
        if not any(block.overlaps(n) for n in used):
            return octet
    raise NetnsUnavailable(f"no free 10.x.0.0/16 for test hosts (x in {SECOND_OCTETS.start}-{SECOND_OCTETS.stop - 1})")


def _create(host: Host, ns_link: str) -> None:
    _must("netns", "add", host.netns)
    host.made.add("netns")
    _must("link", "add", host.host_link, "type", "veth", "peer", "name", ns_link)
    host.made.add("link")
    _must("link", "set", ns_link, "netns", host.netns)
    _must("addr", "add", f"{host.host_ip}/30", "dev", host.host_link)
    _must("link", "set", host.host_link, "up")
    inside = ("-n", host.netns)
    _must(*inside, "link", "set", "lo", "up")
    _must(*inside, "addr", "add", f"{host.ns_ip}/30", "dev", ns_link)
    _must(*inside, "link", "set", ns_link, "up")
    # every host-side address is local to the machine, so with this route each host reaches all of
    # them (a server bound to host 0's address serves host 1 too), as hosts on one LAN reach a server
    _must(*inside, "route", "add", "default", "via", host.host_ip)


def _destroy(host: Host) -> None:
    host.stop_processes()
    if "netns" not in host.made:
        return
    # anything else still in the namespace was started inside it by us (a namespace outlives its
    # name while a process holds it): end it too, by pid
    pids = _ip("netns", "pids", host.netns).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", host.netns)
    if "link" in host.made:
        _ip("link", "del", host.host_link)  # usually gone with its peer already; harmless when it is


@contextmanager
def network_hosts(count: int) -> Iterator[list[Host]]:
    """``count`` namespaces joined to the machine; torn down on exit, whatever happened inside."""
    if not 1 <= count <= 60:
        raise ValueError(f"network_hosts: count must be 1-60, got {count}")
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    octet = _pick_second_octet()
    pid = os.getpid()
    hosts: list[Host] = []
    try:
        for i in range(count):
            # interface names are at most 15 characters: "mb" + pid (<= 7 digits) + "-" + i + side
            host = Host(index=i, netns=f"mb-{pid}-{i}", host_link=f"mb{pid}-{i}h",
                        host_ip=f"10.{octet}.{i}.1", ns_ip=f"10.{octet}.{i}.2")
            hosts.append(host)
            _create(host, ns_link=f"mb{pid}-{i}n")
        yield hosts
    finally:
        for host in hosts:
            _destroy(host)
