"""examples/python/decoder_step.py runs (NumPy path) and, with top_k covering the context, its
16-layer CLSA step equals the dense one."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python" / "decoder_step.py"


def test_decoder_step_exact_path():
    args = ["--context", "200", "--steps", "3", "--top-k", "256", "--batch", "3"]
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(exact path)" in done.stdout and done.stdout.count("\nstep ") == 2  # steps 0, 1, 2


def test_decoder_step_sparse_path():
    args = ["--context", "600", "--steps", "2", "--top-k", "64"]
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "context 602" in done.stdout
