"""2-process DDP on CPU (gloo): both ranks end with identical weights, equal to a 1-process run with
the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY_RUN

SCRIPT = Path(__file__).parent / "ddp_run.py"
RUN = [*TINY_RUN, "train.max_steps=4", "objective.t2i_fraction=1.0", "train.lr=1e-2", "train.ema_decay=0.9"]


def _run(out, devices, batch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch), *RUN],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    _run(tmp_path / "one", 1, 8)
    _run(tmp_path / "two", 2, 4)  # same global batch of 8
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=True)
    start = None
    for name, w in single.items():
        assert torch.equal(r0[name], r1[name]), name  # ranks never drift apart
        torch.testing.assert_close(r0[name], w, atol=2e-5, rtol=1e-4, msg=name)  # same training as one process
        if name.endswith("q_proj.weight") and start is None:
            start = name
    # and training did move the weights (so the comparison is not vacuous)
    fresh = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)[start]
    assert fresh.abs().sum() > 0
