"""Training the text tokenizer on a data set's captions or on a text file of captions."""

from mmfusion.data.shapes import build_shapes
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.tokenizer import captions_of, train_text_tokenizer


def test_captions_of_reads_every_caption_of_every_split_or_every_line(tmp_path):
    ds = build_shapes(n=40, seed=0)
    ds.save_to_disk(str(tmp_path / "d"))
    expected = [c for split in ds.values() for caps in split["captions"] for c in caps]
    assert list(captions_of(tmp_path / "d")) == expected
    (tmp_path / "caps.txt").write_text("a red circle\na blue square above a green triangle\n")
    assert list(captions_of(tmp_path / "caps.txt")) == ["a red circle", "a blue square above a green triangle"]


def test_a_trained_tokenizer_is_saved_and_loads_back(tmp_path):
    (tmp_path / "caps.txt").write_text("\n".join(["a red circle to the left of a blue square"] * 20))
    tok, path = train_text_tokenizer(tmp_path / "caps.txt", tmp_path / "tok", vocab_size=300, max_len=12)
    assert path == tmp_path / "tok" / "tokenizer.json"
    again = TextTokenizer.from_file(path, max_len=12)
    text = "a red circle to the left of a blue square"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text


def test_captions_of_a_table_file_with_a_named_column(tmp_path):
    """A csv of captions is captioned data, read through `datasets`, its column named where the usual
    names would not find it; the same captions as a text file, one per line, give the same tokenizer."""
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    rows = ["a red circle", "a blue square above a red circle"]
    (tmp_path / "train.csv").write_text("path,words\n" + "".join(f"a.png,{r}\n" for r in rows))
    assert list(captions_of(tmp_path / "train.csv", caption_column="words")) == rows
    (tmp_path / "caps.lst").write_text("\n".join(rows))
    assert list(captions_of(tmp_path / "caps.lst")) == rows
