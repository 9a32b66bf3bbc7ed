"""Kill a real training process with SIGKILL at a random moment, resume it, and compare with a run
that was never interrupted: same global step, optimizer / EMA / LR state and data order."""

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RUN

RUN = [
    *TINY_RUN,
    "train.max_steps=120",
    "train.checkpoint_every_n_steps=10",
    "data.batch_size=16",
    "train.lr=3e-3",
    "train.warmup_steps=20",
    "train.lr_schedule=cosine",
    "train.ema_decay=0.99",
]


def _train(out, *extra, wait=True, logs=None):
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "train", *RUN, f"train.out={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    sink = open(logs, "w") if logs else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT if logs else sink, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run the interrupted and resumed ones must equal."""
    out = tmp_path_factory.mktemp("ref")
    ref = _train(out)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "LeafSpec" not in ref.stderr  # torch's deprecation of Lightning's pytree use is filtered
    # one bar over the run's optimizer steps, not Lightning's per-epoch batch count ("Epoch 0")
    assert "training" in ref.stdout and "120/120" in ref.stdout and "Epoch" not in ref.stdout
    return out


def _wait_for_second_checkpoint(proc, last, deadline):
    """Wait for the run's second checkpoint (step 20 of 120); return the seconds one interval took."""
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert last.exists(), "the run ended or stalled before its first checkpoint"
    first = time.time(), last.stat().st_mtime_ns
    while last.stat().st_mtime_ns == first[1] and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    return time.time() - first[0]


def _signal_between_checkpoints(proc, last, sig, fraction):
    """Send `sig` at a random moment after the run's second checkpoint (step 20 of 120): `fraction` of
    the interval the checkpoints were measured apart, but never later than the moment the third
    checkpoint (step 30) lands, however fast the machine runs then. So the signal always reaches a run
    that is still training, with 90 steps to go."""
    interval = _wait_for_second_checkpoint(proc, last, time.time() + 300)
    second = last.stat().st_mtime_ns
    wake = time.time() + fraction * interval
    while time.time() < wake and last.stat().st_mtime_ns == second and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)


def _resume_and_compare(reference, victim):
    """Resume the interrupted run to its end: the same final state as the uninterrupted one."""
    last = victim / "checkpoints" / "last.ckpt"
    resumed = _train(victim, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning does not apply to our sampler
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 120
    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(victim / "model" / "model.safetensors"))
    for name in a:  # EMA weights: depend on every step's data, noise, optimizer state and LR
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    # what was exported is the EMA of the final state, which lags the live weights; those match too
    ref_state = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    state = final["state_dict"]
    assert all(torch.equal(a[name], ref_state["ema." + name]) for name in a)
    assert max((ref_state["model." + name] - a[name]).abs().max() for name in a) > 1e-3
    for name in a:
        torch.testing.assert_close(state["model." + name], ref_state["model." + name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    victim = tmp_path / "victim"
    proc = _train(victim, wait=False)
    last = victim / "checkpoints" / "last.ckpt"
    _signal_between_checkpoints(proc, last, signal.SIGKILL, random.Random(0).uniform(0.0, 1.0))
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < 120
    assert not (victim / "model").exists()
    _resume_and_compare(reference, victim)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_stops_at_a_step_saves_it_and_resumes(tmp_path, reference):
    """SIGTERM (kill, a scheduler's preemption) ends the run at the end of a step, with that step's state
    in last.ckpt and exit code 143; resumed, the run ends as if never stopped."""
    victim = tmp_path / "victim"
    # logs every 50 steps: the stop step (between 20 and 120) is almost never one of them
    proc = _train(victim, "train.log_every_n_steps=50", wait=False, logs=tmp_path / "log")
    last = victim / "checkpoints" / "last.ckpt"
    _signal_between_checkpoints(proc, last, signal.SIGTERM, random.Random(1).uniform(0.0, 1.0))
    assert proc.wait(timeout=120) == 143, (tmp_path / "log").read_text()[-2000:]
    said = re.search(r"stopped by SIGTERM at step (\d+); (.+) holds it", (tmp_path / "log").read_text())
    assert said and Path(said[2]) == last
    step = int(said[1])
    assert torch.load(last, weights_only=True)["global_step"] == step and 20 <= step < 120
    assert not (victim / "model").exists()  # not finished: nothing exported
    # the logs' last row is the stop step's, with the throughput counted up to it (16 samples a step)
    rows = [r for r in csv.DictReader(open(victim / "logs" / "version_0" / "metrics.csv")) if r["perf/samples"]]
    assert int(rows[-1]["step"]) == step - 1 and float(rows[-1]["perf/samples"]) == 16 * step
    _resume_and_compare(reference, victim)


def _children(pid):
    """PIDs whose parent is `pid` (Lightning's launcher starts the other ranks as children of rank 0)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_ddp_process_stops_both(tmp_path, rank):
    """A 2-process DDP run whose rank 0 or rank 1 alone gets SIGTERM: both stop at one step, the state of
    that step is saved and both processes exit. Under Lightning's own handling this hung, or exited 0
    without a checkpoint, depending on when the signal came."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    proc = _train(out, "train.max_steps=100000", "train.devices=2", "train.strategy=ddp", wait=False, logs=log)
    last = out / "checkpoints" / "last.ckpt"
    _wait_for_second_checkpoint(proc, last, time.time() + 300)
    kids = _children(proc.pid)
    assert len(kids) == 1, kids
    os.kill(proc.pid if rank == 0 else kids[0], signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(kids[0], signal.SIGKILL)
        proc.kill()
        raise AssertionError("the run did not stop within 120 s of SIGTERM") from None
    assert code == 143, log.read_text()[-2000:]
    deadline = time.time() + 60
    while Path(f"/proc/{kids[0]}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{kids[0]}").exists(), "rank 1 outlived rank 0"
    said = re.search(r"stopped by SIGTERM at step (\d+)", log.read_text())
    assert said and torch.load(last, weights_only=True)["global_step"] == int(said[1]) >= 20
    assert not (out / "model").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    out = _train(tmp_path / "none", "--resume")
    assert out.returncode == 2 and "no checkpoint" in out.stderr


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    from mmfusion.training.checkpoint import atomic_torch_save

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_ctrl_c_says_where_the_run_stands(tmp_path, capsys):
    from types import SimpleNamespace

    from mmfusion.training.callbacks import interrupt_notice

    notice = interrupt_notice(tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, global_step=137, checkpoint_callback=None)
    notice.on_exception(trainer, None, KeyboardInterrupt())
    assert "interrupted at step 137; this run wrote no checkpoint yet" in capsys.readouterr().out
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")  # an earlier run's, as far as this one knows
    notice.on_exception(trainer, None, KeyboardInterrupt())
    assert "this run wrote no checkpoint yet" in capsys.readouterr().out
    trainer.checkpoint_callback = SimpleNamespace(_last_global_step_saved=100)
    notice.on_exception(trainer, None, KeyboardInterrupt())
    assert "last.ckpt, of step 100: --resume goes on from there" in capsys.readouterr().out
    notice.on_exception(trainer, None, ValueError("not an interrupt"))
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_on_a_real_run_prints_the_notice(tmp_path):
    """Ctrl-C on a run that is training: a run of 100,000 steps cannot end before the signal, whatever
    the machine's speed. It comes once the second checkpoint has landed, so the callback has recorded the
    first one's step and the notice offers --resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "train", *RUN, f"train.out={out}", "train.max_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"  # kept so that a run that outlives its Ctrl-C says where it was
    with open(log, "w") as err:
        # SIGINT back to its default in the child: a suite started in the background (`cmd &` in a
        # script, nohup) runs with SIGINT ignored, which exec passes on, and Python then installs no
        # KeyboardInterrupt handler, so the run would train on through its Ctrl-C
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            _wait_for_second_checkpoint(proc, out / "checkpoints" / "last.ckpt", time.time() + 300)
            assert proc.poll() is None, "the run ended before the signal"
            proc.send_signal(signal.SIGINT)
            try:
                stdout, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("still running 120 s after Ctrl-C; its stderr ends:\n" + log.read_text()[-3000:])
        finally:
            proc.kill()
    assert "interrupted at step" in stdout and "--resume goes on from there" in stdout, stdout[-2000:]
