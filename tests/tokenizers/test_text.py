import pytest

from mmfusion.tokenizers.text import TextTokenizer

CAPTIONS = ["a red circle", "a blue square to the left of a green triangle", "a yellow circle above a red square"] * 20
ODD = [
    "",
    "   ",
    "🙂🚀 emoji",
    "tab\tnew\nline \x00\x07\x1b[31m",
    "ünïcödé 中文 テキスト",
    "x" * 5000,
    "caf\udcff",
    "a red circle",
]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


@pytest.mark.parametrize("text", ODD)
def test_odd_text_round_trips(tok, text):
    ids = tok.encode(text, max_len=0)  # 0: no truncation
    assert all(0 <= i < len(tok) for i in ids)
    expected = text.encode("utf-8", "replace").decode("utf-8").strip()
    assert tok.decode(ids) == expected


def test_bytes_that_are_not_utf8(tok):
    ids = tok.encode(b"\xff\xfe a red circle")
    assert tok.decode(ids).endswith("a red circle")


def test_truncation_to_max_len(tok):
    assert len(tok.encode("x " * 500)) == 35
    assert len(tok.encode("x " * 500, max_len=7)) == 7


def test_special_tokens_are_distinct_and_not_produced_by_text(tok):
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id}
    assert len(specials) == 5
    spelled = tok.encode("<|bos|> <|eoi|> hello", max_len=0)
    assert not specials & set(spelled)
    assert tok.decode(spelled) == "<|bos|> <|eoi|> hello"
    # decoding drops specials and stops at end-of-text
    ids = [tok.bos_id, *tok.encode("a red circle"), tok.eos_id, *tok.encode("junk")]
    assert tok.decode(ids) == "a red circle"


def test_save_load_and_foreign_tokenizer(tok, tmp_path):
    path = tok.save(tmp_path)
    again = TextTokenizer.from_file(path)
    assert again.encode("a red circle") == tok.encode("a red circle")
    assert again.ids == tok.ids
    # a tokenizer.json with other special-token names (LLaMA-3 style) gets ours added where missing
    from tokenizers import Tokenizer, models, pre_tokenizers

    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    foreign.save(str(tmp_path / "llama.json"))
    t = TextTokenizer.from_file(tmp_path / "llama.json")
    assert t.special["bos"] == "<|begin_of_text|>" and t.special["eos"] == "<|end_of_text|>"
    assert t.boi_id is not None and t.eoi_id is not None and t.pad_id is not None


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmfusion tokenizer train"):
        TextTokenizer.from_file(tmp_path / "nope")


def test_new_words_become_one_token_and_nothing_else_changes(tok):
    """`with_words`: each new word (as `word_counts` names it) is one token, with the next ids in order,
    wherever it stands in a caption; every word the vocabulary already held, and every other text, is
    tokenized as before; decoding gives the text back."""
    texts = ["a purple seven above an orange three", "Seven purple circles"]
    counts = tok.word_counts(texts)
    assert counts["Ġpurple"] == 2 and counts["Ġseven"] == 1 and counts["ĠSeven"] == 1
    assert len(tok.pieces("Ġpurple")) > 1
    grown = tok.with_words(["Ġpurple", "Ġseven", "Ġred"])  # red is already one token: it keeps its id
    assert len(grown) == len(tok) + 2
    purple, seven = len(tok), len(tok) + 1
    ids = grown.encode(texts[0])
    assert ids.count(purple) == 1 and ids.count(seven) == 1 and len(ids) < len(tok.encode(texts[0]))
    assert grown.encode("purple") == [purple]  # the first word too (a space is added before it)
    assert grown.decode(ids) == texts[0]
    assert grown.encode("Seven purples") != [seven, purple]  # other words are not matched inside
    for text in [*CAPTIONS, *ODD, *(w.replace("Ġ", " ") for w in tok.tokenizer.get_vocab())]:
        assert grown.encode(text, max_len=0) == tok.encode(text, max_len=0), text
    assert grown.ids == tok.ids  # the special tokens keep theirs


def test_a_tokenizer_that_cannot_take_words_says_why(tok):
    from tokenizers import Tokenizer, models

    assert tok.cannot_take_words() is None
    level = TextTokenizer(Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    assert "WordLevel" in level.cannot_take_words()
    bare = Tokenizer(models.BPE())  # no pre-tokenizer: text is not split into words (LLaMA-2's layout)
    assert "words" in TextTokenizer(bare).cannot_take_words()
    with pytest.raises(ValueError, match="cannot be added"):
        TextTokenizer(bare).with_words(["x"])
