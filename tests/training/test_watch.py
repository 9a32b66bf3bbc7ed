"""Training you can watch: the validation loss, samples and captions at an interval, the learning rate,
read back from what the loggers wrote."""

import csv
import importlib.util

import datasets
import pytest

from mmfusion.config import load_config
from mmfusion.errors import ConfigError
from mmfusion.training.run import train
from tests.conftest import TINY_RUN

WATCH = ["train.max_steps=4", "train.val_every_n_steps=2", "train.val_batches=2", "sample.diffusion.steps=2"]


def _metrics(out):
    rows = list(csv.DictReader(open(next(out.glob("logs/version_*/metrics.csv")))))
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r.get(k)] for k in rows[0]}


def test_validation_loss_and_learning_rate_are_logged_at_the_interval(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, [*TINY_RUN, *WATCH, f"train.out={out}", "train.val_samples=0", "train.warmup_steps=4"]))
    logged = _metrics(out)
    val = logged["val/loss"]
    assert [step for step, _ in val] == [1, 3]  # Lightning logs a check at the last step it ran: 2 and 4
    assert all(0 < v < 10 for _, v in val) and val[0][1] != val[1][1]
    assert "val/image_loss" in logged and "val/text_loss" in logged
    lr = logged["lr-AdamW/pg1"]  # two parameter groups: with and without weight decay
    assert len(lr) >= 2 and lr[0][1] < lr[-1][1]  # warmup: the rate grows over the first steps


def test_tensorboard_gets_samples_and_captions_of_validation_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = [*TINY_RUN, *WATCH, f"train.out={out}", "train.logger=tensorboard", "train.val_samples=2"]
    train(load_config(None, overrides))
    events = EventAccumulator(str(next(out.glob("logs/version_*"))), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "val/loss" in tags["scalars"] and "lr-AdamW/pg1" in tags["scalars"]
    images = events.Images("val/samples")
    assert [i.step for i in images] == [2, 4] and images[0].width > 0
    text = [t for t in tags["tensors"] if t.startswith("val/captions")]
    assert text and len(events.Tensors(text[0])) == 2
    caption_lines = events.Tensors(text[0])[0].tensor_proto.string_val[0].decode().split("\n")
    assert len(caption_lines) == 2 and all(" -> " in line for line in caption_lines)


def test_validation_without_a_validation_split_is_a_clear_error(tmp_path):
    data = datasets.load_from_disk(str(_shapes(tmp_path)))
    datasets.DatasetDict({"train": data["train"]}).save_to_disk(str(tmp_path / "only_train"))
    overrides = [*TINY_RUN, *WATCH, f"train.out={tmp_path / 'run'}", f"data.source={tmp_path / 'only_train'}"]
    with pytest.raises(
        ConfigError, match=r"^data\.val_split: 'validation' is not a split of the data \(it has: train\)"
    ):
        train(load_config(None, overrides))


def test_wandb_is_optional_and_says_how_to_get_it(tmp_path, monkeypatch):
    overrides = [*TINY_RUN, "train.max_steps=2", f"train.out={tmp_path / 'run'}", "train.logger=wandb"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"^train\.logger: wandb needs the wandb package: pip install"):
            train(load_config(None, overrides))
    else:  # offline: no network, the run's files under OUT/wandb
        monkeypatch.setenv("WANDB_MODE", "offline")
        train(load_config(None, overrides))
        assert any((tmp_path / "run" / "wandb").iterdir())


def _shapes(tmp_path):
    from mmfusion.data.shapes import build_shapes

    build_shapes(n=64, seed=0).save_to_disk(str(tmp_path / "shapes"))
    return tmp_path / "shapes"
