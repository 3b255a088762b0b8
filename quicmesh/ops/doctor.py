"""`quicmesh doctor [PEER]`: why does this node (or a peer) not connect? The first problem, in plain words,
with its fix.

The checks run in the order a node depends on them: the config, the files it names, this node's own
certificate (against the clock and the CA), then for each peer its DNS name, its UDP port and a real
QUIC handshake made with this node's own credentials, verified exactly as the node verifies a peer. The
handshake stops after TLS: the doctor never sends a Hello, so the peer never counts it as this node.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import pwd
import shlex
import socket
import stat
import time
from typing import TYPE_CHECKING, Any

from quicmesh.config import Config, PeerConfig, load_config
from quicmesh.errors import (ChainError, ConfigError, IdentityError, IdentityMismatchError, PinMismatchError,
                             QuicmeshError, RevokedError)
from quicmesh.protocol.dates import days_left, format_utc

if TYPE_CHECKING:
    from cryptography import x509

    from quicmesh.runtime.credentials import Credentials

EXIT_GOOD, EXIT_PROBLEM = 0, 1


class Problem(Exception):
    """The first thing found wrong: what it is, and what to do about it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


def run_doctor(config_path: str, peer: str | None = None, *, timeout: float = 3.0) -> int:
    """Run every check, printing one ``ok`` line per check passed; stop at the first problem."""
    try:
        config = _check_config(config_path)
        _check_files(config)
        credentials = _check_own_certificate(config)
        if peer is not None and config.peer(peer) is None:
            known = ", ".join(p.name for p in config.peers) or "none"
            raise Problem(f"{peer} is not a configured peer of {config.node.name} (peers: {known})",
                          f"add a [[peers]] entry for {peer} to {config_path}, or check the name")
        for target in [config.peer(peer)] if peer is not None else config.peers:
            assert target is not None
            asyncio.run(_check_peer(config, credentials, target, timeout))
    except Problem as problem:
        print(f"PROBLEM: {problem.what}\nFIX: {problem.fix}", flush=True)
        return EXIT_PROBLEM
    print("all good", flush=True)
    return EXIT_GOOD


def _ok(line: str) -> None:
    print(f"ok  {line}", flush=True)


# --- this node ----------------------------------------------------------------------------------------
def _check_config(path: str) -> Config:
    try:
        config = load_config(path, check_files=False)  # the files get their own, plainer check below
    except ConfigError as exc:
        where = f"{exc.source}: " if exc.source else ""
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        raise Problem(f"the config is invalid: {where}{exc.errors[0]}{more}",
                      f"edit the config; `quicmesh check-config -c {shlex.quote(path)}` lists every error") from None
    _ok(f"config {config.path} (node {config.node.name}, mesh {config.node.mesh}, {len(config.peers)} peers)")
    return config


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _check_files(config: Config) -> None:
    files = {"tls.ca": config.tls.ca, "tls.cert": config.tls.cert, "tls.key": config.tls.key}
    if config.tls.crl is not None:
        files["tls.crl"] = config.tls.crl
    for key, path in files.items():
        try:
            with open(path, "rb") as file:
                file.read(1)
        except FileNotFoundError:
            raise Problem(f"{path} ({key} in the config) does not exist",
                          f"copy the file there, or point {key} at where it is") from None
        except IsADirectoryError:
            raise Problem(f"{path} ({key} in the config) is a folder, not a file", f"point {key} at the file")
        except PermissionError:
            raise Problem(f"{path} ({key}) cannot be read by the user {_user()} running this",
                          f"run quicmesh as the node's user (the owner of {path}), or give {_user()} access: "
                          f"chown {_user()} {shlex.quote(str(path))}") from None
        except OSError as exc:
            raise Problem(f"{path} ({key}) cannot be read: {exc.strerror}", "check the disk and the path") from None
    mode = stat.S_IMODE(os.stat(config.tls.key).st_mode)
    if mode & 0o077:
        raise Problem(f"the private key {config.tls.key} can be read by group or others (mode {mode:04o})",
                      f"chmod 600 {shlex.quote(str(config.tls.key))}")
    _ok(f"files: {', '.join(str(p.name) for p in files.values())} readable, key mode {mode:04o}")


def check_credentials(config: Config) -> tuple[dict[str, Any], list[str]]:
    """Load cert, key, CA and CRL as the node would, and check the cert is this node's in this mesh.

    Returns facts about the certificate and every problem found (as ``key: message`` lines).
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from quicmesh.protocol import identity

    errors: list[str] = []
    facts: dict[str, Any] = {}

    def attempt(key: str, load: Any) -> Any:
        try:
            return load()
        except (QuicmeshError, OSError, ValueError) as exc:
            errors.append(f"{key}: {exc}")
            return None

    chain = attempt("tls.cert", lambda: identity.load_certificates(config.tls.cert))
    key = attempt("tls.key", lambda: identity.load_private_key(config.tls.key))
    trust = attempt("tls.ca", lambda: identity.TrustPolicy.from_files(
        config.tls.ca, config.node.mesh, crl_path=config.tls.crl, denylist=config.tls.denylist))
    if chain:
        cert = chain[0]
        facts = {"fingerprint": identity.fingerprint(cert),
                 "cert_not_after": cert.not_valid_after_utc.isoformat(),
                 "cert_days_left": days_left(cert.not_valid_after_utc)}
        if key is not None:
            spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                errors.append(f"tls.key: {config.tls.key} is not the key of the certificate {config.tls.cert}")
        if trust is not None:
            try:
                trust.verify(chain, expect_node=config.node.name)
            except IdentityError as exc:
                errors.append(f"tls.cert: {config.tls.cert}: {exc}")
    return facts, errors


def _clock_problem(whose: str, cert: x509.Certificate, renew: str) -> Problem | None:
    """A certificate not valid now: not yet (a clock is wrong), or no longer (it needs renewing)."""
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_before_utc > now:
        ahead = (cert.not_valid_before_utc - now).total_seconds()
        return Problem(f"{whose} certificate is not valid before {format_utc(cert.not_valid_before_utc)}, "
                       f"{_duration(ahead)} from now by this machine's clock: clock skew (this clock is behind, "
                       "or the CA host's clock was ahead when it signed)",
                       "check the time on this machine and on the CA host (timedatectl; enable NTP), then "
                       "wait until the certificate is valid or issue it again")
    if cert.not_valid_after_utc < now:
        return Problem(f"{whose} certificate expired on {format_utc(cert.not_valid_after_utc)}",
                       f"issue a new one: {renew} (if this clock is wrong instead, fix the time)")
    return None


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} seconds"


def _check_own_certificate(config: Config) -> Credentials:
    from quicmesh.protocol import identity
    from quicmesh.runtime.credentials import Credentials

    renew = f"quicmesh-pki renew {config.node.name} on the CA host, then copy node.crt here"
    try:
        chain = identity.load_certificates(config.tls.cert)
    except IdentityError as exc:
        raise Problem(f"this node's certificate cannot be loaded: {exc}", "replace it with the PEM the CA issued")
    if (problem := _clock_problem("this node's", chain[0], renew)) is not None:
        raise problem
    facts, errors = check_credentials(config)
    if errors:
        raise Problem(f"this node's credentials are unusable: {errors[0]}",
                      "give the node the certificate the mesh CA issued for it, its key and the mesh's ca.crt "
                      f"(`quicmesh check-config -c {shlex.quote(str(config.path))}` shows every problem)")
    _ok(f"certificate of {config.node.name}: {facts['fingerprint']}, valid until {facts['cert_not_after'][:10]} "
        f"({facts['cert_days_left']:.0f} days), issued by the mesh CA")
    return Credentials(config)


# --- a peer -------------------------------------------------------------------------------------------
async def _check_peer(config: Config, credentials: Credentials, peer: PeerConfig, timeout: float) -> None:
    address = peer.address
    entry = f"peers[{config.peers.index(peer)}].address"
    try:
        ipaddress.ip_address(address.host.partition("%")[0])
        literal = True
    except ValueError:
        literal = False
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise Problem(f"{peer.name}'s host name {address.host} does not resolve: {exc.strerror}",
                      f"fix the name in DNS (or /etc/hosts), or set {entry} to its IP address") from None
    family, _, _, _, sockaddr = infos[0]
    if not literal:
        _ok(f"{peer.name}: {address.host} resolves to {sockaddr[0]}")
    await _handshake(config, credentials, peer, family, sockaddr, timeout)


async def _handshake(config: Config, credentials: Credentials, peer: PeerConfig, family: int,
                     sockaddr: Any, timeout: float) -> None:
    """A QUIC handshake with ``peer`` on a socket of our own (connected, so a closed port is seen as such)."""
    from aioquic.quic import events

    from quicmesh.transport._aioquic import MeshQuicConnection

    where = f"{peer.name} at {peer.address}"
    entry = f"peers[{config.peers.index(peer)}]"
    peers = {p.name: p for p in config.peers}
    quic = MeshQuicConnection(configuration=credentials.quic_configuration(config, is_client=True),
                              verify_peer=lambda chain: credentials.verify_peer(chain, peer.name, peers))
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        own_host = config.node.listen.host
        if family == socket.AF_INET and own_host not in ("0.0.0.0", ""):  # leave from the node's own address
            sock.bind((own_host, 0))
        sock.connect(sockaddr)
        loop = asyncio.get_running_loop()
        heard = False
        deadline = time.monotonic() + timeout
        quic.connect(sockaddr, now=time.monotonic())
        while True:
            for data, _ in quic.datagrams_to_send(now=time.monotonic()):
                sock.send(data)
            for event in iter(quic.next_event, None):
                if isinstance(event, events.HandshakeCompleted):
                    name, fingerprint = quic.verified_peer
                    _ok(f"{where}: UDP port answers, QUIC handshake done, identity "
                        f"quicmesh://{config.node.mesh}/{name} ({fingerprint}) verified")
                    quic.close(error_code=0, reason_phrase="quicmesh doctor")
                    for data, _ in quic.datagrams_to_send(now=time.monotonic()):
                        sock.send(data)
                    return
                if isinstance(event, events.ConnectionTerminated):
                    raise _refusal(quic, event, credentials, peer, where, entry, config)
            now = time.monotonic()
            if now >= deadline:
                if heard:
                    raise Problem(f"{where} answered but the QUIC handshake did not finish within {timeout:g}s",
                                  "the path may drop large packets (MTU) or the peer is overloaded; see its log, "
                                  "or try a longer --timeout")
                raise Problem(f"no answer from {where} (UDP {sockaddr[0]}:{sockaddr[1]}) within {timeout:g}s",
                              f"check that the node runs there and that UDP port {peer.address.port} is open in "
                              f"every firewall between (and that {entry}.address is right)")
            timer = quic.get_timer()
            wait = min(deadline, timer if timer is not None else deadline) - now
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(wait, 0.0))
            except TimeoutError:
                quic.handle_timer(now=time.monotonic())
                continue
            heard = True
            quic.receive_datagram(data, sockaddr, now=time.monotonic())
    except ConnectionRefusedError:
        raise Problem(f"{where}: nothing listens on UDP port {peer.address.port} (the host answered: port "
                      "unreachable)",
                      f"start the node on {peer.name} (`quicmesh run`), or fix {entry}.address if {peer.name} "
                      "listens elsewhere (its node.listen)") from None
    finally:
        sock.close()


def _refusal(quic: Any, event: Any, credentials: Credentials, peer: PeerConfig, where: str, entry: str,
             config: Config) -> Problem:
    """Why the handshake ended: our verification of the peer's certificate, or the peer's of ours."""
    chain = quic.peer_chain()
    if quic.verify_error is not None and chain:
        renew = f"quicmesh-pki renew {peer.name} on the CA host, then copy its node.crt to {peer.name}"
        if (problem := _clock_problem(f"{peer.name}'s", chain[0], renew)) is not None:
            return problem
        try:
            credentials.verify_peer(chain, peer.name, {p.name: p for p in config.peers})
            error: Exception = quic.verify_error
        except IdentityError as exc:
            error = exc
        return _identity_problem(error, chain[0], peer, where, entry, config)
    if quic.verify_error is not None:
        return Problem(f"{where} presented no usable certificate: {quic.verify_error}",
                       f"check that {where} is a quicmesh node of mesh {config.node.mesh}")
    reason = event.reason_phrase or f"error code {event.error_code:#x}"
    if 0x100 <= event.error_code < 0x200:  # a TLS alert: the peer refused our certificate
        return Problem(f"{peer.name} refused this node's certificate: {reason}",
                       f"on {peer.name}: its tls.ca must be this mesh's CA, its [[peers]] must list "
                       f"{config.node.name}, and {config.node.name} must not be revoked there (see {peer.name}'s "
                       "log for the handshake failure)")
    return Problem(f"{where} closed the connection during the handshake: {reason}",
                   f"see {peer.name}'s log; check that both nodes run the same quicmesh version")


def _identity_problem(error: Exception, leaf: x509.Certificate, peer: PeerConfig, where: str, entry: str,
                      config: Config) -> Problem:
    from quicmesh.protocol.identity import certificate_label

    label = certificate_label(leaf)
    if isinstance(error, IdentityMismatchError):
        return Problem(f"the node at {peer.address} is not {peer.name}: {error}",
                       f"{entry}.address points at another node: set it to {peer.name}'s address")
    if isinstance(error, PinMismatchError):
        return Problem(f"{peer.name}'s certificate does not match the pinned fingerprint: {error}",
                       f"if {peer.name} got a new certificate, update {entry}.fingerprint; otherwise something "
                       "else answers at its address")
    if isinstance(error, RevokedError):
        return Problem(f"{peer.name}'s certificate is revoked here: {error}",
                       f"issue {peer.name} a new certificate (quicmesh-pki sign {peer.name}), or remove it from "
                       "the CRL / tls.denylist if the revocation was a mistake")
    if isinstance(error, ChainError):
        issuer = leaf.issuer.rfc4514_string() or "(empty issuer)"
        return Problem(f"{where} presented a certificate that this mesh's CA ({config.tls.ca}) did not issue: "
                       f"{label}, issued by '{issuer}'",
                       f"issue {peer.name}'s certificate from this mesh's CA (quicmesh-pki sign {peer.name}), or, "
                       f"if {peer.name} is right, give this node the mesh's ca.crt")
    return Problem(f"{peer.name}'s certificate is refused: {error}",
                   f"issue {peer.name} a node certificate for quicmesh://{config.node.mesh}/{peer.name} from "
                   "this mesh's CA")
