"""`mmfusion finetune` on captions with a word the base never produced: its token rows train (issue 33)."""

import csv
import dataclasses
import json

import datasets
import pytest
import torch

from mmfusion.errors import UserError
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.finetune import FINETUNED_CFG_SCALE

WORD = "zorblax"  # z, x, ... never occur in the shapes captions: byte tokens the base never produced


@pytest.fixture(scope="module")
def new_word_data(trained_tiny, tmp_path_factory):
    data = datasets.load_from_disk(str(trained_tiny.parent / "data"))
    data = data.map(lambda r: {"captions": [f"a {WORD} {c}" for c in r["captions"]]})
    path = tmp_path_factory.mktemp("zorblax") / "data"
    data.save_to_disk(str(path))
    return str(path)


def _run(model, data, out, **kw):
    from mmfusion.training.finetune import finetune

    args = dict(lora_r=4, lora_alpha=8, steps=6, lr=0.01, batch_size=8, precision="32-true", seed=0, compile=False)
    return finetune(model, data, out, **(args | kw))


def test_new_word_rows_train_alone_and_reload(trained_tiny, new_word_data, tmp_path, capsys):
    from mmfusion.pipeline import MMFusion

    out = tmp_path / "rows"
    report = _run(trained_tiny, new_word_data, out, merge=True, new_tokens="rows", cfg_scale=4.5)  # task joint
    assert "new tokens: the captions use" in capsys.readouterr().out
    saved = json.loads((out / "finetune_report.json").read_text())
    assert saved["new_tokens"] == "rows" and saved["new_token_rows"] == report["new_token_rows"] > 0
    assert (saved["caption_fraction"], saved["text_loss_weight"]) == (0.15, 0.02)
    base = MMFusion.from_pretrained(trained_tiny)
    assert saved["caption_dropout"] == base.objective["caption_dropout"]
    captions = datasets.load_from_disk(new_word_data)["train"]["captions"]
    used = {i for caps in captions for c in caps for i in base.text_tokenizer.encode(c)}
    new = base.text_tokenizer.encode(WORD)
    assert len(used) == report["new_token_rows"]
    adapted = MMFusion.from_pretrained(trained_tiny, adapters=[out])
    merged = MMFusion.from_pretrained(out / "merged")  # the fine-tuned model, folded
    assert report["cfg_scale"] == adapted.sampling.diffusion.cfg_scale == merged.sampling.diffusion.cfg_scale == 4.5
    for name in ("embed_tokens.weight", "lm_head.weight"):
        before, after = base.model.state_dict()[name], adapted.model.state_dict()[name]
        assert torch.equal(after, merged.model.state_dict()[name])
        changed = (before != after).any(dim=1).nonzero().flatten().tolist()
        assert set(new) <= set(changed), name  # the new word's rows moved
        assert set(changed) <= used, name  # only rows the new captions use
        untouched = [i for i in range(before.shape[0]) if i not in used]
        assert torch.equal(before[untouched], after[untouched])  # every other row bit-identical
    ids = torch.tensor(new)
    pipe = MMFusion.from_pretrained(trained_tiny).load_adapter(out, name="a")  # unfused, through peft
    with torch.no_grad():
        hidden = merged.model.embed_tokens(ids)
        torch.testing.assert_close(pipe.model.embed_tokens(ids), hidden)
        torch.testing.assert_close(pipe.model.text_logits(hidden), merged.model.text_logits(hidden))
    with pytest.raises(UserError, match="token rows"):
        pipe.set_adapters({"a": 0.5})


def test_new_words_become_tokens_of_the_adapter_and_leave_with_it(trained_tiny, new_word_data, tmp_path, capsys):
    """The default, `new_tokens="words"`: the new word, spelt in pieces by the base, is one token of the
    adapter's tokenizer, its rows start from its pieces' and train; loading the adapter grows the model and
    puts that tokenizer in use, the merged folder and the unfused adapter agree, and deleting the adapter
    gives the base back bit for bit (its tokenizer too). Such an adapter is used alone."""
    from mmfusion.pipeline import MMFusion

    out = tmp_path / "words"
    report = _run(trained_tiny, new_word_data, out, merge=True)  # task joint, defaults
    printed = capsys.readouterr().out
    # the tiny base's small vocabulary spells some of its own words in pieces as well: they join the new word
    words = report["new_words"]
    assert f"new words: {len(words)} words of the captions are now one token each ('{WORD}', " in printed
    assert report["new_tokens"] == "words" and words[0] == WORD and len(set(words)) == len(words)
    base = MMFusion.from_pretrained(trained_tiny)
    n = len(base.text_tokenizer)
    assert json.loads((out / "mmfusion_adapter.json").read_text())["base_vocab_size"] == n
    captions = datasets.load_from_disk(new_word_data)["train"]["captions"]
    grown = TextTokenizer.from_file(out)
    used = {i for caps in captions for c in caps for i in grown.encode(c)}
    assert report["new_token_rows"] == len(used)  # the rows the captions use, the new words' among them
    assert set(range(n, n + len(words))) <= used
    pieces = base.text_tokenizer.encode(WORD)
    merged = MMFusion.from_pretrained(out / "merged")
    pipe = MMFusion.from_pretrained(trained_tiny).load_adapter(out, name="a")
    for loaded in (merged, pipe, MMFusion.from_pretrained(trained_tiny, adapters=[out])):
        assert loaded.text_tokenizer.encode(f"a {WORD} red circle")[1] == n  # one token, the next id
        assert loaded.model.cfg.vocab_size == len(loaded.text_tokenizer) == n + len(words)
    ids = torch.tensor([n, *pieces])
    with torch.no_grad():
        hidden = merged.model.embed_tokens(ids)
        torch.testing.assert_close(pipe.model.embed_tokens(ids), hidden)
        torch.testing.assert_close(pipe.model.text_logits(hidden), merged.model.text_logits(hidden))
        start = base.model.embed_tokens(torch.tensor(pieces)).mean(0)
        assert not torch.allclose(hidden[0], start)  # the word's own row trained away from its start
    assert merged.caption([datasets.load_from_disk(new_word_data)["test"][0]["image"]], max_new_tokens=4)
    with pytest.raises(UserError, match="adds words to the text vocabulary"):
        pipe.load_adapter(out, name="b")
    pipe.disable_adapters()  # the base alone: its tokenizer, and only its own ids come out of the text head
    assert len(pipe.text_tokenizer) == n and pipe.model.text_logits(hidden).shape[-1] == n
    assert pipe.caption([datasets.load_from_disk(new_word_data)["test"][0]["image"]], max_new_tokens=4)
    pipe.enable_adapters()
    assert len(pipe.text_tokenizer) == n + len(words) and pipe.model.text_logits(hidden).shape[-1] == n + len(words)
    pipe.delete_adapter("a")
    assert pipe.text_tokenizer is not None and len(pipe.text_tokenizer) == n and pipe.model.cfg == base.model.cfg
    for (name, a), (_, b) in zip(pipe.model.state_dict().items(), base.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="weight 1"):  # refused before anything changes
        pipe.load_adapter(out, weight=0.5)
    assert pipe.model.cfg == base.model.cfg and len(pipe.text_tokenizer) == n
    fused = MMFusion.from_pretrained(trained_tiny, adapters=[out])  # the words are the model's now
    with pytest.raises(UserError, match=f"trained on a vocabulary of {n} tokens"):
        fused.load_adapter(out)


def test_full_fine_tuning_saves_the_grown_vocabulary_in_its_folder(trained_tiny, new_word_data, tmp_path):
    from mmfusion.pipeline import MMFusion

    report = _run(trained_tiny, new_word_data, tmp_path / "full", full=True, steps=2)
    assert report["new_words"][0] == WORD and report["mode"] == "full" and report["new_tokens"] == "words"
    model = MMFusion.from_pretrained(tmp_path / "full")
    n = len(MMFusion.from_pretrained(trained_tiny).text_tokenizer)
    assert model.model.cfg.vocab_size == len(model.text_tokenizer) == n + len(report["new_words"])
    assert model.text_tokenizer.encode(WORD) == [n]
    assert len(model.generate([f"a {WORD} red circle"], steps=2)) == 1
    # the folder samples at the fine-tuned models' guidance scale (the adapter records it instead: test_lora)
    assert model.sampling.diffusion.cfg_scale == report["cfg_scale"] == FINETUNED_CFG_SCALE


def test_new_word_text_loss_falls_further_than_without_rows(trained_tiny, new_word_data, tmp_path):
    losses = {}
    for mode in ("rows", "off"):
        report = _run(trained_tiny, new_word_data, tmp_path / mode, task="caption", new_tokens=mode)
        assert report["new_tokens"] == mode and (report["caption_fraction"], report["text_loss_weight"]) == (1, 1)
        losses[mode] = report["final_losses"]["train/text_loss"]
    assert losses["rows"] < losses["off"] - 0.5, losses


def test_finetune_holds_the_rate_then_brings_it_down_over_the_last_fifth(trained_tiny, new_word_data, tmp_path):
    """Fine-tuning's schedule is wsd: the rate logged at step 9 of 20 is the one asked for, at step 19 (in
    the last fifth) between a tenth and half of it; the report records the schedule."""
    report = _run(trained_tiny, new_word_data, tmp_path / "a", steps=20, lr=0.01)
    assert report["lr_schedule"] == "wsd" and report["steps"] == 20
    with open(next((tmp_path / "a" / "run").glob("logs/*/metrics.csv"))) as f:
        lr = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r["lr-AdamW/pg1"]}
    assert lr[9] == pytest.approx(0.01)
    assert 0.001 <= lr[19] < 0.005, lr


def test_finetune_reads_the_columns_it_is_told(trained_tiny, tmp_path):
    """Data whose captions sit in a column no usual name finds: refused by name without
    `caption_column`, fine-tuned on with it (the new word's rows then train)."""
    data = datasets.load_from_disk(str(trained_tiny.parent / "data"))
    renamed = data.map(
        lambda r: {"words": [f"a {WORD} {c}" for c in r["captions"]]}, remove_columns=["captions", "text"]
    )
    renamed.save_to_disk(str(tmp_path / "data"))
    with pytest.raises(UserError, match=r"^data\.caption_column: "):
        _run(trained_tiny, str(tmp_path / "data"), tmp_path / "a", task="caption")
    report = _run(trained_tiny, str(tmp_path / "data"), tmp_path / "b", task="caption", caption_column="words")
    assert report["steps"] == 6 and report["new_token_rows"] > 0


def test_replay_mixes_the_bases_own_rows_into_the_training_split(trained_tiny, new_word_data, tmp_path):
    """`replay=0.25`: a quarter of the training rows are the base's (rendered shapes for a shapes base),
    the rest the new data; the held-out splits stay the new data's; the report records it."""
    from mmfusion.training.finetune import replay_mix

    new = datasets.load_from_disk(new_word_data)
    path = replay_mix(
        new_word_data,
        0.25,
        None,
        "shapes",
        dict.fromkeys(("image_root", "image_column", "caption_column")),
        tmp_path,
        0,
    )
    mixed = datasets.load_from_disk(path)
    n_new = len(new["train"])
    assert len(mixed["train"]) == n_new + round(n_new / 3)
    with_word = sum(any(WORD in c for c in caps) for caps in mixed["train"]["captions"])
    assert with_word == sum(any(WORD in c for c in caps) for caps in new["train"]["captions"])
    assert len(mixed["train"]) - with_word >= round(n_new / 3)  # the replayed rows carry no new word
    assert len(mixed["test"]) == len(new["test"])
    with pytest.raises(UserError, match="--replay needs --replay-data"):
        replay_mix(new_word_data, 0.25, None, "my-photos", {}, tmp_path / "b", 0)
    with pytest.raises(UserError, match=r"within \(0, 1\)"):
        replay_mix(new_word_data, 1.5, None, "shapes", {}, tmp_path / "c", 0)
    report = _run(trained_tiny, new_word_data, tmp_path / "run", replay=0.25)  # the joint task
    assert report["replay"] == 0.25 and report["steps"] == 6
    assert (report["caption_fraction"], report["text_loss_weight"]) == (0.15, 0.02)  # the joint task's own


def test_the_joint_tasks_caption_share_and_text_weight():
    from mmfusion.config import ObjectiveConfig
    from mmfusion.training.finetune import task_objective

    base = dataclasses.asdict(ObjectiveConfig())
    joint = task_objective(base, "joint")
    assert (joint.t2i_fraction, joint.text_loss_weight) == (0.85, 0.02)
    assert task_objective(base, "joint", text_loss_weight=0.3).text_loss_weight == 0.3
    assert task_objective(base, "joint", caption_fraction=0.1).t2i_fraction == pytest.approx(0.9)
    assert task_objective(base, "t2i").t2i_fraction == 1.0
    assert task_objective(base, "caption").t2i_fraction == 0.0


def test_caption_dropout_is_the_bases_unless_given():
    from mmfusion.config import ObjectiveConfig
    from mmfusion.training.finetune import task_objective

    base = dataclasses.asdict(ObjectiveConfig(caption_dropout=0.15))
    for task in ("joint", "t2i"):
        assert task_objective(base, task).caption_dropout == 0.15
        assert task_objective(base, task, caption_dropout=0.3).caption_dropout == 0.3
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="--caption-dropout"):
            task_objective(base, "joint", caption_dropout=bad)
