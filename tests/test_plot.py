"""scripts/plot_curves.py: validation top-1 (and flip TTA) against wall time from a run's TensorBoard events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from fakedata import write_cifar10_python
from PIL import Image
from test_train import FAST

from cvt_train.engine.trainer import train

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_curves.py"


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_plot_of_two_runs_and_bad_input(tmp_path):
    root = write_cifar10_python(tmp_path / "cifar", n_train=100, n_test=50)
    base = [*FAST, "data=cifar10", f"data.root={root}", "trainer.epochs=2"]
    train(compose_train([*base, "trainer.eval_tta=flip"]), tmp_path / "a")
    train(compose_train(base), tmp_path / "b")
    out = tmp_path / "curves.png"
    done = plot(str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "tta", "plain", "--out", str(out))
    assert done.returncode == 0, done.stderr
    with Image.open(out) as im:
        assert (
            im.size == (840, 540) and len(im.convert("L").getcolors(maxcolors=2**16)) > 10
        )  # a drawn figure, not blank
    bad = plot(str(tmp_path), "--out", str(out))
    assert bad.returncode == 1 and "no tb/ folder" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = plot(str(tmp_path / "a"), "--labels", "x", "y", "--out", str(out))
    assert bad.returncode == 1 and "2 labels for 1 runs" in bad.stderr
