"""What the prompt analyser says about a result (site_src/js/analyser/results.js), under Node's test
runner on hand-made results (tests/js/results.test.mjs): the branches a real model seldom reaches,
such as exports without `n_active`. The browser tests check the same code on real analyses."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_results_js():
    proc = subprocess.run(["node", "--test", str(ROOT / "tests/js/results.test.mjs")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# pass 0" not in proc.stdout
