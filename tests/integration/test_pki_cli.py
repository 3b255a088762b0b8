"""The real `quicmesh-pki` entry point, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
from cryptography import x509
from pki_helpers import REPO, assert_one_line_error, call_pki, mode, run_pki

from quicmesh.protocol.identity import TrustPolicy, load_certificates


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("boot") / "mesh"
    result = run_pki("bootstrap", "prod", "alpha=127.0.0.1:4433", "beta=beta.example:4434", "gamma=[::1]:4435",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_bootstrap_layout_and_modes(mesh_dir):
    assert mode(mesh_dir) == 0o700 and mode(mesh_dir / "ca") == 0o700
    assert mode(mesh_dir / "ca" / "ca.key") == 0o600
    assert {p.name for p in (mesh_dir / "ca").iterdir()} == {"ca.key", "ca.crt", "crl.pem", "issued"}
    for node in ("alpha", "beta", "gamma"):
        node_dir = mesh_dir / node
        assert mode(node_dir) == 0o700 and mode(node_dir / "node.key") == 0o600
        assert {p.name for p in node_dir.iterdir()} == {"node.key", "node.crt", "ca.crt", "crl.pem", "node.toml"}
        policy = TrustPolicy.from_files(node_dir / "ca.crt", "prod", node_dir / "crl.pem")
        assert policy.verify(load_certificates(node_dir / "node.crt"), expect_node=node).node == node


def test_bootstrap_node_toml_follows_config_md(mesh_dir):
    config = tomllib.loads((mesh_dir / "alpha" / "node.toml").read_text())
    assert config["node"] == {"name": "alpha", "mesh": "prod", "listen": "0.0.0.0:4433"}
    assert config["tls"] == {"ca": "ca.crt", "cert": "node.crt", "key": "node.key", "crl": "crl.pem"}
    assert config["peers"] == [{"name": "beta", "address": "beta.example:4434"},
                               {"name": "gamma", "address": "[::1]:4435"}]
    assert set(config) == {"node", "tls", "peers"}
    assert tomllib.loads((mesh_dir / "gamma" / "node.toml").read_text())["node"]["listen"] == "[::]:4435"
    assert "GENERATED" in (mesh_dir / "alpha" / "node.toml").read_text().splitlines()[0]


def test_bootstrap_puts_the_host_in_the_cert(mesh_dir):
    ip_cert = load_certificates(mesh_dir / "alpha" / "node.crt")[0]
    dns_cert = load_certificates(mesh_dir / "beta" / "node.crt")[0]
    assert [str(a) for a in ip_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert dns_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["beta.example"]


def test_bootstrap_mesh_json(mesh_dir):
    manifest = json.loads((mesh_dir / "mesh.json").read_text())
    assert manifest["mesh"] == "prod" and manifest["ca"] == "ca/ca.crt"
    assert [(n["name"], n["address"], n["config"]) for n in manifest["nodes"]] == [
        ("alpha", "127.0.0.1:4433", "alpha/node.toml"), ("beta", "beta.example:4434", "beta/node.toml"),
        ("gamma", "[::1]:4435", "gamma/node.toml")]


def test_bootstrap_again_adds_a_node_and_keeps_every_key(tmp_path):
    out = tmp_path / "mesh"
    assert run_pki("bootstrap", "prod", "a=127.0.0.1:5001", "b=127.0.0.1:5002", "--out", out).returncode == 0
    kept = {p: p.read_bytes() for p in out.glob("*/*") if p.name in ("node.key", "node.crt", "ca.key", "ca.crt")}
    result = run_pki("bootstrap", "prod", "c=127.0.0.1:5003", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "created node c" in result.stdout and "kept node a" in result.stdout
    assert all(path.read_bytes() == data for path, data in kept.items())
    # an existing node.toml is never rewritten: the one listing c goes beside it, as node.toml.new
    assert f"wrote {out / 'a' / 'node.toml.new'} beside it" in result.stdout
    assert "wrote node.toml for c, and" in result.stdout
    configs = {"a": out / "a" / "node.toml.new", "b": out / "b" / "node.toml.new", "c": out / "c" / "node.toml"}
    peers = {node: [p["name"] for p in tomllib.loads(path.read_text())["peers"]] for node, path in configs.items()}
    assert peers == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    assert [p["name"] for p in tomllib.loads((out / "a" / "node.toml").read_text())["peers"]] == ["b"]
    assert [n["name"] for n in json.loads((out / "mesh.json").read_text())["nodes"]] == ["a", "b", "c"]
    moved = call_pki("bootstrap", "prod", "a=10.9.9.9:5001", "--out", out)
    assert_one_line_error(moved, 2, "node a exists with host 127.0.0.1")
    other_mesh = call_pki("bootstrap", "staging", "d=127.0.0.1:5004", "--out", out)
    assert_one_line_error(other_mesh, 2, "holds mesh 'prod', not 'staging'")


def test_revoke_refreshes_every_node_copy_of_the_crl(tmp_path):
    out = tmp_path / "mesh"
    assert run_pki("bootstrap", "prod", "a=127.0.0.1:5001", "b=127.0.0.1:5002", "--out", out).returncode == 0
    result = run_pki("revoke", "a", "--ca-dir", out / "ca")
    assert result.returncode == 0, result.stderr
    assert "SIGHUP" in result.stdout
    assert (out / "a" / "crl.pem").read_bytes() == (out / "b" / "crl.pem").read_bytes() == \
        (out / "ca" / "crl.pem").read_bytes()
    refused = call_pki("verify", "--ca", out / "b" / "ca.crt", "--crl", out / "b" / "crl.pem", out / "a" / "node.crt")
    assert_one_line_error(refused, 1, "quicmesh://prod/a", "was revoked on")
    assert call_pki("verify", "--ca", out / "b" / "ca.crt", "--crl", out / "b" / "crl.pem",
                   out / "b" / "node.crt").returncode == 0
    assert "1 revoked" in call_pki("crl", "--ca-dir", out / "ca").stdout


def test_ca_sign_verify_print(tmp_path):
    ca, node = tmp_path / "ca", tmp_path / "n1"
    (tmp_path / "pass").write_text("correct horse\n")
    result = run_pki("ca", "--mesh", "lab", "--out", ca, "--key-type", "ed25519", "--passphrase-file",
                     tmp_path / "pass")
    assert result.returncode == 0, result.stderr
    assert mode(ca / "ca.key") == 0o600 and b"ENCRYPTED" in (ca / "ca.key").read_bytes()
    result = run_pki("sign", "n1", "--ca-dir", ca, "--out", node, "--dns", "n1.lab", "--ip", "10.0.0.7",
                     "--passphrase-env", "PKI_PASS", env={"PKI_PASS": "correct horse"})
    assert result.returncode == 0, result.stderr
    verified = run_pki("verify", "--ca", ca / "ca.crt", "--node", "n1", node / "node.crt")
    assert verified.returncode == 0 and verified.stdout.startswith("OK: quicmesh://lab/n1 (sha256:")
    assert_one_line_error(call_pki("verify", "--ca", ca / "ca.crt", "--node", "n2", node / "node.crt"), 1,
                          "expected node 'n2'")
    assert_one_line_error(call_pki("verify", "--ca", ca / "ca.crt", "--mesh", "prod", node / "node.crt"), 1,
                          "this mesh is 'prod'")
    text = call_pki("print", node / "node.crt").stdout
    for fragment in ("node certificate quicmesh://lab/n1", "mesh:", "fingerprint: sha256:", "DNS:n1.lab",
                     "IP:10.0.0.7", "issuer:", "serial:", "not before:", "days left"):
        assert fragment in text
    assert "(root)" in call_pki("print", ca / "ca.crt").stdout
    assert "CRL of" in call_pki("print", ca / "crl.pem").stdout


def test_print_json_and_expiry_warning(tmp_path):
    ca, node = tmp_path / "ca", tmp_path / "n"
    assert call_pki("ca", "--mesh", "lab", "--out", ca, "--days", "10").returncode == 0
    signed = call_pki("sign", "n", "--ca-dir", ca, "--out", node)
    assert signed.returncode == 0 and "clipped to the issuing CA's expiry" in signed.stderr
    (tmp_path / "all.pem").write_bytes((node / "node.crt").read_bytes() + (ca / "ca.crt").read_bytes()
                                       + (ca / "crl.pem").read_bytes())
    items = json.loads(call_pki("print", tmp_path / "all.pem", "--json").stdout)
    assert [item["kind"] for item in items] == ["node", "ca", "crl"]
    assert items[0]["identity"] == "quicmesh://lab/n" and items[0]["days_left"] < 11
    assert "expires in" in items[0]["warnings"][0]
    assert "WARNING: expires in" in call_pki("print", node / "node.crt").stdout


def test_intermediate_ca_via_cli(tmp_path):
    root, inter, node = tmp_path / "root", tmp_path / "inter", tmp_path / "n"
    assert call_pki("ca", "--mesh", "lab", "--out", root).returncode == 0
    result = call_pki("ca", "--intermediate", "--issuer-dir", root, "--out", inter)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # default validity fits the root's
    assert call_pki("sign", "n", "--ca-dir", inter, "--out", node).returncode == 0
    assert len(load_certificates(node / "node.crt")) == 2
    assert call_pki("verify", "--ca", root / "ca.crt", node / "node.crt").stdout.startswith("OK: quicmesh://lab/n")


def test_refuses_to_overwrite(tmp_path):
    ca = tmp_path / "ca"
    assert run_pki("ca", "--mesh", "lab", "--out", ca).returncode == 0
    key = (ca / "ca.key").read_bytes()
    assert_one_line_error(run_pki("ca", "--mesh", "lab", "--out", ca), 2, "ca.key exists; use --force to replace")
    assert (ca / "ca.key").read_bytes() == key
    assert call_pki("sign", "n", "--ca-dir", ca, "--out", tmp_path / "n").returncode == 0
    assert_one_line_error(call_pki("sign", "n", "--ca-dir", ca, "--out", tmp_path / "n"), 2, "exists; use --force")
    assert call_pki("sign", "n", "--ca-dir", ca, "--out", tmp_path / "n", "--force").returncode == 0


@pytest.fixture(scope="module")
def lab_ca(tmp_path_factory):
    ca = tmp_path_factory.mktemp("lab") / "ca"
    assert run_pki("ca", "--mesh", "lab", "--out", ca).returncode == 0
    return ca


@pytest.mark.parametrize("args, fragment", [
    (["sign", "ghost", "--ca-dir", "{tmp}/nowhere", "--out", "{tmp}/x"], "no CA in"),
    (["sign", "Bad_Name", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "invalid node name"),
    (["sign", "n", "--ca-dir", "{ca}", "--out", "{tmp}/x", "--key-type", "p521"], "aioquic cannot sign"),
    (["sign", "n", "--ca-dir", "{ca}", "--out", "{tmp}/x", "--key-type", "rsa"], "unknown key type"),
    (["sign", "n", "--ca-dir", "{ca}", "--out", "{tmp}/x", "--passphrase-env", "UNSET_VAR_X"], "is not set"),
    (["sign", "n", "--ca-dir", "{ca}", "--out", "{tmp}/x", "--days", "soon"], "invalid int value"),
    (["revoke", "ghost", "--ca-dir", "{ca}"], "no certificate issued to node 'ghost'"),
    (["print", "{tmp}/absent.pem"], "No such file or directory"),
    (["print", "{ca}/ca.key"], "no PEM certificate or CRL"),
    (["verify", "--ca", "{ca}/ca.key", "{ca}/ca.crt"], "no PEM certificate found"),
    (["ca", "--out", "{tmp}/c"], "a root CA needs --mesh"),
    (["ca", "--mesh", "lab", "--out", "{tmp}/c", "--intermediate"], "needs --issuer-dir"),
    (["bootstrap", "prod", "alpha", "--out", "{tmp}/m"], "expected NODE=HOST:PORT"),
    (["bootstrap", "prod", "a=1.2.3.4", "--out", "{tmp}/m"], "expected HOST:PORT"),
    (["bootstrap", "prod", "a=1.2.3.4:99999", "--out", "{tmp}/m"], "bad port"),
    (["bootstrap", "prod", "a=::1:80", "--out", "{tmp}/m"], "in brackets"),
    (["bootstrap", "prod", "a=h:1", "a=h:2", "--out", "{tmp}/m"], "named twice"),
    (["bootstrap", "prod", "a=h:1", "b=h:1", "--out", "{tmp}/m"], "both use h:1"),
    (["bootstrap", "prod", "ca=h:1", "--out", "{tmp}/m"], "reserved"),
    (["bootstrap", "Prod", "a=h:1", "--out", "{tmp}/m"], "invalid mesh name"),
    (["bootstrap", "prod", "a=h:1", "--out", "{tmp}/m", "--key-type", "p521"], "aioquic cannot sign"),
    (["frobnicate"], "invalid choice"),
])
def test_operator_mistakes_are_one_line_errors(tmp_path, lab_ca, args, fragment):
    result = call_pki(*(arg.format(tmp=tmp_path, ca=lab_ca) for arg in args))
    assert_one_line_error(result, 2, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["sign", "ghost", "--ca-dir", "{tmp}/nowhere", "--out", "{tmp}/x"], "no CA in"),
    (["bootstrap", "prod", "a=1.2.3.4", "--out", "{tmp}/m", "--key-type", "p521"], "expected HOST:PORT"),
    (["print", "{tmp}"], "Is a directory"),
    (["frobnicate"], "invalid choice"),
])
def test_operator_mistakes_in_a_real_process(tmp_path, args, fragment):
    """The same contract end to end: the process writes one line and no traceback, and exits 2."""
    assert_one_line_error(run_pki(*(arg.format(tmp=tmp_path) for arg in args)), 2, fragment)


def test_wrong_passphrase_is_one_line(tmp_path):
    (tmp_path / "pass").write_text("right\n")
    (tmp_path / "wrong").write_text("wrong\n")
    assert call_pki("ca", "--mesh", "lab", "--out", tmp_path / "ca", "--passphrase-file", tmp_path / "pass"
                   ).returncode == 0
    result = call_pki("sign", "n", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "n", "--passphrase-file",
                     tmp_path / "wrong")
    assert_one_line_error(result, 2, "wrong passphrase")
    result = call_pki("sign", "n", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "n")
    assert_one_line_error(result, 2, "encrypted and no passphrase")


def test_bootstrap_again_keeps_a_hand_edit(tmp_path):
    """Re-running bootstrap never rewrites node.toml: an edited one stays, node.toml.new goes beside it."""
    out = tmp_path / "mesh"
    assert run_pki("bootstrap", "prod", "a=127.0.0.1:5001", "b=127.0.0.1:5002", "--out", out).returncode == 0
    pristine_b = (out / "b" / "node.toml").read_bytes()
    edited = (out / "a" / "node.toml").read_text().replace('listen = "0.0.0.0:5001"', 'listen = "127.0.0.1:5001"')
    edited += "\n[log]\nlevel = \"debug\"  # mine\n"
    (out / "a" / "node.toml").write_text(edited)
    result = run_pki("bootstrap", "prod", "a=127.0.0.1:5001", "b=127.0.0.1:5002", "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert (out / "a" / "node.toml").read_text() == edited
    staged_lines = [line for line in result.stdout.splitlines() if "node.toml.new" in line]
    assert staged_lines == [f"kept {out / 'a' / 'node.toml'} as it is (it differs from the generated one); wrote "
                            f"{out / 'a' / 'node.toml.new'} beside it: merge the changes by hand"]
    generated = tomllib.loads((out / "a" / "node.toml.new").read_text())
    assert generated["node"]["listen"] == "0.0.0.0:5001" and "log" not in generated
    # an untouched node.toml that bootstrap would write the same is left as it is, with no .new
    assert (out / "b" / "node.toml").read_bytes() == pristine_b and not (out / "b" / "node.toml.new").exists()
    assert f"wrote {out / 'mesh.json'}" in result.stdout
    # and the hand edit survives the next run too (adding a node)
    assert run_pki("bootstrap", "prod", "c=127.0.0.1:5003", "--out", out).returncode == 0
    assert (out / "a" / "node.toml").read_text() == edited
    assert [p["name"] for p in tomllib.loads((out / "a" / "node.toml.new").read_text())["peers"]] == ["b", "c"]


def test_version():
    from importlib.metadata import version

    result = run_pki("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"quicmesh-pki {version('quicmesh')}\n"


HEAVY = ("cryptography", "aioquic", "quicmesh")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sign", "--help"], ["renew"], ["frobnicate"]])
def test_help_version_and_usage_errors_load_no_cryptography(args):
    """`--help`, `--version` and usage mistakes stay fast: neither cryptography nor quicmesh (which loads aioquic)."""
    probe = ("import sys\nfrom pki.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
    assert "Traceback" not in result.stderr
