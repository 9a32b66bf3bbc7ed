"""Train the text tokenizer of a run on its own captions: a byte-level BPE (`tokenizers`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmfusion.data.datasets import load_captioned
from mmfusion.tokenizers.text import TextTokenizer

TABLE_FILES = (".json", ".jsonl", ".csv", ".parquet")  # files `load_captioned` reads as captioned data


def captions_of(data: str | Path, caption_column: str | None = None) -> Iterator[str]:
    """Every caption of a captioned data set (every split, every caption of an image; `caption_column`
    names the column where the usual names do not find it), or the lines of any other file."""
    path = Path(data)
    if path.is_file() and path.suffix not in TABLE_FILES:
        yield from path.read_text(errors="replace").splitlines()
        return
    for split in load_captioned(str(data), caption_column=caption_column).values():
        for caps in split["captions"]:
            yield from caps


def train_text_tokenizer(
    data: str | Path, out: str | Path, vocab_size: int = 512, max_len: int = 35, caption_column: str | None = None
) -> tuple[TextTokenizer, Path]:
    """A BPE tokenizer trained on the captions of `data` and the tokenizer.json it was saved to (`out`: that
    file's path, or a folder for it)."""
    tok = TextTokenizer.train(captions_of(data, caption_column), vocab_size=vocab_size, max_len=max_len)
    return tok, tok.save(out)
