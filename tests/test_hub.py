"""Model folders on the Hugging Face Hub: loading by id from the hub's cache (offline: nothing is
downloaded here), the model card, and config.json's format version."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmfusion import hub
from mmfusion.errors import UserError
from mmfusion.pipeline import MMFusion

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT, OTHER = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"


def hub_cache(root, repo_id, snapshots, main):
    """A hub cache as huggingface_hub lays it out: models--owner--name/refs/main holding the commit of
    main, snapshots/<commit>/ holding that commit's files (here copies, not links into blobs/)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return root


def same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def cached(trained_tiny, tmp_path, monkeypatch):
    """`someone/tiny` in a hub cache in tmp_path: main is the trained model, OTHER a changed copy; offline."""
    changed = MMFusion.from_pretrained(trained_tiny)
    with torch.no_grad():
        changed.model.embed_tokens.weight.add_(1.0)
    changed.save_pretrained(tmp_path / "changed")
    cache = hub_cache(tmp_path / "hub", "someone/tiny", {COMMIT: trained_tiny, OTHER: tmp_path / "changed"}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_loads_from_the_cache_offline_at_main_or_a_commit(trained_tiny, cached, monkeypatch):
    folder = MMFusion.from_pretrained(trained_tiny)
    by_id = MMFusion.from_pretrained("someone/tiny", cache_dir=cached)
    assert same_weights(by_id, folder)
    assert same_weights(MMFusion.from_pretrained("someone/tiny", cache_dir=cached, revision=COMMIT), folder)
    other = MMFusion.from_pretrained("someone/tiny", cache_dir=cached, revision=OTHER)
    assert not same_weights(other, folder)
    # the default cache is huggingface_hub's (HF_HUB_CACHE, which it reads when imported)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cached))
    assert same_weights(MMFusion.from_pretrained("someone/tiny", local_files_only=True), folder)
    images = by_id.generate(["a red circle"], steps=2)
    assert images[0].size == (32, 32)


def test_a_folder_wins_over_a_hub_id_of_the_same_name(trained_tiny, tmp_path, monkeypatch):
    shutil.copytree(trained_tiny, tmp_path / "someone" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(MMFusion.from_pretrained("someone/tiny"), MMFusion.from_pretrained(trained_tiny))
    with pytest.raises(UserError, match="model folder nothing/here does not exist"):
        MMFusion.from_pretrained("./nothing/here")


def test_what_is_not_in_the_cache_offline_is_a_one_line_error(cached, monkeypatch):
    def problem(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with pytest.raises(UserError) as err:
            MMFusion.from_pretrained(*args, cache_dir=cached, **kwargs)
        assert "\n" not in str(err.value)
        return str(err.value)

    message = problem("someone/other")
    assert "not in the hub cache" in message and "HF_HUB_OFFLINE=1" in message and "network" in message
    assert "revision v2" in problem("someone/tiny", revision="v2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    assert "local_files_only" in problem("someone/other", local_files_only=True)


def test_the_cli_loads_a_hub_id_at_a_revision(cached, tmp_path, monkeypatch, capsys):
    from mmfusion.cli.main import main

    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cached))
    out = tmp_path / "gen"
    args = ["generate", "--model", "someone/tiny", "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    assert main([*args, "--revision", OTHER]) == 0 and (out / "0000.png").is_file()
    assert main(["caption", str(out / "0000.png"), "--model", "someone/tiny", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["caption", str(out / "0000.png"), "--model", "nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nobody/nothing is not a folder here") and "\n" not in err


def test_the_hub_download_takes_the_bundled_image_tokenizer():
    from huggingface_hub.utils import filter_repo_objects

    files = ["config.json", "model.safetensors", "tokenizer.json", "README.md", "image_tokenizer/vae/config.json"]
    files += ["image_tokenizer/vae/diffusion_pytorch_model.safetensors", "runs/last.ckpt", "notes.txt"]
    assert list(filter_repo_objects(files, allow_patterns=hub.HUB_FILES)) == files[:6]


def front_matter(card):
    head, meta, body = card.split("---\n", 2)
    assert head == ""
    return yaml.safe_load(meta), body


def test_a_model_folder_carries_a_model_card(trained_tiny, tmp_path):
    from mmfusion.training.demo import card_metrics

    meta, body = front_matter((trained_tiny / "README.md").read_text())
    assert meta["library_name"] == "mmfusion" and meta["pipeline_tag"] == "text-to-image"
    assert {"image-to-text", "causalfusion"} <= set(meta["tags"]) and "datasets" not in meta
    assert "Training data: shapes" in body and "## Results" not in body
    metrics = {
        "t2i": {"S1": {"single": {"accuracy": 0.75, "n": 64}, "pair": {"accuracy": 0.5}}},
        "caption": {"content": {"single": {"accuracy": 0.9}}, "CIDEr": 1.234, "Bleu_4": 0.4},
        "sampler": {"order": "random"},
    }
    figures = card_metrics(metrics)
    assert figures["T2I S1: one object, accuracy"] == 0.75 and figures["captions: CIDEr"] == 1.234
    MMFusion.from_pretrained(trained_tiny).save_pretrained(tmp_path / "m", metrics=figures)
    meta, body = front_matter((tmp_path / "m" / "README.md").read_text())
    assert meta["library_name"] == "mmfusion"
    assert "| T2I S1: two objects + relation, accuracy | 0.5 |" in body and "| captions: CIDEr | 1.234 |" in body
    hub.write_model_card(tmp_path / "m")  # rewritten without figures
    assert "## Results" not in (tmp_path / "m" / "README.md").read_text()


def test_config_names_its_model_type_and_format_version(trained_tiny):
    config = json.loads((trained_tiny / "config.json").read_text())
    assert config["model_type"] == "mmfusion" and config["format_version"] == hub.FORMAT_VERSION == 2
    assert "format" not in config and config["training_data"] == "shapes"
    old = hub.migrate({"format": "mmfusion", "model": {}})  # what folders before version 2 hold
    assert old == {"model_type": "mmfusion", "format_version": 2, "model": {}}


def test_a_folder_of_a_newer_format_or_another_model_type_is_refused(trained_tiny, tmp_path):
    folder = shutil.copytree(trained_tiny, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(UserError, match="format version 3, newer than this mmfusion reads .up to 2.: upgrade"):
        MMFusion.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' model, not an mmfusion model folder"):
        MMFusion.from_pretrained(folder)


def test_a_folder_written_today_loads_with_the_next_format_version(trained_tiny, tmp_path, monkeypatch):
    """The next version adds its step to MIGRATIONS; today's folders (and older ones) then reach its
    reader through the chain. Simulated: version 3, whose step from 2 only stamps the new version."""
    steps = []

    def two_to_three(config):  # noqa: ANN001, ANN202
        steps.append(config["format_version"])
        return {**config, "format_version": 3}

    monkeypatch.setattr(hub, "FORMAT_VERSION", 3)
    monkeypatch.setitem(hub.MIGRATIONS, 2, two_to_three)
    today = MMFusion.from_pretrained(trained_tiny)
    assert steps == [2]
    MMFusion.from_pretrained(FIXTURES / "model_2026_12_05")  # version 1: 1 -> 2 -> 3
    assert steps == [2, 2]
    today.save_pretrained(tmp_path / "v3")  # written by version 3: read with no step
    assert json.loads((tmp_path / "v3" / "config.json").read_text())["format_version"] == 3
    assert same_weights(MMFusion.from_pretrained(tmp_path / "v3"), today) and steps == [2, 2]
