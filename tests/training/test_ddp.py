"""2-process DDP on CPU (gloo): both ranks end with identical weights, equal to a 1-process run with
the same global batch."""

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from tests.conftest import TINY_RUN

SCRIPT = Path(__file__).parent / "ddp_run.py"
RUN = [*TINY_RUN, "train.max_steps=4", "objective.t2i_fraction=1.0", "train.lr=1e-2", "train.ema_decay=0.9"]


def _run(out, devices, batch, *first, extra=(), **env_vars):
    """Train with `devices` processes and a global batch of `batch` samples."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2]), **env_vars}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *first, str(out), str(devices), str(batch), *RUN, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _close_to(got, single, init):
    """Weights `got` equal to one process's `single` (both from `init`), up to the order of float sums:
    the all-reduce adds the two half-batch gradients, one process sums the whole batch. Adam divides each
    update by the gradient's running size, which turns that last-bit noise into differences of up to
    1.6e-3 of how far the weights moved (measured on 2026-11-24), so the bound is relative to that."""
    for name, w in single.items():
        moved = (w - init[name]).abs().max().item()
        diff = (got[name] - w).abs().max().item()
        assert diff <= 1e-2 * moved + 1e-6, f"{name}: differs by {diff:.2e} after moving {moved:.2e}"


def test_two_process_ddp_matches_one_process(tmp_path):
    _run(tmp_path / "one", 1, 8)
    _run(tmp_path / "two", 2, 8)  # data.global_batch_size: 4 per process
    load = lambda run, name: torch.load(tmp_path / run / f"{name}.pt", weights_only=True)  # noqa: E731
    init, single = load("one", "rank0_init"), load("one", "rank0")
    init2, r0, r1 = load("two", "rank0_init"), load("two", "rank0"), load("two", "rank1")
    for name in single:
        assert torch.equal(init2[name], init[name]), name  # the same start
        assert torch.equal(r0[name], r1[name]), name  # ranks never drift apart
    _close_to(r0, single, init)
    # training did move the weights, so the comparison is not vacuous
    q = next(n for n in single if n.endswith("q_proj.weight"))
    assert (single[q] - init[q]).abs().max() > 1e-3
    # the throughput log counts what both processes trained on: the same samples and real tokens as the
    # one process over the same global batches
    one, two = _perf(tmp_path / "one"), _perf(tmp_path / "two")
    assert [r["perf/samples"] for r in two] == [8.0 * 2, 8.0 * 4]  # logged every 2 of the 4 steps
    assert [r["perf/tokens"] for r in two] == [r["perf/tokens"] for r in one]
    assert all(r["perf/tokens_per_sec"] > 0 for r in two)


def test_a_non_finite_loss_on_one_process_skips_the_step_on_both(tmp_path):
    """Step 2's loss is NaN on rank 1 alone: both processes skip that step (its backward runs, the
    weights do not move), count it once, and end where one process whose loss was NaN at step 2 ends.
    What the processes agree on at a step (SIGTERM, the time budget, a non-finite loss) is one
    all-reduce between them."""
    extra = ("train.max_steps=6", "train.log_every_n_steps=1000", "train.max_time_minutes=60")
    _run(tmp_path / "one", 1, 8, extra=extra, MMFUSION_TEST_NAN_AT="2,0")
    _run(tmp_path / "two", 2, 8, extra=extra, MMFUSION_TEST_NAN_AT="2,1")
    load = lambda run, name: torch.load(tmp_path / run / f"{name}.pt", weights_only=True)  # noqa: E731
    init, single, r0, r1 = load("one", "rank0_init"), load("one", "rank0"), load("two", "rank0"), load("two", "rank1")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    _close_to(r0, single, init)
    one, *two = (load(run, f"collectives_rank{r}") for run, r in (("one", 0), ("two", 0), ("two", 1)))
    assert one["nonfinite"] == two[0]["nonfinite"] == two[1]["nonfinite"] == 1
    for counted in two:
        # steps 0-4 of 6 (the last one also logs the throughput): the vote's all-reduce, and the broadcast
        # Lightning's loop makes before each step of a multi-process run (its own SIGTERM flag; made
        # after step k's hooks, so counted under step k). Nothing else: the budget's clock and the
        # non-finite check add no collective of their own
        made = Counter(name for step, name in counted["collectives"] if 0 <= step < 5)
        assert made == {"all_reduce": 5, "broadcast": 5}, counted["collectives"]


def _perf(out):
    rows = csv.DictReader(open(next(Path(out).glob("logs/*/metrics.csv"))))
    return [{k: float(v) for k, v in r.items() if k.startswith("perf/")} for r in rows if r.get("perf/samples")]


def test_a_finished_run_closes_its_process_group(tmp_path):
    """`train` ends a 2-process run by leaving the gloo group together: left open, one process can exit
    while its peer's transport threads still talk to it, and the C++ runtime aborts it at exit."""
    _run(tmp_path / "run", 2, 8, "--run")
    for rank in (0, 1):
        assert (tmp_path / "run" / f"group_open_rank{rank}.txt").read_text() == "False"


def _flag_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from mmfusion.training.module import max_over_processes

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        flags = [max_over_processes(torch.tensor(float(rank == k))).item() for k in (0, 1)]
        torch.save({"flags": flags, "none": max_over_processes(torch.tensor(0.0)).item()}, f"{out}/flag{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_flag_raised_on_either_process_is_seen_by_both(tmp_path):
    """The step's vote (SIGTERM, the budget spent, a non-finite loss) is an all-reduce of the maximum: a
    flag raised on rank 0 or on rank 1 alone, both processes read 1; raised on none, both read 0."""
    import torch.multiprocessing as mp

    mp.spawn(_flag_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"flag{rank}.pt")
        assert got == {"flags": [1.0, 1.0], "none": 0.0}
