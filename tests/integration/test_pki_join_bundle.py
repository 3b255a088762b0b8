"""`quicmesh-pki join-bundle`: the folder a new node needs to join a running mesh through seeds (issue 16)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pki_helpers import assert_one_line_error, call_pki, mode, run_pki

from quicmesh.config import Address, load_config
from quicmesh.protocol.identity import TrustPolicy, load_certificates

BUNDLE_FILES = {"node.key", "node.crt", "ca.crt", "crl.pem", "node.toml"}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("pki") / "ca"
    made = run_pki("ca", "--mesh", "prod", "--out", ca)
    assert made.returncode == 0, made.stderr
    return ca


def test_the_bundle_is_a_ready_config_whose_cert_the_mesh_accepts(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "delta"
    result = run_pki("join-bundle", "delta", "--ca-dir", ca_dir, "--seed", "127.0.0.1:4433",
                     "--seed", "seed.example.net:4434", "--advertise", "192.0.2.4:4433", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"quicmesh run -c {out / 'node.toml'}" in result.stdout
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    assert mode(out) == 0o700 and mode(out / "node.key") == 0o600

    config = load_config(out / "node.toml")  # with the file checks a node makes at start (key 0600, ...)
    assert (config.node.name, config.node.mesh, str(config.node.listen)) == ("delta", "prod", "0.0.0.0:4433")
    assert config.mesh.open and config.peers == ()
    assert config.mesh.seeds == (Address("127.0.0.1", 4433), Address("seed.example.net", 4434))
    assert config.mesh.advertise == (Address("192.0.2.4", 4433),)
    assert config.tls.crl == out / "crl.pem"
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert (out / "crl.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()

    chain = load_certificates(out / "node.crt")
    for anchors, crl in ((out / "ca.crt", out / "crl.pem"), (ca_dir / "ca.crt", ca_dir / "crl.pem")):
        identity = TrustPolicy.from_files(anchors, "prod", crl).verify(chain, expect_node="delta")
        assert (identity.mesh, identity.node) == ("prod", "delta")
    revoke = run_pki("revoke", "delta", "--ca-dir", ca_dir)  # recorded as issued: revocable by name
    assert revoke.returncode == 0 and "revoked: node certificate quicmesh://prod/delta" in revoke.stdout, revoke.stderr


def test_it_never_replaces_files(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eps"
    assert call_pki("join-bundle", "eps", "--ca-dir", ca_dir, "--seed", "127.0.0.1:1", "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = call_pki("join-bundle", "eps", "--ca-dir", ca_dir, "--seed", "127.0.0.1:2", "--out", out)
    assert_one_line_error(again, 2, f"{out} already holds node.key, node.crt, ca.crt, crl.pem, node.toml",
                          "never replaces")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    other = tmp_path / "zeta"
    other.mkdir()
    (other / "node.toml").write_text("# mine\n")
    refused = call_pki("join-bundle", "zeta", "--ca-dir", ca_dir, "--seed", "127.0.0.1:1", "--out", other)
    assert_one_line_error(refused, 2, "already holds node.toml")
    assert [p.name for p in other.iterdir()] == ["node.toml"] and (other / "node.toml").read_text() == "# mine\n"


@pytest.mark.parametrize(("args", "fragments"), [
    (["--seed", "10.0.0.1"], ['--seed: invalid address "10.0.0.1": no port']),
    (["--seed", "10.0.0.1:1", "--seed", "[::]:4433"], ["--seed: [::]:4433 is a wildcard address"]),
    (["--seed", "10.0.0.1:1", "--seed", "10.0.0.1:1"], ["--seed: duplicate seed address 10.0.0.1:1"]),
    (["--seed", "10.0.0.1:1", "--listen", "everywhere"], ['--listen: invalid address "everywhere"']),
    (["--seed", "10.0.0.1:1", "--advertise", "10.0.0.1:99999"], ["--advertise: invalid address", "out of range"]),
    (["--seed", "10.0.0.1:1", "--key-type", "dsa"], ["dsa"]),
    (["--seed", "10.0.0.1:1", "--ip", "not-an-ip"], ["not-an-ip"]),
    ([], ["the following arguments are required: --seed"]),
])
def test_bad_arguments_are_one_line_and_write_nothing(ca_dir: Path, tmp_path: Path, args: list[str],
                                                      fragments: list[str]) -> None:
    out = tmp_path / "eta"
    result = call_pki("join-bundle", "eta", "--ca-dir", ca_dir, "--out", out, *args)
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


def test_bad_node_name_and_missing_ca_are_one_line(ca_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(call_pki("join-bundle", "Eta", "--ca-dir", ca_dir, "--seed", "a:1", "--out", tmp_path / "x"),
                          2, "invalid node name 'Eta'")
    assert_one_line_error(call_pki("join-bundle", "eta", "--ca-dir", tmp_path / "none", "--seed", "a:1",
                                   "--out", tmp_path / "x"), 2, "no CA in")
    assert_one_line_error(call_pki("join-bundle", "eta", "--ca-dir", ca_dir, "--ca", ca_dir / "ca.crt",
                                   "--seed", "a:1", "--out", tmp_path / "x"), 2, "--ca is only for an intermediate")
    assert not (tmp_path / "x").exists()


def test_an_intermediate_ca_needs_the_mesh_bundle(ca_dir: Path, tmp_path: Path) -> None:
    intermediate = tmp_path / "site-ca"
    assert run_pki("ca", "--intermediate", "--issuer-dir", ca_dir, "--out", intermediate).returncode == 0
    out = tmp_path / "theta"
    assert_one_line_error(call_pki("join-bundle", "theta", "--ca-dir", intermediate, "--seed", "a:1", "--out", out),
                          2, "intermediate CA", "--ca FILE")
    stranger = tmp_path / "other-ca"
    assert run_pki("ca", "--mesh", "prod", "--out", stranger).returncode == 0
    assert_one_line_error(call_pki("join-bundle", "theta", "--ca-dir", intermediate, "--ca", stranger / "ca.crt",
                                   "--seed", "a:1", "--out", out), 2, "not this mesh's trust bundle")
    assert not out.exists()

    made = call_pki("join-bundle", "theta", "--ca-dir", intermediate, "--ca", ca_dir / "ca.crt", "--seed", "a:1",
                    "--out", out)
    assert made.returncode == 0, made.stderr
    config = load_config(out / "node.toml")
    assert tomllib.loads((out / "node.toml").read_text())["mesh"] == {"members": "any-certified", "seeds": ["a:1"]}
    chain = load_certificates(out / "node.crt")
    # Nodes that trust only the root accept it; its own bundle also holds the intermediate (whose CRL it loads).
    TrustPolicy.from_files(ca_dir / "ca.crt", "prod").verify(chain, expect_node="theta")
    TrustPolicy.from_files(config.tls.ca, "prod", config.tls.crl).verify(chain, expect_node="theta")
    assert len(load_certificates(out / "ca.crt")) == 2
