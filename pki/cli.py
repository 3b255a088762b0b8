"""quicmesh-pki: the command-line shell over pki.authority, pki.bootstrap and pki.report.

Exit codes: 0 done; 1 `verify` refused the certificate; 2 an operator mistake, reported as ONE line
"quicmesh-pki: error: ..." on stderr (never a traceback).

Import-light on purpose: `--help`, `--version` and usage errors load neither cryptography nor the quicmesh
package (whose __init__ loads aioquic); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pki.defaults import (
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_INTERMEDIATE_DAYS,
    DEFAULT_KEY_TYPE,
    DEFAULT_NODE_DAYS,
    KEY_TYPES,
)

if TYPE_CHECKING:
    from cryptography import x509

    from pki.authority import CrlUpdate, Issued

PROG = "quicmesh-pki"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported in one line like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def quicmesh_version() -> str:
    """The quicmesh version, without importing the quicmesh package (its __init__ loads aioquic and cryptography):
    ``__version__`` as quicmesh/__init__.py sets it, else the installed distribution's metadata."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("quicmesh")
        if spec is not None and spec.origin:
            source = Path(spec.origin).read_text(encoding="utf-8")
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", source, re.MULTILINE)
            if found:
                return found.group(1)
    except (OSError, ImportError, ValueError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quicmesh")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(f"{PROG} {quicmesh_version()}")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `quicmesh-pki print x.crt | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from quicmesh.errors import QuicmeshError

        if not isinstance(exc, (QuicmeshError, OSError)):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


# --- commands -----------------------------------------------------------------------------------
def _run_ca(args: argparse.Namespace) -> int:
    from pki import PkiError
    from pki.authority import CertificateAuthority, create_intermediate_ca, create_root_ca

    passphrase = _passphrase(args.passphrase_file, args.passphrase_env)
    if args.intermediate:
        if args.issuer_dir is None:
            raise PkiError("--intermediate needs --issuer-dir, the directory of the CA that signs it")
        issuer_passphrase = _passphrase(args.issuer_passphrase_file, args.issuer_passphrase_env)
        issuer = CertificateAuthority.open(args.issuer_dir, issuer_passphrase)
        if args.mesh not in (None, issuer.mesh):
            raise PkiError(f"the issuer in {args.issuer_dir} is the CA of mesh {issuer.mesh!r}, not {args.mesh!r}")
        days = DEFAULT_INTERMEDIATE_DAYS if args.days is None else args.days
        issued = create_intermediate_ca(args.out, issuer, key_type=args.key_type, days=days,
                                        passphrase=passphrase, force=args.force)
    else:
        if args.issuer_dir is not None:
            raise PkiError("--issuer-dir is only for --intermediate")
        if args.mesh is None:
            raise PkiError("a root CA needs --mesh MESH")
        days = DEFAULT_CA_DAYS if args.days is None else args.days
        issued = create_root_ca(args.out, args.mesh, key_type=args.key_type, days=days,
                                passphrase=passphrase, force=args.force)
    _report_issued(issued)
    return 0


def _run_sign(args: argparse.Namespace) -> int:
    from pki import PkiError
    from pki.authority import CertificateAuthority, issue_node_cert
    from pki.csr import issue_from_csr

    if args.csr is not None:
        if args.key_type is not None:
            raise PkiError("--key-type does not apply to --csr: the key is the one the CSR holds")
    elif args.node is None:
        raise PkiError("sign needs the node name, or --csr FILE (a request made with `quicmesh-pki csr`)")
    ca = CertificateAuthority.open(args.ca_dir, _passphrase(args.passphrase_file, args.passphrase_env))
    if args.csr is not None:
        _report_issued(issue_from_csr(ca, args.csr, args.out, node=args.node, dns=args.dns, ips=args.ip,
                                      days=args.days, force=args.force))
    else:
        _report_issued(issue_node_cert(ca, args.node, args.out, dns=args.dns, ips=args.ip, days=args.days,
                                       key_type=args.key_type or DEFAULT_KEY_TYPE, force=args.force))
    return 0


def _run_renew(args: argparse.Namespace) -> int:
    from pki.authority import CertificateAuthority
    from pki.csr import renew_node_cert

    ca = CertificateAuthority.open(args.ca_dir, _passphrase(args.passphrase_file, args.passphrase_env))
    out = args.out if args.out is not None else _bootstrap_node_dir(args.ca_dir, args.node)
    _report_issued(renew_node_cert(ca, args.node, out, new_key=args.new_key, key_type=args.key_type,
                                   days=args.days, force=args.force))
    return 0


def _bootstrap_node_dir(ca_dir: Path, node: str) -> Path:
    """Where `renew` writes without --out: NODE's directory, if ``ca_dir`` is the CA of a bootstrap directory."""
    from pki import PkiError
    from pki.layout import BOOTSTRAP_CA, read_manifest

    out_dir = ca_dir.parent
    manifest = read_manifest(out_dir)
    if manifest is None or ca_dir.resolve() != (out_dir / BOOTSTRAP_CA).resolve() or node not in manifest.nodes:
        raise PkiError(f"say where node {node}'s files are with --out DIR (only a bootstrap directory's nodes "
                       "are found without it)")
    return out_dir / node


def _run_csr(args: argparse.Namespace) -> int:
    from pki.csr import create_csr

    made = create_csr(args.out, args.mesh, args.node, dns=args.dns, ips=args.ip,
                      key_type=args.key_type, key_file=args.key, force=args.force)
    if made.key_path is not None:
        print(f"wrote {made.key_path} (0600) and {made.csr_path}")
    else:
        print(f"wrote {made.csr_path} (for the key in {args.key})")
    print(f"  request for {made.identity}")
    print(f"send {made.csr_path} to the CA host and sign it there: {PROG} sign --csr node.csr --ca-dir CA "
          f"--out DIR; the key stays here")
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    from pki.authority import CertificateAuthority, revoke

    ca = CertificateAuthority.open(args.ca_dir, _passphrase(args.passphrase_file, args.passphrase_env))
    _report_crl(revoke(ca, args.target, args.cert, days=args.crl_days))
    return 0


def _run_crl(args: argparse.Namespace) -> int:
    from pki.authority import CertificateAuthority, update_crl

    ca = CertificateAuthority.open(args.ca_dir, _passphrase(args.passphrase_file, args.passphrase_env))
    _report_crl(update_crl(ca, days=args.crl_days))
    return 0


def _run_print(args: argparse.Namespace) -> int:
    from pki.report import describe_file, format_text

    items = describe_file(args.file)
    print(json.dumps(items, indent=2) if args.json else format_text(items))
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from quicmesh.errors import IdentityError
    from quicmesh.protocol.identity import fingerprint, load_certificates

    from pki.report import trust_policy_for

    policy = trust_policy_for(args.ca, args.crl, args.mesh)
    chain = load_certificates(args.cert)
    try:
        identity = policy.verify(chain, expect_node=args.node)
    except IdentityError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"OK: {identity.uri} ({fingerprint(chain[0])})")
    return 0


def _run_bootstrap(args: argparse.Namespace) -> int:
    from pki.bootstrap import bootstrap, parse_node_spec
    from pki.layout import BOOTSTRAP_CA, MANIFEST, NODE_CONFIG

    specs = [parse_node_spec(text) for text in args.nodes]
    result = bootstrap(args.out, args.mesh, specs, key_type=args.key_type, days=args.days, ca_days=args.ca_days,
                       passphrase=_passphrase(args.passphrase_file, args.passphrase_env))
    _warn(result.notes)
    out = result.out_dir
    print(f"{'created' if result.ca_created else 'kept'} the CA of mesh {args.mesh} in {out / BOOTSTRAP_CA}")
    for name in result.created:
        print(f"created node {name} in {out / name} (new key and certificate)")
    for name in result.kept:
        print(f"kept node {name} in {out / name} (existing key and certificate unchanged)")
    for name in result.configs_staged:
        print(f"kept {out / name / NODE_CONFIG} as it is (it differs from the generated one); wrote "
              f"{out / name / (NODE_CONFIG + '.new')} beside it: merge the changes by hand")
    nodes = result.created + result.kept
    if len(result.configs_written) == len(nodes):
        print(f"wrote {NODE_CONFIG} for every node, and {out / MANIFEST}")
    elif result.configs_written:
        print(f"wrote {NODE_CONFIG} for {', '.join(result.configs_written)}, and {out / MANIFEST}")
    else:
        print(f"wrote {out / MANIFEST}")
    print(f"start a node with: quicmesh run -c {out / nodes[0] / NODE_CONFIG}")
    return 0


def _run_join_bundle(args: argparse.Namespace) -> int:
    from quicmesh.protocol.identity import certificate_label, fingerprint

    from pki.authority import CertificateAuthority
    from pki.join import join_bundle
    from pki.layout import NODE_CONFIG

    ca = CertificateAuthority.open(args.ca_dir, _passphrase(args.passphrase_file, args.passphrase_env))
    made = join_bundle(ca, args.node, args.out, seeds=args.seed, listen=args.listen, advertise=args.advertise,
                       trust_bundle=args.ca, dns=args.dns, ips=args.ip, days=args.days,
                       key_type=args.key_type)
    _warn(made.issued.notes)
    print(f"wrote {made.out_dir}: {', '.join(path.name for path in made.files)} (node.key 0600)")
    print(f"  {certificate_label(made.issued.cert)}, fingerprint {fingerprint(made.issued.cert)}")
    print(f"copy {made.out_dir} to the new host and start it with: quicmesh run -c {made.out_dir / NODE_CONFIG} "
          f"(it joins through {', '.join(args.seed)})")
    return 0


# --- output helpers -----------------------------------------------------------------------------
def _report_issued(issued: Issued) -> None:
    from quicmesh.protocol.dates import format_utc
    from quicmesh.protocol.identity import certificate_label, fingerprint

    _warn(issued.notes)
    if issued.staged:
        written = " and ".join(f"{new}{' (0600)' if new == issued.key_path else ''}" for new, _ in issued.staged)
        print(f"wrote {written} beside the files in use (unchanged)")
    elif issued.key_path is None:
        print(f"wrote {issued.cert_path}")
    else:
        print(f"wrote {issued.key_path} (0600) and {issued.cert_path}")
    print(f"  {certificate_label(issued.cert)}")
    print(f"  fingerprint {fingerprint(issued.cert)}, valid until {format_utc(issued.cert.not_valid_after_utc)}")
    if issued.staged:
        moves = " && ".join(f"mv {new} {in_use}" for new, in_use in issued.staged)
        print(f"to use it: {moves}, then SIGHUP the node (or renew with --force to replace the files in place)")


def _report_crl(update: CrlUpdate) -> None:
    from quicmesh.protocol.dates import format_utc

    for verb, certs in (("revoked", update.revoked), ("already revoked", update.already_revoked)):
        for cert in certs:
            print(f"{verb}: {_cert_line(cert)}")
    next_update = update.crl.next_update_utc
    print(f"wrote {update.path}: {len(update.crl)} revoked, next update due "
          f"{format_utc(next_update) if next_update else 'never'}")
    for path in update.refreshed:
        print(f"refreshed {path}")
    print("send SIGHUP to the nodes (or restart them) so they reload the CRL")


def _cert_line(cert: x509.Certificate) -> str:
    from quicmesh.protocol.identity import certificate_label, fingerprint

    return f"{certificate_label(cert)} (serial {cert.serial_number:x}, {fingerprint(cert)})"


def _warn(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split())


def _passphrase(file: Path | None, env: str | None) -> bytes | None:
    """The passphrase from --passphrase-file (first line) or --passphrase-env, or None if neither is given."""
    from pki import PkiError

    if file is not None:
        lines = file.read_bytes().splitlines()
        passphrase = lines[0] if lines else b""
    elif env is not None:
        if env not in os.environ:
            raise PkiError(f"environment variable {env} (from --passphrase-env) is not set")
        passphrase = os.environ[env].encode()
    else:
        return None
    if not passphrase:
        raise PkiError("the passphrase is empty")
    return passphrase


# --- the parser ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The PKI of a quicmesh mesh: CA, node certificates, CSRs, renewal, "
                                            "revocation, bootstrap, join bundles. Details: docs/PKI.md.")
    parser.add_argument("--version", action=_VersionAction, help="print the quicmesh version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    key_types = f"{', '.join(KEY_TYPES)} (default {DEFAULT_KEY_TYPE})"

    ca = commands.add_parser("ca", help="create a root CA, or an intermediate CA signed by an existing CA")
    ca.add_argument("--mesh", help="the mesh this CA serves (required for a root; an intermediate inherits it)")
    ca.add_argument("--out", type=Path, required=True, help="the CA directory to create")
    ca.add_argument("--intermediate", action="store_true", help="create an intermediate CA (needs --issuer-dir)")
    ca.add_argument("--issuer-dir", type=Path, help="the directory of the CA that signs the intermediate")
    ca.add_argument("--key-type", default=DEFAULT_KEY_TYPE, help=f"CA key type: {key_types}")
    ca.add_argument("--days", type=int, help=f"validity (default {DEFAULT_CA_DAYS} for a root, "
                    f"{DEFAULT_INTERMEDIATE_DAYS} for an intermediate, which never outlives its issuer)")
    _passphrase_options(ca, "passphrase", "encrypt the new CA key with the passphrase")
    _passphrase_options(ca, "issuer-passphrase", "unlock the issuer's key with the passphrase")
    ca.add_argument("--force", action="store_true", help="replace an existing CA key and certificate")
    ca.set_defaults(run=_run_ca)

    sign = commands.add_parser("sign", help="issue a node key and certificate, or a certificate for a node's CSR")
    sign.add_argument("node", nargs="?", help="the node name (a DNS label); with --csr, optional: taken from the "
                                               "CSR, and must match it if given")
    sign.add_argument("--ca-dir", type=Path, required=True, help="the directory of the issuing CA")
    sign.add_argument("--out", type=Path, required=True,
                      help="where to write node.key and node.crt (with --csr: node.crt only)")
    sign.add_argument("--csr", type=Path, metavar="FILE",
                      help="sign this certificate signing request (from `quicmesh-pki csr`): the key stays on the "
                           "node; the CA's policy applies, not the extensions the CSR asks for")
    sign.add_argument("--dns", action="append", default=[], metavar="NAME", help="add a DNS SAN (repeatable)")
    sign.add_argument("--ip", action="append", default=[], metavar="ADDR", help="add an IP SAN (repeatable)")
    sign.add_argument("--days", type=int, default=DEFAULT_NODE_DAYS,
                      help=f"validity (default {DEFAULT_NODE_DAYS}; clipped to the CA's expiry)")
    sign.add_argument("--key-type", help=f"node key type: {key_types}; not with --csr")
    _passphrase_options(sign, "passphrase", "unlock the CA key with the passphrase")
    sign.add_argument("--force", action="store_true", help="replace an existing node.key and node.crt")
    sign.set_defaults(run=_run_sign)

    renew = commands.add_parser("renew", help="a new certificate for an issued node: same names, same key "
                                              "(or --new-key)")
    renew.add_argument("node", help="the node name")
    renew.add_argument("--ca-dir", type=Path, required=True, help="the directory of the issuing CA")
    renew.add_argument("--out", type=Path,
                       help="the node's directory: its node.crt is the one renewed (else the newest recorded as "
                            "issued); default: NODE's directory when --ca-dir is a bootstrap directory's ca/")
    renew.add_argument("--new-key", action="store_true", help="make a new key too (default: keep the key)")
    renew.add_argument("--key-type", help=f"type of the new key: {', '.join(KEY_TYPES)} "
                                          "(default: the current key's type); needs --new-key")
    renew.add_argument("--days", type=int, default=DEFAULT_NODE_DAYS,
                       help=f"validity (default {DEFAULT_NODE_DAYS}; clipped to the CA's expiry)")
    _passphrase_options(renew, "passphrase", "unlock the CA key with the passphrase")
    renew.add_argument("--force", action="store_true",
                       help="replace node.crt (and node.key) in place; without it, node.crt.new (and node.key.new) "
                            "are written beside them")
    renew.set_defaults(run=_run_renew)

    csr = commands.add_parser("csr", help="on a node: make its key and a certificate signing request for the CA")
    csr.add_argument("--mesh", required=True, help="the mesh the node belongs to")
    csr.add_argument("--node", required=True, help="the node name (a DNS label)")
    csr.add_argument("--out", type=Path, required=True, help="where to write node.key (0600) and node.csr")
    csr.add_argument("--dns", action="append", default=[], metavar="NAME", help="ask for a DNS SAN (repeatable)")
    csr.add_argument("--ip", action="append", default=[], metavar="ADDR", help="ask for an IP SAN (repeatable)")
    csr.add_argument("--key-type", default=DEFAULT_KEY_TYPE, help=f"node key type: {key_types}")
    csr.add_argument("--key", type=Path, metavar="FILE",
                     help="make the request for this existing key instead of a new one (it is not copied)")
    csr.add_argument("--force", action="store_true", help="replace an existing node.key and node.csr")
    csr.set_defaults(run=_run_csr)

    revoke_ = commands.add_parser("revoke", help="revoke a node's certificates (or one by fingerprint)")
    revoke_.add_argument("target", nargs="?", metavar="NODE|FINGERPRINT",
                         help="a node name (all its certificates) or a sha256 fingerprint")
    revoke_.add_argument("--ca-dir", type=Path, required=True, help="the directory of the issuing CA")
    revoke_.add_argument("--cert", type=Path, metavar="FILE", help="the certificate to revoke, if not recorded")
    revoke_.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS,
                         help=f"days until the CRL's next update (default {DEFAULT_CRL_DAYS})")
    _passphrase_options(revoke_, "passphrase", "unlock the CA key with the passphrase")
    revoke_.set_defaults(run=_run_revoke)

    crl = commands.add_parser("crl", help="re-sign the CRL with a new next-update date (nothing revoked)")
    crl.add_argument("--ca-dir", type=Path, required=True, help="the directory of the CA")
    crl.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS,
                     help=f"days until the CRL's next update (default {DEFAULT_CRL_DAYS})")
    _passphrase_options(crl, "passphrase", "unlock the CA key with the passphrase")
    crl.set_defaults(run=_run_crl)

    print_ = commands.add_parser("print", help="show a certificate, chain, CA certificate or CRL")
    print_.add_argument("file", type=Path, help="a PEM file")
    print_.add_argument("--json", action="store_true", help="print JSON instead of text")
    print_.set_defaults(run=_run_print)

    verify = commands.add_parser("verify", help="check a node certificate (chain) as a quicmesh node would")
    verify.add_argument("--ca", type=Path, required=True, help="the mesh CA bundle (PEM)")
    verify.add_argument("--crl", type=Path, help="a CRL file (PEM) signed by a CA of the bundle")
    verify.add_argument("--node", help="require this node name")
    verify.add_argument("--mesh", help="require this mesh (default: the mesh the CA records)")
    verify.add_argument("cert", type=Path, help="the certificate, optionally followed by its intermediates")
    verify.set_defaults(run=_run_verify)

    boot = commands.add_parser("bootstrap", help="create or extend a whole mesh: CA, node dirs, node.toml")
    boot.add_argument("mesh", help="the mesh name (a DNS label)")
    boot.add_argument("nodes", nargs="+", metavar="NODE=HOST:PORT", help="each node and the address peers dial")
    boot.add_argument("--out", type=Path, required=True, help="the bootstrap directory (created or extended)")
    boot.add_argument("--key-type", default=DEFAULT_KEY_TYPE, help=f"key type of new keys: {key_types}")
    boot.add_argument("--days", type=int, default=DEFAULT_NODE_DAYS, help="validity of new node certificates")
    boot.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS, help="validity of a new CA")
    _passphrase_options(boot, "passphrase", "encrypt (or unlock) the CA key with the passphrase")
    boot.set_defaults(run=_run_bootstrap)

    join = commands.add_parser("join-bundle", help="a folder for a new node that joins a running mesh through "
                                                   "seeds (open membership; no other node changes)")
    join.add_argument("node", help="the new node's name (a DNS label)")
    join.add_argument("--ca-dir", type=Path, required=True, help="the directory of the issuing CA")
    join.add_argument("--seed", action="append", required=True, metavar="HOST:PORT",
                      help="a member to dial first (repeatable; DNS names allowed)")
    join.add_argument("--out", type=Path, required=True, help="the folder to write (must not hold its files yet)")
    join.add_argument("--listen", default="0.0.0.0:4433", metavar="HOST:PORT",
                      help="the node's UDP listen address (default 0.0.0.0:4433)")
    join.add_argument("--advertise", action="append", default=[], metavar="HOST:PORT",
                      help="an address members reach it at (repeatable; default: the listen address, or the "
                           "host's addresses when listening on a wildcard)")
    join.add_argument("--ca", type=Path, metavar="FILE",
                      help="for an intermediate --ca-dir: the mesh's trust bundle (the root ca.crt the nodes use)")
    join.add_argument("--dns", action="append", default=[], metavar="NAME", help="add a DNS SAN (repeatable)")
    join.add_argument("--ip", action="append", default=[], metavar="ADDR", help="add an IP SAN (repeatable)")
    join.add_argument("--days", type=int, default=DEFAULT_NODE_DAYS,
                      help=f"validity (default {DEFAULT_NODE_DAYS}; clipped to the CA's expiry)")
    join.add_argument("--key-type", default=DEFAULT_KEY_TYPE, help=f"node key type: {key_types}")
    _passphrase_options(join, "passphrase", "unlock the CA key with the passphrase")
    join.set_defaults(run=_run_join_bundle)
    return parser


def _passphrase_options(parser: argparse.ArgumentParser, stem: str, purpose: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{stem}-file", type=Path, metavar="FILE", help=f"{purpose} in FILE (its first line)")
    group.add_argument(f"--{stem}-env", metavar="VAR", help=f"{purpose} in environment variable VAR")


if __name__ == "__main__":
    sys.exit(main())
