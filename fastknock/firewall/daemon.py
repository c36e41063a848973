"""The request side of fastknockfwd: who may ask, what a request may change, batching.

Design
------
- A peer must show the server account's uid *and* gid in SO_PEERCRED (``--test-mode`` also
  admits root), else it gets NOT_PERMITTED. One request per connection, read with
  ``control-timeout``: short, slow or silent peers are dropped, malformed ones get
  MALFORMED; neither affects other connections.
- ``Daemon.validate``, in order: config checksum, address (not all-zero/all-ones, not
  multicast or the IPv4 broadcast address: a lease for one opens the port to any sender
  that spoofs it; loopback is fine; family supported by the nftables family; IPv4-mapped
  addresses arrive as IPv4, normalised by ``ipc.decode_request``), then ``Config.admit``
  (resource known, user known and allowed, port not 0 and not the control port: the same
  rule fastknockd applied), then the chains a jump resource needs.
- Deadlines: a request whose deadline (``ipc``: the sender's give-up, on CLOCK_MONOTONIC)
  has passed gets EXPIRED and changes nothing, checked on arrival and again when its batch
  is planned, right before the transaction: a stalled daemon never applies what its
  requester already reported as failed.
- Batching: validated requests join a queue. One worker coroutine takes *everything*
  queued, plans it (cap check, one change per lease key; the last change to a key wins)
  and applies it as one nftables transaction in a thread, so the event loop keeps
  accepting and queueing while a transaction is in flight. Each requester gets its own
  ACK/NACK; a failing batch is retried item by item (``nft.Firewall.apply``).
- Holders (``holders``): a request claims kernel objects for its ``(user, address)``; an
  object shared by several holders (a prefix, a jump without saddr match, two users on one
  address) lives until the latest holder's deadline, and a revoke removes only its
  holder's claim. In memory: after a restart each live object has one unknown holder,
  which the first revoke of it drops (see ``holders``).
- Cap: ``max-nr-rules`` counts holders of live lease entries (a tcp,udp port lease counts
  2, a jump lease 1 per chain; a port range or a prefix is one entry per protocol
  whatever its width, and each knocker holding it counts), not the static/control-port
  rules. The count starts from what the kernel holds at start-up and is re-read from the
  kernel before refusing anything; a refresh of a live lease needs no new room. Revoking
  a missing lease is ACK.
- Expiry: port leases expire in the kernel (``prune_expired`` forgets them here). Jump
  leases are per-lease rules whose deadline is in their comment; ``sweep`` removes them
  when due (also after a restart).
- Counters (``Daemon.stats``, ``metric_families``) for the log and ``--metrics-file``
  (``live``: kernel objects; ``wide``: prefix/range ones; ``holders``: what the cap counts).
- Hooks (``firewall.hooks``, optional): ``submit`` tells ``hooks.acked`` of every ACK once
  its reply is known (a dict update and a non-blocking pipe write; never awaited).
- The pre-filter (``firewall.prefilter``): ``watch_prefilter`` reads its kernel counters
  every ``prefilter_poll`` seconds (in a thread; the metrics use the last reading) and,
  while it sheds, logs one warning a minute at most, naming the reason and the top sampled
  source prefix (``prefilter.Shedding``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastknock import ipc
from fastknock.conf.model import Config, JumpResource, Refusal
from fastknock.errors import FirewallError, WireError
from fastknock.firewall import prefilter
from fastknock.firewall.holders import Claim, Draft, Holdings
from fastknock.firewall.leases import JumpLease, LeaseKey, PortLease, source
from fastknock.firewall.nft import Firewall
from fastknock.ipc import FwOp, FwRequest, FwStatus
from fastknock.osutil import metrics

if TYPE_CHECKING:
    from fastknock.firewall.hooks import HookLeases

__all__ = ["PREFILTER_POLL", "SWEEP_INTERVAL", "Daemon", "ServerAccount"]

log = logging.getLogger("fastknockfwd")

_BAD_ADDRS = {
    ipaddress.ip_address("0.0.0.0"),
    ipaddress.ip_address("255.255.255.255"),
    ipaddress.ip_address("::"),
    ipaddress.ip_address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
}
SWEEP_INTERVAL = 0.25
PREFILTER_POLL = 10.0  # seconds between readings of the pre-filter's counters


@dataclass
class _Item:
    claims: list[Claim]
    install: bool
    future: asyncio.Future[FwStatus] | None  # None: internal (jump expiry)
    deadline_ms: int | None = None  # ipc.now_ms() after which the requester stopped waiting


@dataclass
class ServerAccount:
    """Who may connect: fastknockd's uid and gid (SO_PEERCRED); root too with --test-mode."""

    uid: int
    gid: int
    allow_root: bool = False

    def permits(self, uid: int, gid: int) -> bool:
        return (uid, gid) == (self.uid, self.gid) or (self.allow_root and uid == 0)


@dataclass
class Daemon:
    cfg: Config
    fw: Firewall
    account: ServerAccount
    clock: Callable[[], float] = time.time
    mono_ms: Callable[[], int] = ipc.now_ms  # the clock of request deadlines
    holdings: Holdings = field(default_factory=Holdings)  # live kernel objects, holders
    counts: Counter[str] = field(default_factory=Counter)
    _queue: list[_Item] = field(default_factory=list)
    _worker: asyncio.Task[None] | None = None
    _expiring: set[LeaseKey] = field(default_factory=set)  # jump expiries in flight
    prefilter_poll: float = PREFILTER_POLL
    prefilter_counts: dict[str, int] = field(default_factory=dict)  # the last reading
    shedding: prefilter.Shedding = field(default_factory=prefilter.Shedding)
    hooks: HookLeases | None = None  # [HOOKS]: told of every ACK (firewall.hooks)

    def _now(self) -> float:
        return self.clock()

    # -- state from the kernel --

    @property
    def leases(self) -> dict[LeaseKey, float]:
        """Live kernel objects -> the deadline the kernel holds (a copy)."""
        return self.holdings.deadlines()

    def load(self) -> None:
        """(Re)read the live leases from the kernel (``Holdings.load``)."""
        now = self._now()
        self.holdings.load(
            (lease.key, now + lease.remaining if lease.remaining is not None else float("inf"))
            for lease in self.fw.scan()
        )

    def prune_expired(self) -> None:
        """Forget expired holders, and port leases the kernel has expired."""
        self.holdings.prune(self._now())

    def live_count(self) -> int:
        """Leases the cap counts: holders (prune first for an up-to-date count)."""
        return self.holdings.count()

    @property
    def stats(self) -> dict[str, int]:
        s = self.fw.stats
        return {
            "requests": self.counts["requests"],
            "acks": self.counts["acks"],
            "nacks": self.counts["nacks"],
            "transactions": s.transactions,
            "changes": s.changes,
            "fallbacks": s.fallbacks,
            "live": len(self.holdings.entries),
            "holders": self.holdings.count(),
            "wide": len(self.holdings.wide),
            "batches": self.counts["batches"],
            "failed_transactions": s.failed_transactions,
            "refused_peers": self.counts["refused_peers"],
            **(self.hooks.stats() if self.hooks is not None else {}),
        }

    def metric_families(self) -> list[metrics.Family]:
        replies = {k: v for k, v in self.counts.items() if k.startswith("status_")}
        counts = self.prefilter_counts if self.fw.prefilter else None
        hooks = self.hooks.metric_stats() if self.hooks is not None else None
        return metrics.fwd_families({**self.stats, **replies}, counts, hooks)

    def log_stats(self) -> None:
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in self.stats.items()))

    # -- requests --

    def validate(self, req: FwRequest) -> FwStatus | list[Claim]:
        """The claims ``req`` makes (one per kernel object), or why it is refused."""
        cfg, nft = self.cfg, self.cfg.nftables
        assert nft is not None
        if not hmac.compare_digest(req.checksum, cfg.checksum):
            return FwStatus.BAD_CHECKSUM
        addr = req.addr  # ipc.decode_request normalised it
        if addr in _BAD_ADDRS or addr.is_multicast or not self.fw.supports(addr):
            return FwStatus.BAD_ADDRESS
        res = cfg.admit(req.user, req.resource)
        if isinstance(res, Refusal):
            return FwStatus[res.name]  # UNKNOWN_RESOURCE, USER_NOT_ALLOWED, BAD_PORT
        install = req.op == FwOp.INSTALL
        timeout = res.timeout if res.timeout is not None else nft.timeout
        holder = (req.user, addr)
        src = source(addr, res.ipv4_prefix, res.ipv6_prefix)
        if isinstance(res, JumpResource):
            changes = []
            for hook, target, match in (
                ("input", res.input, res.input_match_saddr),
                ("forward", res.forward, res.forward_match_saddr),
                ("output", res.output, res.output_match_saddr),
            ):
                if target is None:
                    continue
                if self.fw.chains[hook] is None:
                    log.error("resource %08X needs [NFTABLES] chain-%s", res.id, hook)
                    return FwStatus.FIREWALL_ERROR
                lease = JumpLease(res.id, hook, target, src if match else None)
                changes.append(Claim(lease, holder, install, timeout))
            return changes
        protos = [p for p, on in (("tcp", res.tcp), ("udp", res.udp)) if on]
        return [
            Claim(PortLease(src, p, res.port, res.port_last), holder, install, timeout)
            for p in protos
        ]

    async def submit(self, req: FwRequest) -> FwStatus:
        self.counts["requests"] += 1
        checked = self.validate(req)
        if isinstance(checked, FwStatus):
            status = checked
        elif req.deadline_ms is not None and self.mono_ms() >= req.deadline_ms:
            status = FwStatus.EXPIRED  # e.g. queued while we were stalled: the sender gave up
        else:
            future: asyncio.Future[FwStatus] = asyncio.get_running_loop().create_future()
            self._enqueue(_Item(checked, req.op == FwOp.INSTALL, future, req.deadline_ms))
            status = await future
        self.counts["acks" if status == FwStatus.ACK else "nacks"] += 1
        if status == FwStatus.ACK and self.hooks is not None:
            self.hooks.acked(req, self.cfg)  # the lease is in the kernel (or gone from it)
        self.counts[f"status_{status.name.lower()}"] += 1
        what = "install" if req.op == FwOp.INSTALL else "revoke"
        log.log(
            logging.INFO if status == FwStatus.ACK else logging.WARNING,
            "%s user=%08X resource=%08X addr=%s: %s",
            what, req.user, req.resource, req.addr, status.name,
        )  # fmt: skip
        return status

    def _enqueue(self, item: _Item) -> None:
        self._queue.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._run_batch(batch)
            except Exception:  # never leave a requester hanging
                log.exception("batch failed")
                for item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_result(FwStatus.FIREWALL_ERROR)

    async def _run_batch(self, batch: list[_Item]) -> None:
        assert self.cfg.nftables is not None
        self.counts["batches"] += 1
        cap = self.cfg.nftables.max_nr_rules
        accepted: list[_Item] = []
        self.prune_expired()
        draft = Draft(self.holdings, self._now())
        live = self.live_count()
        resynced = False
        now_ms = self.mono_ms()  # the last deadline check before these changes are applied
        for item in batch:
            if item.deadline_ms is not None and now_ms >= item.deadline_ms:
                if item.future is not None:
                    item.future.set_result(FwStatus.EXPIRED)
                continue
            if item.install:
                new = draft.new_entries(item.claims)
                if live + new > cap and not resynced:
                    resynced = True  # leases removed by hand or expired free their room
                    await asyncio.to_thread(self.load)
                    self.prune_expired()
                    planned = [c for i in accepted for c in i.claims]
                    draft = Draft(self.holdings, draft.now)
                    live = self.live_count() + draft.new_entries(planned)
                    draft.apply(planned)
                    new = draft.new_entries(item.claims)
                if live + new > cap:
                    if item.future is not None:
                        item.future.set_result(FwStatus.LIMIT)
                    continue
                live += new
            draft.apply(item.claims)
            accepted.append(item)
        for old in draft.superseded:
            log.warning("replacing %s: it overlaps a lease of the current config's shape", old)
        changes = draft.changes()
        errors = await asyncio.to_thread(self.fw.apply, changes) if changes else []
        failed = set()
        for change, error in zip(changes, errors, strict=True):
            if error is not None:
                failed.add(change.key)
                log.error("nftables refused %s: %s", change, error)
        draft.commit(failed)
        self._expiring.difference_update(draft.touched)
        log.debug(
            "transaction batch: %d requests, %d changes, %d failed; totals %s",
            len(batch), len(changes), len(failed), self.stats,
        )  # fmt: skip
        for item in accepted:
            if item.future is not None:
                bad = any(c.key in failed for c in item.claims)
                item.future.set_result(FwStatus.FIREWALL_ERROR if bad else FwStatus.ACK)

    async def sweep(self) -> None:
        """Remove jump leases whose deadline passed (port leases expire in the kernel)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            due = [k for k in self.holdings.due_jumps(self._now()) if k not in self._expiring]
            if due:
                self._expiring.update(due)
                log.info("expiring %d jump lease(s)", len(due))
                self._enqueue(_Item([Claim(k, None, False) for k in due], False, None))

    async def watch_prefilter(self) -> None:
        """Read the pre-filter's counters periodically; warn (rate-limited) while it sheds."""
        while True:
            await self.poll_prefilter()
            await asyncio.sleep(self.prefilter_poll)

    async def poll_prefilter(self) -> None:
        fw = self.fw  # a reload may swap it meanwhile
        if not fw.prefilter:
            return
        try:
            counts = await asyncio.to_thread(fw.prefilter_counters)
            self.prefilter_counts = counts
            due = self.shedding.update(counts, self._now())
            if due is None:
                return
            reason, dropped = due
            top = await asyncio.to_thread(fw.prefilter_top, reason)
        except FirewallError as exc:
            log.debug("cannot read the pre-filter's counters: %s", exc)
            return
        log.warning("%s", self.shedding.line(reason, dropped, self.prefilter_poll, top))

    async def drain(self) -> None:
        if self._worker is not None:
            await self._worker

    # -- connections --

    async def serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            if not self.account.permits(uid, gid):
                log.warning("refused peer pid=%d uid=%d gid=%d: not permitted", pid, uid, gid)
                self.counts["refused_peers"] += 1
                try:  # read the request first, so the peer sees the reply, not EPIPE
                    await asyncio.wait_for(reader.readexactly(ipc.REQUEST_SIZE), 1.0)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
                    pass
                await self._reply(writer, FwStatus.NOT_PERMITTED)
                return
            try:
                data = await asyncio.wait_for(
                    reader.readexactly(ipc.REQUEST_SIZE), self.cfg.control_timeout
                )
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as exc:
                log.warning(
                    "dropped peer pid=%d: no complete request (%s)", pid, type(exc).__name__
                )
                return
            try:
                req = ipc.decode_request(data)
            except WireError as exc:
                log.warning("malformed request from pid=%d: %s", pid, exc)
                await self._reply(writer, FwStatus.MALFORMED)
                return
            await self._reply(writer, await self.submit(req))
        except Exception:
            log.exception("connection handler failed")
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: FwStatus) -> None:
        try:
            writer.write(ipc.encode_reply(status))
            await asyncio.wait_for(writer.drain(), self.cfg.control_timeout)
        except (OSError, asyncio.TimeoutError):
            pass
