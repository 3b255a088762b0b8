"""A bounded coverage-guided fuzz run (atheris) of every wire decoder: any bytes raise only ProtocolError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parents[1] / "fuzz" / "wire_atheris.py"


def test_atheris_finds_no_exception_but_protocol_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=150000", "-max_total_time=8", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=120,
    )
    done = [line for line in run.stderr.splitlines() if line.startswith("Done ")]
    print(done[-1] if done else run.stderr[-2000:])
    assert run.returncode == 0, run.stderr[-4000:]
    assert done, run.stderr[-2000:]
