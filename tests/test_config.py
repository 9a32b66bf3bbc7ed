from pathlib import Path

import pytest

from mmfusion.config import load_config, parse_overrides
from mmfusion.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.dim > 0 and cfg.train.lr > 0


def test_paper_L_setting():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "L.yaml")
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (1024, 16, 24)
    assert (cfg.image.image_size, cfg.image.patch_size, cfg.image.kind) == (256, 2, "vae")
    assert cfg.train.lr == 1e-4 and cfg.data.max_text_len == 35 and cfg.objective.text_loss_weight == 0.01
    assert cfg.data.batch_size * cfg.train.devices * cfg.train.num_nodes == 2048


def test_overrides_and_types():
    cfg = load_config(None, ["train.lr=3e-4", "model.preset=tiny", "train.betas=[0.9, 0.99]", "sample.ar_steps=4"])
    assert cfg.train.lr == 3e-4 and cfg.model.dim == 64 and cfg.train.betas == (0.9, 0.99)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "bad,message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train.lr=abc"], "'train.lr' must be of type float"),
        (["model.dim=1.5"], "'model.dim' must be of type int"),
        (["model.preset=huge"], "unknown model preset"),
        (["diffusion.order=spiral"], "order must be one of"),
        (["train.lr_schedule=linear"], "lr_schedule must be one of constant, cosine, wsd"),
        (["train.lr_decay_fraction=0"], r"lr_decay_fraction must be in \(0, 1\]"),
        (["train"], "must look like section.key=value"),
        (["objective.baseline=foo"], "baseline must be one of causalfusion, transfusion"),
        (["objective.condition=image"], "condition must be one of text, class"),
        (["objective.condition=class"], "objective.condition=class needs model.num_classes > 0"),
        (["train.logger=wandb"], "logger must be csv or tensorboard"),
        (["train.max_time_minutes=0"], "max_time_minutes must be positive"),  # 0 ran without a time limit
        (["train.max_steps=0"], "max_steps must be at least 1"),
        (["objective.caption_ar_steps=0"], "caption_ar_steps must be at least 1"),
    ],
)
def test_bad_config_is_one_clear_line(bad, message):
    with pytest.raises(UserError, match=message):
        load_config(None, bad)


def test_global_batch_splits_between_processes():
    data = load_config(None, ["data.batch_size=32"]).data
    assert [data.process_batch(w) for w in (1, 2, 4)] == [32, 32, 32]  # per process by default
    data = load_config(None, ["data.batch_size=32", "data.global_batch_size=64"]).data
    assert [data.process_batch(w) for w in (1, 2, 4)] == [64, 32, 16]
    with pytest.raises(UserError, match="multiple of 3"):
        data.process_batch(3)


def test_per_process_batch_override_under_a_global_batch_is_refused():
    from mmfusion.training.demo import DEMO_CONFIG as demo

    with pytest.raises(UserError, match="data.global_batch_size=128"):
        load_config(demo, ["data.batch_size=16"])
    assert load_config(demo, ["data.global_batch_size=32"]).data.process_batch(2) == 16
    assert load_config(demo, ["data.batch_size=16", "data.global_batch_size=null"]).data.process_batch(2) == 16


def _config_docs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "config_docs.py"
    spec = importlib.util.spec_from_file_location("config_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_page_is_current_and_explains_every_key():
    """docs/config.md is what scripts/config_docs.py makes from the dataclasses now, and every key of
    every section has a default and a meaning there."""
    import dataclasses

    from mmfusion.config import RunConfig

    docs = _config_docs()
    assert docs.main(["--check"]) == 0, "docs/config.md is stale: run python scripts/config_docs.py"
    text = docs.DOC.read_text()
    for section in dataclasses.fields(RunConfig):
        assert f"## `{section.name}`" in text
        for f in dataclasses.fields(type(getattr(RunConfig(), section.name))):
            rows = [line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")]
            assert rows and all(line.split(" | ")[3].strip(" |") for line in rows), f"{section.name}.{f.name}"


def test_config_page_reads_the_comments_above_and_beside_a_field(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Example:
        # first line
        # second line
        a: int = 1  # beside
        b: str = "x#y"  # only beside
        c: float = 2.0

        def method(self) -> None:  # not a field
            pass

    notes = _config_docs().field_notes(Example)
    assert notes == {"a": "first line second line beside", "b": "only beside", "c": ""}
