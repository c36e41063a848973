"""bench/flood: does fastknockd stay responsive under a knock flood? (root, Linux)

    python bench/flood/run.py [--workers N] [--seconds S] [--knocks K]

Design
------
* Builds ``floodgen`` (``floodgen.c``, next to this file) with ``cc``; makes its own pair of
  network namespaces joined by a veth (``tests.netns``; deleted at the end, also after a
  failure) and loads letmein's example ruleset into the server one. All traffic stays on
  that veth: flood source 10.77.0.2, legitimate knocker 10.77.0.3, server 10.77.0.1.
* fastknockfwd and fastknockd run in the server namespace (UDP control port 5800, policy
  basic-auth, i.e. stealth). The pre-filter is off for the receive-path comparison (every
  flood datagram reaches the socket) and on for its own rows.
* One measurement = a flood of one mode (junk, wrongsize, forged KNOCK with a bad MAC, a
  captured valid KNOCK replayed from 1,000 source ports) for S seconds from the flood
  source, while K legitimate knocks run from the other address, paced over the flood
  (a fresh socket each, KNOCK -> CHALLENGE -> RESPONSE -> COMEIN, no retransmission,
  2 s per step). Columns: flood rate sent; absorbed = sent minus the server namespace's
  ``/proc/net/snmp`` Udp RcvbufErrors (datagrams the kernel could queue for the server);
  read = Udp InDatagrams (what the server actually read); server CPU (all its processes,
  % of one core) and CPU microseconds per datagram read; legit knocks OK; their p50/p99
  latency. One generator core is slower than one receiver core here, so at full rate the
  fast paths absorb everything and the CPU cost per datagram tells them apart.
* Receive paths in the same run: the batched path (default), uvloop DatagramProtocol
  (``--udp-path protocol``), the pure-Python fallback (``FASTKNOCK_NO_EXTENSIONS=1``), the
  batched path with N workers, and the C ``recvmmsg`` drain reference (``floodgen drain``:
  reads and counts, checks nothing). Then the ratios the issue asks for, and fastknockd's
  RSS before/after a replay flood from 10,000 source ports.
* CPU rounds (``--rounds``, default 3): every mode on the bare C drain, on the C drain that
  rests as the batched path does (``floodgen drain --pause-us``, knockd/recv.py) and on the
  batched path, with no legitimate knocks in any, in rotating order; the CPU ratios are
  those of the medians, each round's shown too. CPU per datagram = the server's CPU
  seconds over the measurement / datagrams read.
* A benchmark, not a test: it asserts nothing and every figure varies between runs;
  compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from fastknock.knockd import recv  # noqa: E402
from fastknock.mac import HmacKey  # noqa: E402
from fastknock.message import Operation  # noqa: E402
from fastknock.protocol import ClientSession  # noqa: E402
from tests import netns  # noqa: E402

PORT = 5800
USER = 0x00000001
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
RES = 0x00000022
MODES = ("junk", "wrongsize", "forged", "replay", "replay-many", "response")
PATHS = ("batched", "workers", "protocol", "py", "drain", "rss", "prefilter", "baseline")
BASELINE = " [base]"  # the label suffix of the --baseline tree's rows
SPOOF_BASE = "10.99.0.1"  # --sources: spoofed sources from here on, routed back to the client
FILL = "prefilter-fill"  # junk from FILL_SOURCES spoofed sources, then half from a fresh one
FILL_SOURCES = 70_000
# The pre-filter of before issue 11 (per-address dynamic sets, fillable), the baseline of
# the prefilter-fill rows; its drop rule counts.
_OLD_MATCH = "udp dport 5800 fib daddr type local"
_OLD_CHAIN = "add rule inet filter fastknock-prefilter"
OLD_PREFILTER = (
    "add set inet filter fastknock_prefilter4 { type ipv4_addr; size 65536; "
    "flags dynamic,timeout; timeout 60s; }\n"
    "add chain inet filter fastknock-prefilter { type filter hook prerouting priority raw; "
    "policy accept; }\n"
    f"{_OLD_CHAIN} {_OLD_MATCH} udp length != 64 drop\n"
    f"{_OLD_CHAIN} {_OLD_MATCH} update @fastknock_prefilter4 "
    "{ ip saddr limit rate over 1000/second burst 1000 packets } counter drop\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# The legitimate knocker sends 2 * K datagrams in about S - 1 seconds from one address
# (250/s for the defaults): more than the pre-filter's default per-source allowance
# (100/s, burst 200), which is meant for people, not for a knock load generator. The
# flooder's allowance is the same, i.e. the flood is cut to ~1,000 datagrams/s.
PREFILTER_RATE = 1000
PREFILTER_BURST = 1000


def config(prefilter: bool, extra: str = "") -> str:
    return (
        "[GENERAL]\nport = 5800/udp\ncontrol-timeout = 2\ncontrol-error-policy = basic-auth\n"
        "[NFTABLES]\nchain-input = LETMEIN-INPUT\nchain-forward = LETMEIN-FORWARD\n"
        f"chain-output = LETMEIN-OUTPUT\nprefilter = {'on' if prefilter else 'off'}\n"
        f"prefilter-rate = {PREFILTER_RATE}\nprefilter-burst = {PREFILTER_BURST}\n{extra}"
        f"[KEYS]\n{USER:08X} = {KEY.hex().upper()}\n"
        f"[RESOURCES]\n{RES:08X} = port: 2222\n"
    )


@dataclass
class Row:
    path: str
    mode: str
    prefilter: bool
    seconds: float
    sent: int
    rcvbuf_errors: int
    read: int
    cpu: float  # % of one core
    ok: int
    knocks: int
    latencies: list[float]
    pf_dropped: int = -1  # datagrams the pre-filter dropped for a rate (prefilter-fill rows)
    cpu_s: float = 0.0  # server CPU seconds (user + system) over the measurement

    @property
    def absorbed(self) -> float:
        return (self.sent - self.rcvbuf_errors) / self.seconds

    @property
    def share(self) -> float:
        """Absorbed / sent: 1.0 means nothing was lost to a full receive queue."""
        return (self.sent - self.rcvbuf_errors) / self.sent if self.sent else float("nan")

    @property
    def cost(self) -> float:
        """Server CPU microseconds per datagram read (none if it read next to nothing)."""
        if self.read < 1000 * self.seconds:
            return float("nan")
        return self.cpu_s / self.read * 1e6

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


class Bench:
    def __init__(self, pair: netns.Pair, work: Path, args: argparse.Namespace) -> None:
        self.pair = pair
        self.work = work
        self.args = args
        self.floodgen = str(work / "floodgen")
        self.fwd: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.flood_src, self.legit_src = pair.client_v4
        self.dst = pair.server_v4
        self._n = 0

    # -- processes (ours only, stopped by PID) --

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        tree: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        self._n += 1
        log = open(self.work / f"{name}.{self._n}.log", "wb")  # noqa: SIM115
        full_env = {**os.environ, "PYTHONPATH": str(tree), **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        return netns.popen(
            self.pair.server,
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(tree),
        )

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def start_fwd(self, prefilter: bool, extra: str = "") -> None:
        self._stop(self.fwd)
        conf = self.work / f"fastknockd-{'pf' if prefilter else 'nopf'}.conf"
        conf.write_text(config(prefilter, extra))
        conf.chmod(0o600)
        self.conf = conf
        rundir = self.work / "run"
        sock = rundir / "fastknockfwd" / "fastknockfwd.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self.fwd = self._spawn(
            "fwd",
            [
                sys.executable,
                "-m",
                "fastknock.fwd",
                "-c",
                str(conf),
                "--rundir",
                str(rundir),
                "--test-mode",
                "--server-user",
                "nobody",
                "--no-systemd",
            ],
        )
        log = self.work / f"fwd.{self._n}.log"
        # The socket file exists from bind(); connections are refused until it listens.
        self._wait("fastknockfwd", lambda: b"listening on" in log.read_bytes(), self.fwd)
        table = netns.nft(self.pair.server, "list", "table", "inet", "filter")
        assert ("chain fastknock-prefilter" in table) == prefilter, table

    def start_server(
        self, path: str, workers: int = 1, py: bool = False, tree: Path = REPO
    ) -> None:
        self._stop(self.server)
        argv = [
            sys.executable,
            "-m",
            "fastknock.server",
            "-c",
            str(self.conf),
            "--rundir",
            str(self.work / "run"),
            "--no-systemd",
            "--user",
            "nobody",
            "--udp-path",
            path,
            "--workers",
            str(workers),
        ]
        env = {"FASTKNOCK_NO_EXTENSIONS": "1"} if py else {}
        self.server = self._spawn("fastknockd", argv, env, tree)
        log = self.work / f"fastknockd.{self._n}.log"
        self._wait(
            "fastknockd", lambda: log.read_text().count("listening on port") >= workers, self.server
        )
        time.sleep(0.2)
        if self.knock() is None:
            logs = "\n".join(p.read_text() for p in sorted(self.work.glob("*.log")))
            raise SystemExit(f"a knock without flood failed:\n{logs}")

    def _wait(self, what: str, cond: object, proc: subprocess.Popen[bytes]) -> None:
        end = time.monotonic() + 20
        while not cond():  # type: ignore[operator]
            if proc.poll() is not None or time.monotonic() > end:
                logs = "\n".join(p.read_text() for p in sorted(self.work.glob("*.log")))
                raise SystemExit(f"{what} did not start:\n{logs}")
            time.sleep(0.05)

    def server_pids(self) -> list[int]:
        """fastknockd (the inner python, not 'ip netns exec') and its worker children."""
        assert self.server is not None
        pids = [self.server.pid]
        i = 0
        while i < len(pids):
            try:
                children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
            except OSError:
                children = []
            pids += [int(c) for c in children]
            i += 1
        return pids

    # -- measurements --

    @staticmethod
    def cpu_ticks(pids: Sequence[int]) -> int:
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total

    @staticmethod
    def snmp(pid: int) -> dict[str, int]:
        lines = [ln.split() for ln in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()]
        head, vals = [ln for ln in lines if ln[0] == "Udp:"]
        return dict(zip(head[1:], map(int, vals[1:]), strict=True))

    def knock(self) -> float | None:
        """One knock from the legitimate address, no retransmission: seconds or None."""
        session = ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom)
        with netns.socket_in(self.pair.client, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((self.legit_src, 0))
            s.settimeout(2.0)
            start = time.perf_counter()
            s.sendto(session.start(), (self.dst, PORT))
            try:
                while True:
                    result = session.receive(s.recv(128))
                    if result.send is not None:
                        s.sendto(result.send, (self.dst, PORT))
                    if result.done:
                        return time.perf_counter() - start if result.failure is None else None
            except OSError:
                return None

    def knocks(self, n: int, over: float) -> list[float | None]:
        results: list[float | None] = [None] * n
        start = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            futures = []
            for i in range(n):
                delay = start + i * over / n - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(self.knock))
            for i, f in enumerate(futures):
                results[i] = f.result()
        return results

    def flood(
        self, mode: str, seconds: float, ports: int, sources: int = 1
    ) -> subprocess.Popen[str]:
        gen_mode = {"replay-many": "replay", FILL: "junk"}.get(mode, mode)
        fill = ["--fresh", self.flood_src] if mode == FILL else []
        argv = [
            self.floodgen,
            "send",
            *fill,
            "--mode",
            gen_mode,
            "--src",
            SPOOF_BASE if sources > 1 else self.flood_src,
            "--sources",
            str(sources),
            "--dst",
            self.dst,
            "--port",
            str(PORT),
            "--seconds",
            str(seconds),
            "--ports",
            str(ports),
            "--user",
            f"{USER:08x}",
            "--resource",
            f"{RES:08x}",
            "--knock",
            self.replay,
        ]
        return netns.popen(self.pair.client, argv, stdout=subprocess.PIPE, text=True)

    def measure(
        self,
        path: str,
        mode: str,
        prefilter: bool,
        pids: Sequence[int],
        knocks: int,
        ports: int = 0,
        sources: int = 0,
    ) -> Row:
        seconds = self.args.seconds
        ports = ports or (1000 if mode == "replay" else 1)
        sources = sources or (
            self.args.sources if mode == "replay-many" else FILL_SOURCES if mode == FILL else 1
        )
        pf0 = self.pf_dropped() if mode == FILL else 0  # (an nft call: only when used)
        snmp0, cpu0, t0 = self.snmp(pids[0]), self.cpu_ticks(pids), time.monotonic()
        gen = self.flood(mode, seconds, ports, sources)
        time.sleep(0.3)
        lat = self.knocks(knocks, max(seconds - 1.0, 0.5)) if knocks else []
        out, _ = gen.communicate(timeout=seconds + 30)
        elapsed = time.monotonic() - t0
        time.sleep(0.2)  # let the server finish what is queued
        snmp1, cpu1 = self.snmp(pids[0]), self.cpu_ticks(pids)
        sent = int(dict(kv.split("=") for kv in out.split())["sent"])
        flood_s = float(dict(kv.split("=") for kv in out.split())["seconds"])
        ok = [x for x in lat if x is not None]
        row = Row(
            path,
            mode,
            prefilter,
            flood_s,
            sent,
            snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"],
            snmp1["InDatagrams"] - snmp0["InDatagrams"],
            100.0 * (cpu1 - cpu0) / CLK_TCK / elapsed,
            len(ok),
            knocks,
            ok,
            self.pf_dropped() - pf0 if mode == FILL else -1,
            (cpu1 - cpu0) / CLK_TCK,
        )
        print(fmt(row), flush=True)
        return row

    def no_flood(self, path: str, knocks: int) -> Row:
        """The legitimate knocks alone (the no-attack control)."""
        seconds = self.args.seconds
        t0 = time.monotonic()
        ok = [x for x in self.knocks(knocks, max(seconds - 1.0, 0.5)) if x is not None]
        row = Row(path, "none", True, time.monotonic() - t0, 0, 0, 0, 0.0, len(ok), knocks, ok)
        print(fmt(row), flush=True)
        return row

    def pf_dropped(self) -> int:
        """Datagrams the pre-filter (old or new) dropped for a rate so far."""
        table = netns.nft(self.pair.server, "list", "table", "inet", "filter")
        new = re.search(r"counter fastknock_pf_dropped_ip4 \{\s*packets (\d+)", table)
        old = re.search(r"\} counter packets (\d+) bytes \d+ drop", table)
        return int((new or old).group(1)) if (new or old) else 0  # type: ignore[union-attr]

    def drain_reference(self, mode: str, pause_us: int = 0) -> Row:
        seconds = self.args.seconds
        self._stop(self.server)
        argv = [self.floodgen, "drain", "--port", str(PORT), "--seconds", str(seconds + 1.0)]
        if pause_us:
            argv += ["--pause-us", str(pause_us)]
        drain = netns.popen(self.pair.server, argv, stdout=subprocess.PIPE, text=True)
        assert drain.stdout is not None and drain.stdout.readline().strip() == "ready"
        row = self.measure(MODERATED if pause_us else DRAIN, mode, False, [drain.pid], 0)
        drain.wait(seconds + 30)
        return row

    def rss_replay(self) -> tuple[int, int, int, int]:
        """(RSS before kB, RSS after kB, peak kB, datagrams sent): replay from 10,000 source
        addresses (and ports)."""
        pids = self.server_pids()

        def status(key: str) -> int:
            for line in Path(f"/proc/{pids[0]}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
            return 0

        before = status("VmRSS")
        row = self.measure("batched (RSS)", "replay-many", False, pids, 0, 10000, 10000)
        time.sleep(2.5)  # sessions time out (control-timeout 2 s)
        return before, status("VmRSS"), status("VmHWM"), row.sent


def fmt(r: Row) -> str:
    knocks = f"{r.ok:>4}/{r.knocks:<4}" if r.knocks else "    -    "
    lat = f"{r.pct(0.5):7.2f} {r.pct(0.99):7.2f}" if r.knocks else "      -       -"
    return (
        f"{r.path:<22} {r.mode:<14} {'on ' if r.prefilter else 'off'} "
        f"{r.sent / r.seconds / 1e6:7.3f} {r.absorbed / 1e6:8.3f} {r.read / r.seconds / 1e6:7.3f} "
        f"{r.cpu:5.0f}% {r.cost:6.2f} {knocks} {lat}"
    ) + (f"  pf dropped {r.pf_dropped / r.seconds / 1e6:.3f} M/s" if r.pf_dropped >= 0 else "")


HEADER = (
    f"{'receive path':<22} {'mode':<14} pf  {'sent':>7} {'absorbed':>8} {'read':>7} "
    f"{'CPU':>6} {'us/dg':>6} {'legit OK':<9} {'p50 ms':>7} {'p99 ms':>7}\n"
    f"{'':<22} {'':<14}     {'M/s':>7} {'M/s':>8} {'M/s':>7}"
)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fk-flood-"))
    path.chmod(0o755)  # fastknockd runs as nobody: it must reach run/fastknockfwd/
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="workers for the multi-core row")
    ap.add_argument("--seconds", type=float, default=5.0, help="flood seconds per measurement")
    ap.add_argument("--knocks", type=int, default=500, help="legitimate knocks per flood")
    ap.add_argument(
        "--modes",
        default=",".join((*MODES, FILL)),
        help=f"flood modes, comma-separated ({', '.join((*MODES, FILL))})",
    )
    ap.add_argument(
        "--sources",
        type=int,
        default=1000,
        help="spoofed source addresses of the replay-many mode (default: 1000)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of the bare C drain, the resting C drain and the batched "
        "path, without legit knocks, for the CPU ratios (default: 3)",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another tree (e.g. a checkout of main, extensions built): its batched rows "
        "run in the same run, for before/after ratios",
    )
    ap.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"receive paths to measure, comma-separated (default: all of {','.join(PATHS)})",
    )
    args = ap.parse_args()
    if netns.missing() or shutil.which("cc") is None:
        print(f"bench/flood needs root, nft, ip and cc: {netns.missing() or 'no cc'}")
        return 2
    modes = [m for m in args.modes.split(",") if m and m != FILL]
    fill = FILL in args.modes.split(",")
    with workdir() as work, netns.veth_pair() as pair:
        subprocess.run(
            ["cc", "-O2", "-Wall", "-o", str(work / "floodgen"), str(HERE / "floodgen.c")],
            check=True,
        )
        netns.load_ruleset(pair.server, netns.COMPAT_RULESET, netns.MYCHAINS)
        # Replies to spoofed sources go back into the client namespace, which drops them.
        netns.run(
            pair.server,
            ["ip", "route", "add", "10.99.0.0/16", "via", pair.client_v4[0]],
            check=True,
        )
        bench = Bench(pair, work, args)
        bench.replay = (
            ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom).start().hex()
        )
        rows: list[Row] = []
        print(
            f"bench/flood: {args.seconds:g} s per flood, {args.knocks} legitimate knocks each, "
            f"{os.cpu_count()} cores; pre-filter (when on) {PREFILTER_RATE}/s burst "
            f"{PREFILTER_BURST} per source\n"
        )
        print(HEADER, flush=True)
        if fill:
            rows += prefilter_fill(bench, args.knocks)
        if not modes:
            bench._stop(bench.server)
            bench._stop(bench.fwd)
            fill_summary(rows)
            return 0
        bench.start_fwd(prefilter=False)
        want = set(args.paths.split(","))
        paths = []
        for tree, tag in ((REPO, ""), (args.baseline, BASELINE)):
            if tree is None or (tag and "baseline" not in want):
                continue
            if "batched" in want:
                paths.append(("batched" + tag, "batched", 1, False, tree))
            if "workers" in want and args.workers > 1:
                label = f"batched x{args.workers} workers{tag}"
                paths.append((label, "batched", args.workers, False, tree))
        if "protocol" in want:
            paths.append(("uvloop DatagramProtocol", "protocol", 1, False, REPO))
        if "py" in want:
            paths.append(("pure-Python fallback", "batched", 1, True, REPO))
        for label, path, workers, py, tree in paths:
            bench.start_server(path, workers, py, tree)
            for mode in modes:
                rows.append(bench.measure(label, mode, False, bench.server_pids(), args.knocks))
        if "drain" in want:
            rows += cpu_rounds(bench, modes, args.rounds)
        rss = None
        if "rss" in want:
            bench.start_server("batched")
            rss = bench.rss_replay()
        if "prefilter" in want:
            bench.start_fwd(prefilter=True)
            bench.start_server("batched")
            for mode in modes:
                rows.append(bench.measure("batched", mode, True, bench.server_pids(), args.knocks))
        bench._stop(bench.server)
        bench._stop(bench.fwd)
        summary(rows, rss)
        fill_summary(rows)
    return 0


DRAIN = "C recvmmsg drain"
MODERATED = "C drain, moderated"  # floodgen drain --pause-us: knockd/recv.py's rest rule
QUIET = "batched, no knocks"  # the batched path's rows of the CPU rounds


def cpu_rounds(bench: Bench, modes: Sequence[str], rounds: int) -> list[Row]:
    """The CPU comparison: ``rounds`` rounds, each every mode on the bare C drain, on the
    C drain that rests as the batched path does (``recv.REST_US``), and on the batched path
    (1 worker), with no legitimate knocks in any (so that all do the same work: read the
    flood), in rotating order, so that the machine's drift falls on all alike."""
    rows = []
    order = ("batched", "drain", "moderated")
    pause_us = recv.REST_US
    for r in range(rounds):
        for which in order[r % 3 :] + order[: r % 3]:
            if which == "batched":
                bench.start_server("batched")
            for mode in modes:
                if which == "batched":
                    rows.append(bench.measure(QUIET, mode, False, bench.server_pids(), 0))
                else:
                    rows.append(bench.drain_reference(mode, pause_us if which != "drain" else 0))
    return rows


def prefilter_fill(bench: Bench, knocks: int) -> list[Row]:
    """The prefilter-fill rows, batched path: a no-flood control; the old per-address
    pre-filter (loaded by hand, fastknockfwd's own off); the current one without a spare
    allowance (strict per-source limits) and at its defaults; the same flood each time."""
    rows = []
    bench.start_fwd(prefilter=True)
    bench.start_server("batched")
    rows.append(bench.no_flood("batched, pf", knocks))
    bench.start_fwd(prefilter=False)
    netns.nft(bench.pair.server, "-f", "-", stdin=OLD_PREFILTER)
    bench.start_server("batched")
    rows.append(bench.measure("batched, old pf", FILL, True, bench.server_pids(), knocks))
    for label, extra in (("batched, pf spare 0", "prefilter-spare = 0\n"), ("batched, pf", "")):
        bench.start_fwd(prefilter=True, extra=extra)  # replaces the old chain and set
        bench.start_server("batched")
        rows.append(bench.measure(label, FILL, True, bench.server_pids(), knocks))
    return rows


def fill_summary(rows: list[Row]) -> None:
    fill = [r for r in rows if r.mode == FILL or (r.mode == "none" and r.prefilter)]
    if not fill:
        return
    print(
        f"\nprefilter-fill: {FILL_SOURCES} spoofed sources first (one datagram each), then "
        "every other datagram from one fresh flooding source; 'fresh flooder cut' = what the "
        "pre-filter dropped of that source's share (about half of what was sent after the "
        "spoofed ones):"
    )
    for r in fill:
        flooder = max((r.sent - FILL_SOURCES) / 2, 1)
        cut = f"fresh flooder cut {r.pf_dropped / flooder:5.1%}" if r.mode == FILL else "no flood"
        print(
            f"  {r.path:<20} legit OK {r.ok}/{r.knocks} p50/p99 {r.pct(0.5):.2f}/"
            f"{r.pct(0.99):.2f} ms; {cut}"
        )


def summary(rows: list[Row], rss: tuple[int, int, int, int] | None) -> None:
    def get(path: str, mode: str, pf: bool = False) -> Row | None:
        found = [r for r in rows if r.path == path and r.mode == mode and r.prefilter == pf]
        return found[0] if found else None

    print(
        "\nRatios (same run): absorbed datagrams/s; absorbed share of what was sent (the"
        " generator's rate varies row to row); CPU per datagram (lower is better)"
    )
    labels = sorted(
        {r.path for r in rows if r.path.startswith("batched ") or r.path == "batched"}
        - {"batched (RSS)"}
    )

    def costs(path: str, mode: str) -> list[float]:
        return [r.cost for r in rows if r.path == path and r.mode == mode and not r.prefilter]

    if any(r.path == QUIET for r in rows):
        print(
            "\nCPU per datagram: the batched path against the bare C drain (the issue's"
            " reference) and against the C drain that rests as the batched path does"
            " (like for like: what the checks cost); interleaved rounds, no legit knocks in"
            " any; median us/dg, ratio of the medians, each round's ratio:"
        )
        for mode in MODES:
            b, d, m = costs(QUIET, mode), costs(DRAIN, mode), costs(MODERATED, mode)
            if b and d and m:
                each = " ".join(f"{x / y:.2f}x" for x, y in zip(b, d, strict=False))
                like = " ".join(f"{x / y:.2f}x" for x, y in zip(b, m, strict=False))
                print(
                    f"  {mode:<11} batched {median(b):5.2f}  bare drain {median(d):5.2f} "
                    f"({median(b) / median(d):4.2f}x; rounds {each})  moderated drain "
                    f"{median(m):5.2f} ({median(b) / median(m):4.2f}x; rounds {like})"
                )
    print(
        "\nCPU per datagram, each batched row (with the legit knocks: their Python work is"
        " in it) / the median C recvmmsg drain (same run):"
    )
    for mode in MODES:
        drains = costs(DRAIN, mode)
        cells = [
            f"{lb} {r.cost / median(drains):5.2f}x"
            for lb in labels
            if drains and (r := get(lb, mode))
        ]
        if cells:
            print(f"  {mode:<11} " + "  ".join(cells))
    if any(BASELINE in lb for lb in labels):
        print("\nBefore/after (same run): legit OK, p50/p99 ms, CPU us/dg; base -> this tree")
        for mode in MODES:
            for lb in labels:
                new, old = get(lb, mode), get(lb + BASELINE, mode)
                if new and old and BASELINE not in lb:
                    print(
                        f"  {mode:<11} {lb:<20} {old.ok}/{old.knocks} {old.pct(0.5):.2f}/"
                        f"{old.pct(0.99):.2f} {old.cost:.2f} -> {new.ok}/{new.knocks} "
                        f"{new.pct(0.5):.2f}/{new.pct(0.99):.2f} {new.cost:.2f}"
                    )
    for mode in MODES:
        b = get("batched", mode)
        for other in (DRAIN, "uvloop DatagramProtocol", "pure-Python fallback"):
            o = get(other, mode)
            if b and o and o.absorbed:
                print(
                    f"  {mode:<11} batched / {other:<23} absorbed {b.absorbed / o.absorbed:5.2f}x"
                    f"  absorbed share {b.share:4.0%} / {o.share:4.0%} = {b.share / o.share:5.2f}x"
                    f"  CPU/datagram {b.cost / o.cost:5.2f}x"
                )
    print("\nLegitimate knocks OK and p50/p99 ms, pre-filter off -> on (batched path):")
    for mode in MODES:
        off, on = get("batched", mode), get("batched", mode, True)
        if off and on:
            print(
                f"  {mode:<11} {off.ok}/{off.knocks} {off.pct(0.5):.2f}/{off.pct(0.99):.2f}"
                f" -> {on.ok}/{on.knocks} {on.pct(0.5):.2f}/{on.pct(0.99):.2f}"
            )
    if rss is None:
        return
    before, after, peak, sent = rss
    print(
        f"\nfastknockd RSS under a replay of a valid KNOCK from 10,000 addresses ({sent} "
        f"datagrams, pre-filter off): before {before} kB, after {after} kB, peak {peak} kB"
    )


if __name__ == "__main__":
    sys.exit(main())
