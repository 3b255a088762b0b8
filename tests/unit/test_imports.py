"""Client commands stay cheap: `import quicmesh.cli`, `--help` and `--version` load neither aioquic nor
cryptography (a health check runs `quicmesh status` every few seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("aioquic", "cryptography")
REPORT_HEAVY = f"import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"


def heavy_modules_after(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code + "\n" + REPORT_HEAVY], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_import_cli_loads_no_aioquic_nor_cryptography() -> None:
    assert heavy_modules_after("import quicmesh.cli") == "[]"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["status", "--help"], ["send", "--help"],
                                  ["status", "--json", "--socket", "/nonexistent/quicmesh.sock"]])
def test_client_commands_load_no_aioquic_nor_cryptography(argv: list[str]) -> None:
    code = ("import sys, contextlib, io\nfrom quicmesh.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main({argv!r})")
    assert heavy_modules_after(code) == "[]"


def test_python_m_quicmesh_version_imports_nothing_heavy() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "quicmesh", "--version"],
                            capture_output=True, text=True, timeout=60, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY)


def test_public_names_still_load_on_demand() -> None:
    code = "import quicmesh\nfrom quicmesh import Node, load_config\nassert quicmesh.Node is Node"
    assert heavy_modules_after(code) == "['aioquic', 'cryptography']"
