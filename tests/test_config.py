import dataclasses
from pathlib import Path

import pytest

from mmfusion.config import load_config, parse_overrides
from mmfusion.errors import ConfigError, UserError

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
        (["train.lrr=1"], r"train\.lrr: unknown key; the keys of train: accelerator, "),
        (["train.lr=abc"], r"train\.lr: must be of type float, got 'abc'"),
        (["model.dim=1.5"], r"model\.dim: must be of type int, got 1\.5"),
        (["model.dim=100", "model.n_heads=3"], r"model\.dim: must be divisible by n_heads \(3\), got 100"),
        (["model.preset=huge"], r"model\.preset: must be one of tiny, small, L, XL, got 'huge'"),
        (["diffusion.order=spiral"], r"diffusion\.order: must be one of random, raster, block_raster"),
        (["diffusion.gamma=1.5"], r"diffusion\.gamma: must be in \[0, 1\], got 1\.5"),
        (["train.lr_schedule=linear"], r"train\.lr_schedule: must be one of constant, cosine, wsd"),
        (["train.lr_decay_fraction=0"], r"train\.lr_decay_fraction: must be in \(0, 1\]"),
        (["train"], r"train: an override must look like section\.key=value"),
        (["objective.baseline=foo"], r"objective\.baseline: must be one of causalfusion, transfusion"),
        (["objective.condition=image"], r"objective\.condition: must be one of text, class"),
        (["objective.condition=class"], r"objective\.condition: class needs model\.num_classes > 0"),
        (["train.logger=mlflow"], r"train\.logger: must be one of csv, tensorboard, wandb, got 'mlflow'"),
        (["train.max_time_minutes=0"], r"train\.max_time_minutes: must be positive"),  # 0 ran without a limit
        (["train.max_steps=0"], r"train\.max_steps: must be at least 1"),
        (["objective.caption_ar_steps=0"], r"objective\.caption_ar_steps: must be at least 1"),
        (["sample.diffusion.steps=0"], r"sample\.diffusion\.steps: \(denoising steps per AR step\) must be"),
        (["sample.tokens.top_p=0"], r"sample\.tokens\.top_p: must be in \(0, 1\], got 0"),
        (["sample.caption.method=sample"], r"sample\.caption\.method: must be one of greedy, beam, nucleus"),
        (["sample.diffusion.top_k=2"], r"sample\.diffusion\.top_k: unknown key; the keys of "),
        (["sample.cfg_scale=-1"], r"sample\.diffusion\.cfg_scale: must not be negative, got -1"),
        (["sample.diffusion=3"], r"sample\.diffusion: must be a mapping of keys to values, got 3"),
        (["data.batch_size=8", "data.global_batch_size=16"], None),
    ],
)
def test_every_bad_setting_is_one_config_error_in_one_style(bad, message):
    """Whatever is wrong and wherever: one ConfigError, `<dotted key>: <problem>`, on one line."""
    if message is None:  # a valid pair, for contrast
        load_config(None, bad)
        return
    with pytest.raises(ConfigError, match="^" + message) as err:
        load_config(None, bad)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_a_flat_sample_section_of_before_still_loads(tmp_path):
    """Configs and model folders written before the per-sampler parts hold one flat `sample:` mapping;
    its keys go to the sampler that has them (cfg_scale to both image samplers), and overrides of either
    form win over the file."""
    path = tmp_path / "old.yaml"
    path.write_text("sample:\n  ar_steps: 4\n  steps: 20\n  cfg_scale: 3.0\n  temperature: 0.7\n")
    s = load_config(path).sample
    assert (s.diffusion.ar_steps, s.diffusion.steps, s.diffusion.cfg_scale) == (4, 20, 3.0)
    assert (s.tokens.temperature, s.tokens.cfg_scale) == (0.7, 3.0)
    assert s.diffusion.temperature == 1.0  # CausalFusion's sampler had no temperature when flat sections were written
    assert s.caption.temperature == 1.0  # a flat temperature was Token-Shuffle's, never the captions'
    assert load_config(path, ["sample.diffusion.steps=7"]).sample.diffusion.steps == 7
    new = tmp_path / "new.yaml"
    new.write_text("sample:\n  diffusion:\n    steps: 20\n")
    assert load_config(new, ["sample.steps=9"]).sample.diffusion.steps == 9


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
    from mmfusion.config import RunConfig

    docs = _config_docs()
    assert docs.main(["--check"]) == 0, "docs/config.md is stale: run python scripts/config_docs.py"
    text = docs.DOC.read_text()
    sections = [(f.name, getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)]
    while sections:
        key, value = sections.pop()
        assert f"## `{key}`" in text  # `## ` for a section, `### ` for a part of one
        for f in dataclasses.fields(value):
            part = getattr(value, f.name)
            if dataclasses.is_dataclass(part):
                sections.append((f"{key}.{f.name}", part))
                continue
            rows = [line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")]
            assert rows and all(line.split(" | ")[3].strip(" |") for line in rows), f"{key}.{f.name}"


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


def test_every_shipped_config_loads_and_sets_nothing_its_data_path_ignores():
    """The configs in mmfusion/configs/ load, and none sets what its own data path would ignore or get
    wrong: a VAE / VQ config trains on tokens encoded ahead of time, as its comments say."""
    from mmfusion.config import check_data_path

    shipped = sorted((Path(__file__).parents[1] / "mmfusion" / "configs").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        cfg = load_config(path)
        check_data_path(cfg, encoded=cfg.image.kind != "pixels")


def test_flips_that_the_data_path_would_ignore_or_get_wrong_are_refused():
    from mmfusion.config import check_data_path

    latents = load_config(None, ["data.hflip=true", "data.source=some/encoded", "image.kind=vae"])
    with pytest.raises(ConfigError, match=r"^data\.hflip: has no effect on tokens encoded ahead of time"):
        check_data_path(latents, encoded=True)
    check_data_path(latents, encoded=False)  # images encoded on the fly are flipped before the VAE
    with pytest.raises(ConfigError, match=r"^data\.hflip: would swap left and right"):
        check_data_path(load_config(None, ["data.hflip=true"]), encoded=False)
