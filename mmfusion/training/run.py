"""`mmfusion train`: build the data, the module and a Lightning Trainer from a RunConfig, fit, export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmfusion.config import RunConfig, check_data_path
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.data.datasets import check_source
from mmfusion.data.encode import check_encoded, is_encoded
from mmfusion.data.shapes import class_names
from mmfusion.errors import UserError
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.pipeline import MMFusion
from mmfusion.runtime import tune_malloc
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.callbacks import ThroughputLog, lightning_warnings_filtered, stopped, stopped_at
from mmfusion.training.from_llm import init_from_llm, with_llm_backbone
from mmfusion.training.module import MMFusionModule, find_callback
from mmfusion.training.sharded import full_state_dict
from mmfusion.training.trainer import build_trainer, choose_precision


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train, then write the model folder (`OUT/model`); returns that folder."""
    tune_malloc()
    out = Path(cfg.train.out)
    ckpt = out / "checkpoints" / "last.ckpt"
    refuse_early(cfg, resume, ckpt)  # before anything is written into OUT
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    llm = cfg.train.init_from_llm
    if llm:
        cfg = with_llm_backbone(cfg, llm)
    data, module = build_run(cfg, out, resume)
    if llm:
        init_from_llm(module, llm)
    trainer = build_trainer(cfg, out, choose_precision(cfg.train.precision, cfg.train.accelerator))
    cfg.data.process_batch(trainer.world_size)  # a global batch that does not split: say so before the launch
    with lightning_warnings_filtered():
        # Lightning warns that a mid-epoch resume with a dataloader lacking state_dict is unreliable. Ours
        # needs no state: StepBatchSampler's batch k is a function of k alone, and the run restarts at
        # the checkpoint's step (tests/training/test_resume.py: killed and resumed == uninterrupted)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if resume else None, weights_only=True)
        except SIGTERMException as err:  # before StepVote took over: Lightning's handler (exit 0)
            raise stopped(trainer, "stopped by SIGTERM before the first step; nothing new to save") from err
    # the final state (full, not weights only), so that a time-limited run can be resumed from its end
    trainer.save_checkpoint(ckpt, weights_only=False)
    step = stopped_at(trainer)
    if step is not None:  # SIGTERM: the run is not finished, so no model folder
        leave_process_group()
        raise stopped(trainer, f"stopped by SIGTERM at step {step}; {ckpt} holds it: --resume goes on from there")
    report(trainer, module)
    model_dir = export(cfg, trainer, module, out / "model")
    leave_process_group()
    return model_dir


def refuse_early(cfg: RunConfig, resume: bool, ckpt: Path) -> None:
    """What can be refused before a run starts: a missing checkpoint to resume, a GPU this machine lacks,
    data that is not there or not encoded for this image tokenizer, settings its data path ignores."""
    if resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
    if cfg.train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"train.accelerator={cfg.train.accelerator}: torch sees no CUDA GPU here; use auto or cpu")
    if cfg.data.source != "shapes":
        check_source(cfg.data.source)
        check_encoded(cfg.data.source, cfg.image)
    check_data_path(cfg, encoded=cfg.data.source != "shapes" and is_encoded(cfg.data.source))


def build_run(cfg: RunConfig, out: Path, resume: bool) -> tuple[MMFusionDataModule, MMFusionModule]:
    """The data module and the Lightning module of a run, its text tokenizer saved as OUT/tokenizer.json
    (on resume, the one the checkpoint was trained with)."""
    text = cfg.objective.condition == "text"
    total_steps = cfg.train.max_steps * cfg.train.accumulate_grad_batches
    data = MMFusionDataModule(
        cfg.data, cfg.image.image_size, out, need_text=text, seed=cfg.train.seed, total_steps=total_steps
    )
    if resume and text and (out / "tokenizer.json").exists():
        # the checkpoint's embeddings index this run's tokenizer, not one retrained on the data as it is now
        data.tokenizer = TextTokenizer.from_file(out / "tokenizer.json", max_len=cfg.data.max_text_len)
    tok = data.text_tokenizer() if text else _class_tokenizer()
    tok.save(out / "tokenizer.json")
    module = MMFusionModule(cfg, tok)
    if cfg.objective.condition == "class" and cfg.data.source == "shapes":
        module.class_names = class_names()
    return data, module


def report(trainer: L.Trainer, module: MMFusionModule) -> None:
    """The run's throughput, skipped rows and skipped steps, said once (by rank 0) for all processes."""
    throughput = find_callback(trainer, ThroughputLog)
    trained = throughput.summary(trainer, module) if throughput is not None else ""  # every process
    if trainer.is_global_zero:  # the skipped rows of all processes (gathered with the checkpoint)
        if trained:
            print(trained)
        print(module.skipped_summary())
        if module.nonfinite_total:
            print(f"skipped {module.nonfinite_total} steps with a non-finite loss")


def export(cfg: RunConfig, trainer: L.Trainer, module: MMFusionModule, model_dir: Path) -> Path:
    """Write the model folder (EMA weights) from rank 0, gathering FSDP's shards first."""
    if cfg.train.strategy == "fsdp":
        export_fsdp(trainer, module, model_dir)
    elif trainer.is_global_zero:
        MMFusion.from_module(module).save_pretrained(model_dir)
    if trainer.is_global_zero:
        print(f"model written to {model_dir}")
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
    """Under FSDP the weights are sharded: gather the EMA (or live) weights on rank 0's CPU (all
    processes take part), then export them as a normal model folder."""
    state = full_state_dict(module.sampling_model)
    if trainer.is_global_zero:
        model = MMFusionModel(module.model.cfg)
        model.load_state_dict(state)
        pipe = MMFusion.from_module(module)
        pipe.model = model.eval()
        pipe.save_pretrained(model_dir)


def _class_tokenizer():  # noqa: ANN202
    """Class-conditional models still carry a (trivial) text tokenizer for the special tokens."""
    return TextTokenizer.train(["class"], vocab_size=300)
