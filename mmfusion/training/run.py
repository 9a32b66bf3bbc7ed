"""`mmfusion train`: build the data, the module and a Lightning Trainer from a RunConfig, fit, export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmfusion.config import RunConfig
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.data.datasets import check_source
from mmfusion.data.encode import check_encoded
from mmfusion.data.shapes import class_names
from mmfusion.errors import Stopped, UserError
from mmfusion.model.hf import config_from_hf, load_hf_backbone, read_hf_config
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.transformer import Block
from mmfusion.pipeline import MMFusion
from mmfusion.runtime import matmul_gflops, tune_malloc
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.checkpoint import AtomicCheckpointIO
from mmfusion.training.module import MMFusionModule, find_callback


def choose_precision(requested: str, accelerator: str = "auto") -> str:
    """`auto`: bf16-mixed on GPUs; on CPU, bf16-mixed only where bf16 matmuls are measured faster.
    Measured once per process, and the processes Lightning's launcher starts take the choice of the one
    that started them (from its environment), so that all ranks train in one precision and say it once.
    Processes started by torchrun or srun measure each on their own: give train.precision explicitly
    there."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    inherited = os.environ.get(AUTO_PRECISION_ENV)
    if inherited:  # measured before, by this process or the one that launched it
        return inherited
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    choice = "bf16-mixed" if bf16 > 1.2 * fp32 else "32-true"
    print(f"precision auto: matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s -> {choice}")
    os.environ[AUTO_PRECISION_ENV] = choice
    return choice


AUTO_PRECISION_ENV = "MMFUSION_AUTO_PRECISION"


def make_strategy(t: Any) -> Any:
    """Lightning strategy from its name. DDP looks for unused parameters: a batch without captions
    leaves the text head out of the graph, a class-conditional one the text embeddings."""
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    if t.strategy == "fsdp":
        return fsdp_strategy(t)
    return t.strategy


def fsdp_strategy(t: Any) -> Any:
    """FSDP sharding whole transformer blocks, with sharded checkpoints and optional activation
    checkpointing of the blocks."""
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if t.activation_checkpointing else None,
        state_dict_type="sharded",
        use_orig_params=True,
    )


def step_progress_bar(minutes: float | None = None, refresh_rate: int = 10) -> L.Callback:
    """A tqdm bar over the optimizer steps of the whole run. Lightning's own counts the batches of an
    epoch, which says little here: the runs are bounded by steps or by time with max_epochs=-1 (it showed
    "Epoch 1/-2", or 350/1000000 steps with a 47-hour estimate in a 12-minute run). With a time budget
    the bar has no total (steps and rate only) and names the budget; a resumed run starts at its step.
    Plain tqdm, redrawn every `refresh_rate` steps: Rich's live display refreshes from a thread that took
    4% of a small model's training time (py-spy)."""
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


class StopOnSigterm(L.Callback):
    """SIGTERM (`kill`, a scheduler ending or preempting the job, torchrun passing it on) stops the run at
    the end of an optimizer step, on every process at the same step, whichever processes received it.

    Lightning's own handler does not: it broadcasts from inside the signal handler, a collective the other
    processes are not making at that moment, and the first rank to see the flag raises alone. A 2-process
    run given SIGTERM hung or exited 0 without a checkpoint (tests/training/test_resume.py). Here the
    handler only records the signal; each optimizer step ends with one all-reduce of that flag (max; 0.13
    ms over gloo between two local processes, about 0.1% of a demo step), so all processes agree and leave
    `fit` normally; `train` then writes the checkpoint of that step. A second SIGTERM ends the process at
    once."""

    def __init__(self) -> None:
        self.requested = False  # this process received SIGTERM
        self.stopped_at: int | None = None  # the step all processes stopped at, before max_steps
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._step = trainer.global_step  # decide only once an optimizer step has been taken
        # after Lightning installed its handlers (it puts back the ones before it at teardown)
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self._step:  # inside a gradient accumulation: same step, same decision
            return
        self._step = trainer.global_step
        flag = torch.tensor(float(self.requested), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() and trainer.global_step < (trainer.max_steps if trainer.max_steps > 0 else float("inf")):
            trainer.should_stop = True
            self.stopped_at = trainer.global_step


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
    stop = find_callback(trainer, StopOnSigterm)
    return None if stop is None else stop.stopped_at


def stopped(trainer: L.Trainer, said: str) -> Stopped:
    """The `Stopped` every process raises, its message said by rank 0 alone."""
    return Stopped(said if trainer.is_global_zero else "")


@contextmanager
def lightning_warnings_filtered() -> Iterator[None]:
    """Around `Trainer.fit`: Lightning's loops build torch pytree LeafSpec objects, which recent torch
    marks deprecated. That FutureWarning, once per process, is about Lightning's code and asks nothing
    of the user, so it is not shown. Nor is Lightning's warning that `training_step` returned None: it
    does so on purpose for a step with a non-finite loss, which is skipped and counted in our own line."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
        yield


def build_trainer(
    cfg: RunConfig, out: Path, precision: str, extra_callbacks: list | None = None, enable_checkpointing: bool = True
) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, Timer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.train
    every = min(t.log_every_n_steps, t.max_steps)  # a shorter run than the interval: Lightning warns
    # the budget's Timer (Lightning's, which agrees across processes on when to stop: one rank alone would
    # hang DDP) decides before the callbacks after it, so that they see a stop at the step it comes
    timer = [Timer(duration=timedelta(minutes=t.max_time_minutes), interval="step")] if t.max_time_minutes else []
    callbacks: list[L.Callback] = [step_progress_bar(t.max_time_minutes), *timer, StopOnSigterm(), ThroughputLog(every)]
    if enable_checkpointing:
        callbacks.append(interrupt_notice(out))
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=t.checkpoint_every_n_steps,
                save_last=True,
                save_top_k=-1 if t.keep_all_checkpoints else 0,
                filename="step{step}",
                auto_insert_metric_name=False,
            )
        )
    callbacks += extra_callbacks or []
    logger = TensorBoardLogger(out, name="logs") if t.logger == "tensorboard" else CSVLogger(out, name="logs")
    try:
        return _trainer(t, out, precision, callbacks, logger, enable_checkpointing, every)
    except (MisconfigurationException, ValueError) as err:  # Lightning refusing a setting: one line
        raise UserError(f"train: {err}") from err


def _trainer(
    t: Any, out: Path, precision: str, callbacks: list, logger: Any, enable_checkpointing: bool, every: int
) -> L.Trainer:
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t),
        precision=precision,
        gradient_clip_val=t.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=every,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO(), *slurm_without_requeue()],
        enable_checkpointing=enable_checkpointing,
        enable_model_summary=False,
        default_root_dir=out,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=-1,
        use_distributed_sampler=False,  # StepBatchSampler shards the global batch itself
    )


def slurm_without_requeue() -> list[Any]:
    """Where Lightning would pick SLURM's environment, the same environment with its SIGUSR1 auto-requeue
    off: that handler saves a checkpoint from inside the signal handler, a collective the other ranks
    are not making then. SIGTERM does this job (`StopOnSigterm`, scripts/slurm_train.sh)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():  # Lightning's own order
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train, then write the model folder (`OUT/model`); returns that folder."""
    tune_malloc()
    out = Path(cfg.train.out)
    ckpt = out / "checkpoints" / "last.ckpt"
    # what can be refused is refused before anything is written into OUT
    if resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
    if cfg.train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"train.accelerator={cfg.train.accelerator}: torch sees no CUDA GPU here; use auto or cpu")
    if cfg.data.source != "shapes":
        check_source(cfg.data.source)
        check_encoded(cfg.data.source, cfg.image)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    llm = cfg.train.init_from_llm
    if llm:
        cfg = with_llm_backbone(cfg, llm)
    data = MMFusionDataModule(
        cfg.data,
        cfg.image.image_size,
        out,
        need_text=cfg.objective.condition == "text",
        seed=cfg.train.seed,
        total_steps=cfg.train.max_steps * cfg.train.accumulate_grad_batches,
    )
    if resume and cfg.objective.condition == "text" and (out / "tokenizer.json").exists():
        # the checkpoint's embeddings index this run's tokenizer, not one retrained on the data as it is now
        data.tokenizer = TextTokenizer.from_file(out / "tokenizer.json", max_len=cfg.data.max_text_len)
    tok = data.text_tokenizer() if cfg.objective.condition == "text" else _class_tokenizer()
    tok.save(out / "tokenizer.json")
    module = MMFusionModule(cfg, tok)
    if llm:
        init_from_llm(module, llm)
    if cfg.objective.condition == "class" and cfg.data.source == "shapes":
        module.class_names = class_names()
    precision = choose_precision(cfg.train.precision, cfg.train.accelerator)
    trainer = build_trainer(cfg, out, precision)
    cfg.data.process_batch(trainer.world_size)  # a global batch that does not split: say so before the launch
    with lightning_warnings_filtered():
        # Lightning warns that a mid-epoch resume with a dataloader lacking state_dict is unreliable. Ours
        # needs no state: StepBatchSampler's batch k is a function of k alone, and the run restarts at
        # the checkpoint's step (tests/training/test_resume.py: killed and resumed == uninterrupted)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if resume else None, weights_only=True)
        except SIGTERMException as err:  # before StopOnSigterm took over: Lightning's handler (exit 0)
            raise stopped(trainer, "stopped by SIGTERM before the first step; nothing new to save") from err
    # the final state (full, not weights only), so that a time-limited run can be resumed from its end
    trainer.save_checkpoint(ckpt, weights_only=False)
    step = stopped_at(trainer)
    if step is not None:  # SIGTERM: the run is not finished, so no model folder
        leave_process_group()
        raise stopped(trainer, f"stopped by SIGTERM at step {step}; {ckpt} holds it: --resume goes on from there")
    throughput = find_callback(trainer, ThroughputLog)
    trained = throughput.summary(trainer, module) if throughput is not None else ""  # every process
    if trainer.is_global_zero:  # the skipped rows of all processes (gathered with the checkpoint)
        if trained:
            print(trained)
        print(module.skipped_summary())
        if module.nonfinite_total:
            print(f"skipped {module.nonfinite_total} steps with a non-finite loss")
    model_dir = out / "model"
    if cfg.train.strategy == "fsdp":
        export_fsdp(trainer, module, model_dir)
    elif trainer.is_global_zero:
        MMFusion.from_module(module).save_pretrained(model_dir)
    if trainer.is_global_zero:
        print(f"model written to {model_dir}")
    leave_process_group()
    return model_dir


def leave_process_group() -> None:
    """End a multi-process run together: every process waits for the others, then frees the group.
    Lightning frees only NCCL groups at exit; a gloo group left open lets one process exit while its
    peer's transport threads still talk to it, and the C++ runtime then aborts that process at exit
    ("terminate called without an active exception", exit code -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def export_fsdp(trainer: L.Trainer, module: MMFusionModule, model_dir: Path) -> None:
    """Under FSDP the weights are sharded: gather the full state on rank 0 (CPU), then export the
    EMA (or live) weights as a normal model folder. Not exercised by the CPU test suite: Lightning's
    FSDP needs GPUs."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, config):
        state = module.state_dict()
    if trainer.is_global_zero:
        prefix = "ema." if module.ema is not None else "model."
        model = MMFusionModel(module.model.cfg)
        model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        pipe = MMFusion.from_module(module)
        pipe.model = model.eval()
        pipe.save_pretrained(model_dir)


def with_llm_backbone(cfg: RunConfig, folder: str) -> RunConfig:
    """The run config with the backbone shape of a Hugging Face LLaMA / Qwen3 folder and its tokenizer."""
    keep = (
        "image_token_dim",
        "image_grid",
        "image_pos_embed",
        "image_rope",
        "num_classes",
        "class_tokens",
        "class_repeat",
        "image_codebook_size",
        "code_bits",
        "bitwise_head",
        "shuffle",
        "code_dim",
        "window_head",
        "fp32_head",
    )
    model = config_from_hf(read_hf_config(folder), **{k: getattr(cfg.model, k) for k in keep})
    data = cfg.data
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=str(Path(folder) / "tokenizer.json"))
    return dataclasses.replace(cfg, model=model, data=data)


def init_from_llm(module: MMFusionModule, folder: str) -> None:
    """Load the LLM's weights into the backbone and text embeddings / head (the EMA copy too)."""
    loaded = load_hf_backbone(module.model, folder)
    if module.ema is not None:
        module.ema.load_state_dict(module.model.state_dict())
    print(f"initialised {len(loaded)} tensors from {folder}")


def _class_tokenizer():  # noqa: ANN202
    """Class-conditional models still carry a (trivial) text tokenizer for the special tokens."""
    return TextTokenizer.train(["class"], vocab_size=300)
