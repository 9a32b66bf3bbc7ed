"""The callbacks of a training run: the step progress bar, the notice on Ctrl-C, the budget's clock,
the step's one vote of all processes (SIGTERM, time spent, a non-finite loss), and the throughput log;
with the helpers that read them after a fit."""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from mmfusion.errors import Stopped
from mmfusion.image_io import make_grid
from mmfusion.pipeline import MMFusion
from mmfusion.training.module import find_callback, max_over_processes


def step_progress_bar(minutes: float | None = None, refresh_rate: int = 10) -> L.Callback:
    """A tqdm bar over the optimizer steps of the whole run. Lightning's own counts the batches of an
    epoch, which says little here: the runs are bounded by steps or by time with max_epochs=-1 (it showed
    "Epoch 1/-2", or 350/1000000 steps with a 47-hour estimate in a 12-minute run). With a time budget
    the bar has no total (steps and rate only) and names the budget; a resumed run starts at its step.
    Plain tqdm, redrawn every `refresh_rate` steps: Rich's live display refreshes from a thread, which
    costs a small model's training a visible share of its time."""
    from lightning.pytorch.callbacks import Timer, TQDMProgressBar

    class StepProgressBar(TQDMProgressBar):
        started = False
        timer = None

        @property
        def train_description(self) -> str:  # the bar's name from its first draw on
            return f"training ({minutes:g} min budget)" if minutes else "training"

        def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if self.started:
                return  # one bar for the whole run, not one per pass over the data
            self.started = True
            bar = self.train_progress_bar
            bar.reset(total=None if minutes else trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            # Lightning's Timer, the clock that ends a run with a budget: its time left instead of an ETA
            self.timer = find_callback(trainer, Timer) if minutes else None
            if self.timer is not None:
                bar.bar_format = "{desc}: {n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]"

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
            step, bar = trainer.global_step, self.train_progress_bar
            if bar is not None and step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
                bar.n = step
                metrics = self.get_metrics(trainer, module)
                if self.timer is not None:
                    left = max(0, int(self.timer.time_remaining("train") or 0))
                    metrics = {"budget left": f"{left // 60}:{left % 60:02d}", **metrics}
                bar.set_postfix(metrics, refresh=False)
                bar.refresh()

        def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
            """Lightning's bar metrics, where a loss term the last step had no data for (NaN in the logs)
            shows its last measured value instead (`MMFusionModule.last_logged`)."""
            metrics = super().get_metrics(trainer, module)
            last = getattr(module, "last_logged", {})
            for key, value in list(metrics.items()):
                if isinstance(value, float) and math.isnan(value):
                    if key in last:
                        metrics[key] = float(last[key])
                    else:
                        del metrics[key]
            return metrics

    return StepProgressBar(refresh_rate=refresh_rate)


def interrupt_notice(out: Path) -> L.Callback:
    """On Ctrl-C, before Lightning ends the process: where the run stands and how to go on from it."""

    class InterruptNotice(L.Callback):
        def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
            if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
                return
            saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", 0)
            ckpt = out / "checkpoints" / "last.ckpt"
            if saved and ckpt.exists():  # this run's own checkpoint, not one an earlier run left in OUT
                then = f"the last checkpoint is {ckpt}, of step {saved}: --resume goes on from there"
            else:
                then = "this run wrote no checkpoint yet (train.checkpoint_every_n_steps), so nothing to resume"
            print(f"\ninterrupted at step {trainer.global_step}; {then}", flush=True)

    return InterruptNotice()


def budget_clock(minutes: float) -> L.Callback:
    """Lightning's `Timer` as the clock of a time budget: its time spent is kept in the checkpoint and
    goes on after a resume. The stop itself is agreed by `StepVote` with the step's other votes, so the
    Timer's own check after each step, a broadcast of a pickled flag (two collectives), is off."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer

    class BudgetClock(Timer):
        @property
        def state_key(self) -> str:  # the checkpoints of runs with Lightning's Timer itself resume alike
            return "Timer"

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            return None

    return BudgetClock(duration=timedelta(minutes=minutes), interval="step", verbose=False)


class StepVote(L.Callback):
    """What every process must agree on at an optimizer step, agreed in one all-reduce (max) after the
    backward, before the weights move:

    - SIGTERM (`kill`, a scheduler ending or preempting the job, torchrun passing it on) received by
      any process: the run stops at the end of this step on every process, and `train` writes the
      checkpoint of that step. A second SIGTERM ends the process at once.
    - the time budget: the share of it spent (the largest of the processes' clocks, `budget_clock`),
      which also sets the LR schedule's time progress; the run stops at the step that spends it.
    - a non-finite loss on any process since the last step: the step is skipped on all
      (`MMFusionModule.settle_step`).

    Lightning's own ways to agree cost a collective each, and its SIGTERM handler broadcasts from inside
    the signal handler, a collective the other processes are not making at that moment: a 2-process run
    given SIGTERM hung or exited 0 without a checkpoint (tests/training/test_resume.py). Here the
    handler only records the signal."""

    def __init__(self, budget_minutes: float | None = None) -> None:
        self.budget_s = 60 * budget_minutes if budget_minutes else None
        self.requested = False  # this process received SIGTERM
        self.stopped_at: int | None = None  # the step all processes stopped at by SIGTERM, before max_steps
        self.clock: Any = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning.pytorch.callbacks import Timer

        self.clock = find_callback(trainer, Timer) if self.budget_s else None
        # after Lightning installed its handlers (it puts back the ones before it at teardown)
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        spent = self.clock.time_elapsed() / self.budget_s if self.clock is not None else 0.0
        bad = float(getattr(module, "loss_not_finite", False))
        votes = torch.tensor([float(self.requested), spent, bad], dtype=torch.float64)
        sigterm, spent, bad = max_over_processes(votes.to(trainer.strategy.root_device)).tolist()
        if hasattr(module, "settle_step"):
            module.settle_step(optimizer, not_finite=bool(bad), spent=spent if self.clock is not None else None)
        step = trainer.global_step + 1  # the step this optimizer step makes
        if step >= (trainer.max_steps if trainer.max_steps > 0 else float("inf")) or not (sigterm or spent >= 1):
            return
        trainer.should_stop = True
        if sigterm:
            self.stopped_at = step
        elif trainer.is_global_zero:
            print(f"\ntime budget spent at step {step:,}: {self.budget_s / 60:g} min", flush=True)


class ThroughputLog(L.Callback):
    """Every `every` optimizer steps, logs what all processes trained on together: `perf/samples` and
    `perf/tokens` (real tokens: text, condition and image tokens, no padding; steps skipped for a
    non-finite loss not counted) since this process started (a resumed run counts from its resume), and
    their rates per second of wall time since the last log (checkpoint saves included). One
    all-reduce at those steps; every process makes it, since they all reach the same steps."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.last: tuple[float, torch.Tensor] | None = None
        self.first: tuple[float, torch.Tensor] | None = None
        self.first_step = 0
        self._logged_step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last = self.first = (time.perf_counter(), self._total(trainer, module))
        self.first_step = trainer.global_step

    def summary(self, trainer: L.Trainer, module: L.LightningModule) -> str:
        """One line on what this fit trained, all processes together. Every process calls it after `fit`
        (an all-reduce)."""
        if self.first is None:
            return ""
        seconds = max(time.perf_counter() - self.first[0], 1e-9)
        samples, tokens = (self._total(trainer, module) - self.first[1]).tolist()
        took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
        return (
            f"trained {trainer.global_step - self.first_step:,} steps ({samples:,.0f} samples, {tokens:,.0f} "
            f"tokens) in {took}: {samples / seconds:,.0f} samples/s, {tokens / seconds:,.0f} tokens/s"
        )

    def _total(self, trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
        seen = module.seen.clone()  # on the CPU
        if trainer.world_size > 1:  # NCCL reduces GPU tensors only
            seen = trainer.strategy.reduce(seen.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return seen

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        # Lightning writes the logs every `every` steps and at a stop (budget, SIGTERM: decided by the
        # callbacks before this one, the same on every process)
        if self.last is None or (step % self.every and not trainer.should_stop) or self._logged_step == step:
            return
        self._logged_step = step
        now, total = time.perf_counter(), self._total(trainer, module)
        (samples, tokens), (samples_rate, tokens_rate) = (
            total.tolist(),
            ((total - self.last[1]) / max(now - self.last[0], 1e-9)).tolist(),
        )
        self.last = (now, total)
        logged = {"samples": samples, "tokens": tokens, "samples_per_sec": samples_rate, "tokens_per_sec": tokens_rate}
        # float64: a float32 log would round counts past 2^24 tokens
        module.log_dict({f"perf/{k}": torch.tensor(v, dtype=torch.float64) for k, v in logged.items()})


def stopped_at(trainer: L.Trainer) -> int | None:
    """The step at which SIGTERM stopped this fit, or None if it ran to its end."""
    stop = find_callback(trainer, StepVote)
    return None if stop is None else stop.stopped_at


def stopped(trainer: L.Trainer, said: str) -> Stopped:
    """The `Stopped` every process raises, its message said by rank 0 alone."""
    return Stopped(said if trainer.is_global_zero else "")


@contextmanager
def lightning_warnings_filtered() -> Iterator[None]:
    """Around `Trainer.fit`: Lightning's loops build torch pytree LeafSpec objects, which recent torch
    marks deprecated. That FutureWarning, once per process, is about Lightning's code and asks nothing
    of the user, so it is not shown. Nor is Lightning's warning that `training_step` returned None: it
    does so on purpose for a batch whose rows were all unusable, which are counted in our own line."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
        yield


class ValidationSamples(L.Callback):
    """After each validation check, with a logger that shows images (TensorBoard, wandb): images sampled
    (the EMA weights, the model's own sampler settings, seeds 0..n-1) from the first caption of the first
    `n` validation images, beside those images, and the captions the model gives them. Said by rank 0."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.n or not trainer.is_global_zero or trainer.sanity_checking:
            return
        rows = self._rows(trainer)
        if rows is None:
            return
        pipe = MMFusion.from_module(module)
        real = [r["image"].convert("RGB") for r in rows]
        refs = [r["captions"][0] for r in rows]
        made = pipe.generate(refs, seed=0) if pipe.condition == "text" else []
        said = pipe.caption(real) if pipe.condition == "text" else []
        grid = np.asarray(make_grid([*real, *made], cols=len(real), scale=2))  # real row, then sampled
        lines = [f"- {ref} -> {' '.join(cap.split())}" for ref, cap in zip(refs, said)]  # one line each
        log_image_and_text(trainer.logger, "val/samples", grid, "val/captions", "\n".join(lines), trainer.global_step)

    def _rows(self, trainer: L.Trainer) -> list[dict[str, Any]] | None:
        data = trainer.datamodule.load()[trainer.datamodule.cfg.val_split]
        if "image" not in data.column_names:  # tokens encoded ahead of time: no images to show
            return None
        return [data[i] for i in range(min(self.n, len(data)))]


def log_image_and_text(logger: Any, image_tag: str, image: np.ndarray, text_tag: str, text: str, step: int) -> None:
    """An HWC uint8 image and a text under their tags, for the loggers that show them."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(image_tag, image, step, dataformats="HWC")
        if text:
            logger.experiment.add_text(text_tag, text, step)
    elif type(logger).__name__ == "WandbLogger":
        logger.log_image(key=image_tag, images=[image], step=step)
        if text:
            logger.log_text(key=text_tag, columns=["captions"], data=[[text]], step=step)
