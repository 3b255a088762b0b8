"""Membership on the node (issue 16, docs/MEMBERSHIP.md): the runtime side of :mod:`.core`.

It signs this node's announcement, verifies every announcement it is handed (the handshake's rules, then the
signature, then freshness) before the sans-I/O core sees it, carries out the core's actions through the
:class:`~quicmesh.runtime.features.FeatureHost` (members become known peers, dialed or released), dials the
seeds by address, runs the Sync/Digest exchanges, and spreads newer CRLs. Everything travels as feature
messages and requests with tag MEMBERSHIP: reliable, acknowledged, deduplicated like the application's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from quicmesh.config import Address, MeshSection
from quicmesh.config.schema import parse_address
from quicmesh.errors import ConfigError, IdentityError, ProtocolError, QuicmeshError
from quicmesh.membership import core as c
from quicmesh.membership.announcement import Announcement, decode_announcement, verify_announcement
from quicmesh.membership.messages import (
    Announce,
    Crl,
    Digest,
    DigestReply,
    Sync,
    SyncReply,
    decode_message,
    encode_message,
)
from quicmesh.protocol import identity, wire
from quicmesh.runtime.features import FeatureBase, FeatureHost

log = logging.getLogger("quicmesh.membership")

TAG = wire.FeatureTag.MEMBERSHIP
#: Seconds between seed dials while no member is connected: doubling from the first to the last.
SEED_RETRY = (0.5, 30.0)
#: How long a graceful stop waits for its peers to acknowledge the leaving announcement.
LEAVE_WAIT = 0.5
#: Anti-entropy interval, at least, of a mesh of configured peers (see _core_settings).
CLOSED_GOSSIP_INTERVAL = 10.0
#: One log line per rejection reason per this many seconds (the counters count them all).
_LOG_EVERY = 10.0


class MembershipFeature(FeatureBase):
    """Members learnt from signed announcements; seeds; CRL spreading (see the module docstring)."""

    feature_tags = frozenset({TAG})

    def __init__(self, host: FeatureHost, rng: random.Random | None = None) -> None:
        self._host = host
        self._rng = rng if rng is not None else random.Random()
        self._core = c.MembershipCore(host.node_name, _core_settings(host.config.mesh), self._rng)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._version = 0
        self._leaves: dict[str, x509.Certificate] = {}  # member -> its verified leaf (revocation checks)
        self._seed_addresses: set[tuple[str, int]] = set()  # seeds, resolved
        self._seed_task: asyncio.Task[None] | None = None
        self._activity: dict[str, int] = {}  # held member -> host.peer_activity at the last look
        self._logged: dict[str, float] = {}
        self.crl_updates = 0
        self.crls_rejected = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """The node is running: announce ourselves, dial the seeds, start the clock."""
        self._apply(self._core.set_local(self._sign(leaving=False), self._now()))
        self._host.set_on_demand(self._on_demand)
        if self._host.config.mesh.seeds:
            self._seed_task = asyncio.ensure_future(self._dial_seeds())
        self._schedule()

    async def leave(self) -> None:
        """Graceful stop: a signed departure to every connected peer, acknowledged within LEAVE_WAIT."""
        announcement = self._sign(leaving=True)
        self._apply(self._core.set_local(announcement, self._now()), wait=True)
        body = encode_message(Announce((announcement.raw,)))
        sends = [asyncio.ensure_future(self._send(peer, body)) for peer in self._core.connected()]
        if sends:
            await asyncio.wait(sends, timeout=LEAVE_WAIT)

    def node_stopping(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._seed_task is not None:
            self._seed_task.cancel()
        self._host.set_on_demand(None)

    # --- the seam -------------------------------------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        seed = any(address in self._seed_addresses for address in self._observed(peer))
        self._apply(self._core.peer_connected(peer, self._now(), seed=seed))

    def peer_lost(self, peer: str, reason: str) -> None:
        self._apply(self._core.peer_disconnected(peer, self._now()))

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        message = decode_message(data)
        if isinstance(message, Announce):
            for raw in message.announcements:
                self._ingest(raw, peer, pushed=True)
        elif isinstance(message, Crl):
            self._crl_received(message.der, peer)
        else:
            raise ProtocolError(f"{type(message).__name__} is a request, not a message")
        return None

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        message = decode_message(data)
        now = self._now()
        mine = self.crl_number()
        if isinstance(message, Sync):
            return encode_message(SyncReply(self._core.sync_received(message.digest, now), mine or 0))
        if isinstance(message, Digest):
            newer, want = self._core.digest_received(message.entries, now)
            budget = self._host.config.limits.max_message_size // 2
            raws: list[bytes] = []
            for announcement in newer:  # the rest comes with the next sync
                budget -= len(announcement.raw) + 4
                if budget < 0:
                    break
                raws.append(announcement.raw)
            crl = self._crl_der() if mine is not None and mine > message.crl_number else None
            return encode_message(DigestReply(tuple(raws), tuple(want), crl))
        raise ProtocolError(f"{type(message).__name__} is a message, not a request")

    # --- CRLs -------------------------------------------------------------------------------------
    def crl_number(self) -> int | None:
        """The highest CRL number this node holds (None: no CRL)."""
        numbers = [_crl_number(crl) for crl in self._host.credentials.trust.crls]
        return max(numbers, default=None)

    def publish_crl(self, der: bytes) -> dict[str, object]:
        """An operator hands this node a CRL (``quicmesh crl push``): applied and spread if newer."""
        applied, reason = self._apply_crl(der, source=None)
        return {"applied": applied, "reason": reason, "crl_number": self.crl_number()}

    def _crl_received(self, der: bytes, source: str) -> None:
        self._apply_crl(der, source=source)

    def _apply_crl(self, der: bytes, source: str | None) -> tuple[bool, str]:
        credentials = self._host.credentials
        old = credentials.trust
        try:
            crl = x509.load_der_x509_crl(der)
            number = _crl_number(crl)  # (parsed lazily: a malformed extension raises here)
            issuer = crl.issuer
        except ValueError as error:
            self.crls_rejected += 1
            return False, f"not a DER CRL: {error}"
        current = self.crl_number()
        if current is not None and number <= current:
            return False, f"CRL number {number} is not newer than {current}"
        kept = [other for other in old.crls if other.issuer != issuer]
        try:
            trust = identity.TrustPolicy(old.ca_certs, old.mesh, [*kept, crl], old.denylist)
        except IdentityError as error:  # not signed by a CA of this mesh
            self.crls_rejected += 1
            self._log_rejection("crl rejected", str(error), source)
            return False, str(error)
        credentials.trust = trust
        self.crl_updates += 1
        self._persist_crl(trust)
        log.warning("newer CRL applied", extra={"event": "crl_applied", "crl_number": number,
                                                "peer": source or "operator"})
        now = self._now()
        for node, leaf in list(self._leaves.items()):
            if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
                self._apply(self._core.member_revoked(node, now))
        self._host.recheck_identities()
        body = encode_message(Crl(der))
        for peer in self._core.connected():
            if peer != source:
                self._spawn_send(peer, body)
        return True, f"CRL number {number} applied"

    def _crl_der(self) -> bytes | None:
        crls = self._host.credentials.trust.crls
        if not crls:
            return None
        return max(crls, key=_crl_number).public_bytes(Encoding.DER)

    def _persist_crl(self, trust: identity.TrustPolicy) -> None:
        """Write the CRLs to [tls] crl (atomically), so a restart keeps the revocation."""
        path = self._host.config.tls.crl
        if path is None:
            return
        pem = b"".join(crl.public_bytes(Encoding.PEM) for crl in trust.crls)
        temporary = Path(f"{path}.tmp-{os.getpid()}")
        try:
            temporary.write_bytes(pem)
            os.replace(temporary, path)
        except OSError as error:
            log.warning("cannot write the newer CRL", extra={"event": "crl_write_failed", "path": str(path),
                                                             "reason": str(error)})

    # --- announcements ----------------------------------------------------------------------------
    def _sign(self, *, leaving: bool) -> Announcement:
        self._version = max(time.time_ns() // 1000, self._version + 1)
        config = self._host.config
        return self._host.credentials.announcement(
            mesh=config.node.mesh, node=config.node.name, version=self._version, epoch=self._host.epoch,
            issued_at=int(time.time()), addresses=tuple(str(a) for a in self.advertised()),
            services=tuple(service.name for service in config.services), relay=config.relay.serve,
            leaving=leaving,
        )

    def advertised(self) -> tuple[Address, ...]:
        """[mesh] advertise, else the bound listen address, else (a wildcard) this host's addresses."""
        config = self._host.config
        if config.mesh.advertise:
            return config.mesh.advertise
        bound = self._host.listen_address
        port = bound[1] if bound is not None else config.node.listen.port
        host = config.node.listen.host
        if host not in ("0.0.0.0", "::"):
            return (Address(host, port),)
        return tuple(Address(ip, port) for ip in _host_addresses(v6=host == "::")) or (Address("127.0.0.1", port),)

    def _ingest(self, raw: bytes, source: str, *, pushed: bool) -> None:
        """One announcement from ``source``: bounded, decoded, cheap checks, verified, then to the core."""
        now = self._now()
        core = self._core
        if pushed and not core.admit_announcement(source, now):
            return
        try:
            announcement = decode_announcement(raw)
        except ProtocolError as error:
            self._reject("malformed", str(error), source)
            return
        if not core.is_newer(announcement.node, announcement.version):
            self._apply(core.announcement_received(announcement, source, now))  # counted as a replay
            return
        if not self._host.config.mesh.open and not self._configured(announcement.node):
            self._reject("not a configured peer", announcement.node, source)
            return
        try:
            verify_announcement(announcement, self._host.credentials.trust,
                                max_age=self._host.config.mesh.member_timeout)
        except IdentityError as error:
            self._reject(type(error).__name__, f"{announcement.node}: {error}", source)
            return
        leaf = x509.load_der_x509_certificate(announcement.chain[0])
        if announcement.leaving:
            self._leaves.pop(announcement.node, None)
        else:
            self._leaves[announcement.node] = leaf
        self._apply(core.announcement_received(announcement, source, now))

    def _configured(self, node: str) -> bool:
        return self._host.known_peers().get(node) is False

    def _reject(self, reason: str, detail: str, source: str) -> None:
        self._core.count_rejected(reason)
        self._log_rejection(f"announcement rejected: {reason}", detail, source)

    def _log_rejection(self, message: str, detail: str, source: str | None) -> None:
        now = self._now()
        if now - self._logged.get(message, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[message] = now
            log.warning(message, extra={"event": "announcement_rejected", "peer": source, "reason": detail})

    # --- the core's actions -----------------------------------------------------------------------
    def _apply(self, actions: list[c.Action], wait: bool = False) -> None:
        host = self._host
        for action in actions:
            if isinstance(action, c.SendAnnounce):
                if not wait:
                    raws = tuple(a.raw for a in action.announcements)
                    self._spawn_send(action.peer, encode_message(Announce(raws)))
            elif isinstance(action, c.StartSync):
                host.spawn(self._sync(action.peer))
            elif isinstance(action, c.Reannounce):
                self._apply(self._core.set_local(self._sign(leaving=False), self._now()))
            elif isinstance(action, (c.MemberUp, c.MemberChanged)):
                announced = action.announcement
                if not host.add_member(announced.node, _addresses(announced.addresses), dial=False):
                    self._core.count_rejected("member limit")
            elif isinstance(action, c.MemberGone):
                self._leaves.pop(action.node, None)
                self._activity.pop(action.node, None)
                log.info("member gone", extra={"event": "member_gone", "peer": action.node, "reason": action.reason})
                host.forget_member(action.node, f"member {action.reason}")
            elif isinstance(action, c.Connect):
                host.add_member(action.node, (), dial=True)
                self._activity[action.node] = host.peer_activity(action.node)
            elif isinstance(action, c.Disconnect):
                self._activity.pop(action.node, None)
                if host.known_peers().get(action.node):  # a member, not a peer of the config
                    host.release_member(action.node, action.reason)
        self._schedule()

    def _spawn_send(self, peer: str, body: bytes) -> None:
        self._host.spawn(self._send(peer, body))

    async def _send(self, peer: str, body: bytes) -> None:
        try:
            await self._host.send_message(peer, TAG, body)
        except QuicmeshError as error:
            log.debug("membership message not delivered", extra={"peer": peer, "reason": str(error)})

    async def _sync(self, peer: str) -> None:
        """Anti-entropy with ``peer``: digests equal -> done; else exchange what each side lacks."""
        host, core = self._host, self._core
        try:
            reply = decode_message(await host.request(peer, TAG, encode_message(
                Sync(core.digest(), core.member_count(), self.crl_number() or 0))))
            if not isinstance(reply, SyncReply):
                return
            if reply.same and reply.crl_number <= (self.crl_number() or 0):
                self._apply(core.sync_done(self._now()))
                return  # (a newer CRL there: the Digest exchange below brings it)
            reply = decode_message(await host.request(peer, TAG, encode_message(
                Digest(tuple(core.digest_entries()), self.crl_number() or 0))))
            if not isinstance(reply, DigestReply):
                return
        except (QuicmeshError, ProtocolError) as error:
            log.debug("membership sync failed", extra={"peer": peer, "reason": str(error)})
            return
        if reply.crl is not None:
            self._crl_received(reply.crl, peer)
        for raw in reply.announcements:
            self._ingest(raw, peer, pushed=False)
        self._apply(core.wanted(peer, reply.want, self._now()))
        self._apply(core.sync_done(self._now()))

    def _on_demand(self, peer: str) -> None:
        if self._host.running:
            self._apply(self._core.want_connection(peer, self._now()))

    # --- time ---------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self._host.running:
            return
        deadline = self._core.next_deadline()
        if self._activity:  # held on demand: look at their traffic every second
            deadline = min(deadline if deadline is not None else float("inf"), self._now() + 1.0)
        if deadline is None:
            return
        if self._timer is not None:
            if abs(self._timer_at - deadline) < 1e-3:
                return
            self._timer.cancel()
        self._timer_at = max(deadline, self._now())
        self._timer = asyncio.get_running_loop().call_at(self._timer_at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._host.running:
            return
        now = self._now()
        for node, seen in list(self._activity.items()):
            activity = self._host.peer_activity(node)
            if activity != seen:
                self._activity[node] = activity
                self._core.traffic(node, now)
        self._apply(self._core.poll(now))

    async def _dial_seeds(self) -> None:
        """Dial every seed while no member is connected, backing off; resolved each time (DNS may move)."""
        delay = SEED_RETRY[0]
        loop = asyncio.get_running_loop()
        while self._host.running:
            if not self._core.connected():
                for seed in self._host.config.mesh.seeds:
                    try:
                        infos = await loop.getaddrinfo(seed.host, seed.port, type=socket.SOCK_DGRAM)
                    except OSError as error:
                        self._log_rejection("cannot resolve seed", f"{seed}: {error}", None)
                        continue
                    for info in infos[:2]:
                        address = (_unmapped(str(info[4][0])), int(info[4][1]))
                        self._seed_addresses.add(address)
                        if address != self._host.listen_address:
                            self._host.dial_address(address)
                await asyncio.sleep(delay)
                delay = min(SEED_RETRY[1], delay * 2)
            else:
                delay = SEED_RETRY[0]
                await asyncio.sleep(1.0)

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """What ``quicmesh members`` shows (times as Unix seconds)."""
        offset = time.time() - self._now()
        connected = set(self._core.connected())
        rows = [{
            "name": info.node, "addresses": list(info.addresses), "version": info.version,
            "source": info.source, "last_heard": round(info.last_heard + offset, 3),
            "connected": info.node in connected, "state": "gone" if info.gone_reason else "alive",
            "gone_reason": info.gone_reason,
        } for info in sorted(self._core.members(), key=lambda i: (i.gone_reason is not None, i.node))]
        return {
            "node": self._host.node_name, "mode": "full" if self._core.full_mode else "on-demand",
            "open": self._host.config.mesh.open, "members": rows,
            "advertised": [str(a) for a in self.advertised()], "seeds": [str(s) for s in self._host.config.mesh.seeds],
            "crl_number": self.crl_number(),
            "counters": {**self._core.counters(), "crl_updates": self.crl_updates, "crls_rejected": self.crls_rejected},
        }

    def summary(self) -> dict[str, object]:
        """The status document's part: mode and counts only (a 1,000-member list belongs in `members`)."""
        rows = self._core.members()
        gone = sum(1 for info in rows if info.gone_reason is not None)
        return {"open": self._host.config.mesh.open, "mode": "full" if self._core.full_mode else "on-demand",
                "alive": len(rows) - gone, "gone": gone, "connected": len(self._core.connected()),
                "crl_number": self.crl_number()}

    def _observed(self, peer: str) -> list[tuple[str, int]]:
        found = []
        for text in self._host.peer_addresses(peer):
            try:
                address = parse_address(text)
            except (ConfigError, ValueError):
                continue
            found.append((address.host, address.port))
        return found

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


def _core_settings(mesh: MeshSection) -> MeshSection:
    """With members = "configured" every member is a [[peers]] peer this node is connected to and pushes its
    announcements to; anti-entropy only catches up after reconnects, so it runs every CLOSED_GOSSIP_INTERVAL
    at most (a sync per second per node was a third of a 32-node static mesh's idle CPU)."""
    if mesh.open:
        return mesh
    return replace(mesh, gossip_interval=max(mesh.gossip_interval, CLOSED_GOSSIP_INTERVAL))


def _addresses(texts: tuple[str, ...]) -> tuple[Address, ...]:
    """Announced "host:port" strings that parse (a signed but odd address is skipped, not fatal)."""
    found = []
    for text in texts:
        try:
            found.append(parse_address(text))
        except (ConfigError, ValueError):
            continue
    return tuple(found)


def _host_addresses(*, v6: bool) -> list[str]:
    """This host's non-loopback addresses, by its host name (the wildcard-listen default to advertise)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_DGRAM)
    except OSError:
        return []
    found: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if ip.is_loopback or ip.is_link_local or (ip.version == 6 and not v6) or str(ip) in found:
            continue
        found.append(str(ip))
    return found


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    """Its CRL number (0 when it has none: any numbered CRL replaces it)."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0

