"""`quicmesh members` and `quicmesh crl push` on the client side: the table, the CRL file reader, and that
neither loads aioquic or cryptography."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from pki.authority import CertificateAuthority, create_root_ca, current_crl
from quicmesh.membership.cli import MAX_CRL_SIZE, read_crls, render_members

NOW = 1_800_000_000.0
DOCUMENT = {
    "node": "alpha",
    "open": True,
    "mode": "full",
    "members": [
        {"name": "gamma", "addresses": ["10.0.0.3:4433"], "version": 1_799_999_000_000_000, "source": "beta",
         "last_heard": NOW - 600, "connected": False, "state": "gone", "gone_reason": "silent for 120s"},
        {"name": "beta", "addresses": ["10.0.0.2:4433", "[2001:db8::2]:4433"], "version": 1_799_999_990_000_000,
         "source": "beta", "last_heard": NOW - 3.2, "connected": True, "state": "alive", "gone_reason": None},
        {"name": "alpha", "addresses": ["10.0.0.1:4433"], "version": 1_799_999_995_000_000, "source": "self",
         "last_heard": NOW, "connected": False, "state": "alive", "gone_reason": None},
    ],
    "counters": {"accepted": 12, "replayed": 3},
    "crl_number": 4,
    "seeds": ["seed.example.net:4433"],
}


def test_members_table_lists_alive_members_first_with_every_column() -> None:
    lines = render_members(DOCUMENT, now=NOW).splitlines()
    assert lines[0] == "node alpha  members any-certified  mode full  2 alive, 1 gone  crl 4  seeds seed.example.net:4433"
    assert lines[1].split() == ["NAME", "ADDRESSES", "VERSION", "SOURCE", "LAST-HEARD", "CONNECTED", "STATE"]
    assert lines[2].split() == ["alpha", "10.0.0.1:4433", "1799999995000000", "self", "0.0s", "ago", "no", "alive"]
    assert lines[3].split() == ["beta", "10.0.0.2:4433,[2001:db8::2]:4433", "1799999990000000", "beta", "3.2s", "ago",
                                "yes", "alive"]
    assert lines[4].split() == ["gamma", "10.0.0.3:4433", "1799999000000000", "beta", "10m", "ago", "no", "gone",
                                "(silent", "for", "120s)"]
    assert lines[2].index("1799999995000000") == lines[1].index("VERSION")  # columns aligned
    assert lines[-1] == "counters: accepted 12, replayed 3"


def test_members_table_without_members_or_crl() -> None:
    document = {"node": "beta", "open": False, "mode": "on-demand", "members": [], "counters": {}, "crl_number": None,
                "seeds": []}
    assert render_members(document, NOW).splitlines() == [
        "node beta  members configured  mode on-demand  0 alive, 0 gone  crl -  seeds -", "no members known"]


@pytest.fixture(scope="module")
def crl_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    create_root_ca(directory, "prod")
    return directory / "crl.pem"


def der_of(crl_pem: Path) -> bytes:
    crl = current_crl(CertificateAuthority.open(crl_pem.parent, with_key=False))
    assert crl is not None
    return crl.public_bytes(serialization.Encoding.DER)


def test_read_crls_takes_pem_several_pem_and_der(crl_pem: Path, tmp_path: Path) -> None:
    der = der_of(crl_pem)
    assert read_crls(crl_pem) == [der]
    both = tmp_path / "two.pem"
    both.write_bytes(b"some text first\n" + crl_pem.read_bytes() * 2)
    assert read_crls(both) == [der, der]
    raw = tmp_path / "crl.der"
    raw.write_bytes(der)
    assert read_crls(raw) == [der]


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "is not a CRL (neither PEM nor DER)"),
    (b"hello\n", "is not a CRL (neither PEM nor DER)"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "holds no X509 CRL (found CERTIFICATE)"),
    (b"-----BEGIN X509 CRL-----\n!!notbase64\n-----END X509 CRL-----\n", "a PEM CRL block is not valid base64"),
    (b"0" * (MAX_CRL_SIZE + 1), "larger than the 1048576 a member accepts"),
])
def test_read_crls_refuses_what_is_not_a_crl(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_crls(path)


def test_read_crls_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read .*missing: No such file or directory$"):
        read_crls(tmp_path / "missing")


@pytest.mark.parametrize("argv", [["members", "--help"], ["members", "--json", "--socket", "/nonexistent/q.sock"],
                                  ["crl", "push", "/nonexistent/crl.pem", "--socket", "/nonexistent/q.sock"]])
def test_the_commands_load_no_aioquic_nor_cryptography(argv: list[str]) -> None:
    code = ("import sys, contextlib, io\nfrom quicmesh.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), "
            f"contextlib.suppress(SystemExit): main({argv!r})\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'aioquic', 'cryptography'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
