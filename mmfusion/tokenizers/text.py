"""Text tokenizer on Hugging Face `tokenizers`: a byte-level BPE trained on captions, or any
`tokenizer.json` (a LLaMA-3 or Qwen one, say), plus the special tokens mmfusion needs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# our own names for the special tokens, and the names other tokenizers use for the same role
SPECIAL_TOKENS = {
    "pad": ["<|pad|>", "<pad>", "<|finetune_right_pad_id|>"],
    "bos": ["<|bos|>", "<|begin_of_text|>", "<s>", "<|startoftext|>"],
    "eos": ["<|eos|>", "<|end_of_text|>", "</s>", "<|endoftext|>"],
    "boi": ["<|boi|>", "<|vision_start|>", "<|image_start|>"],
    "eoi": ["<|eoi|>", "<|vision_end|>", "<|image_end|>"],
}
DEFAULT_MAX_LEN = 35  # CausalFusion's maximum number of text tokens


def clean_text(text: str | bytes) -> str:
    """Any input becomes valid UTF-8 text: bytes are decoded with replacement, lone surrogates
    (from undecodable file names or surrogateescape) are replaced, surrounding space stripped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text.encode("utf-8", errors="replace").decode("utf-8").strip()


class TextTokenizer:
    """A `tokenizers.Tokenizer` with named special tokens and truncation to `max_len`."""

    def __init__(
        self, tokenizer: Tokenizer, special: dict[str, str] | None = None, max_len: int = DEFAULT_MAX_LEN
    ) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.special = dict(special or {})
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = []
        for role, names in SPECIAL_TOKENS.items():
            if role not in self.special:
                self.special[role] = next((n for n in names if n in vocab), names[0])
            if self.special[role] not in vocab:
                missing.append(self.special[role])
        if missing:
            tokenizer.add_special_tokens(missing)
        self.ids = {role: tokenizer.token_to_id(name) for role, name in self.special.items()}
        # a caption that spells "<|eos|>" is text, not a control token
        tokenizer.encode_special_tokens = True

    # construction -------------------------------------------------------------------------
    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 512, max_len: int = DEFAULT_MAX_LEN, min_frequency: int = 2
    ) -> TextTokenizer:
        """Train a byte-level BPE: every byte is in the alphabet, so no text is out of vocabulary."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        specials = [names[0] for names in SPECIAL_TOKENS.values()]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
        return cls(tok, max_len=max_len)

    @classmethod
    def from_file(
        cls, path: str | Path, special: dict[str, str] | None = None, max_len: int = DEFAULT_MAX_LEN
    ) -> TextTokenizer:
        """Load any `tokenizer.json` (a folder holding one works too); special tokens are found by
        their usual names (ours, LLaMA-3's, ...) and added where missing."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}: train one with `mmfusion tokenizer train`")
        return cls(Tokenizer.from_file(str(path)), special, max_len)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json`, loadable by any `tokenizers` user."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def cannot_take_words(self) -> str | None:
        """Why `with_words` cannot grow this tokenizer (None when it can): it needs a BPE model and a
        pre-tokenizer that splits text into words."""
        kind = type(self.tokenizer.model).__name__
        if kind != "BPE":
            return f"the tokenizer is {kind}, not BPE"
        return None if self.tokenizer.pre_tokenizer is not None else "the tokenizer does not split text into words"

    def word_counts(self, texts: Iterable[str]) -> Counter[str]:
        """How often each word of `texts` occurs, as the tokenizer splits text into words before its
        subwords (byte-level: " orange" is the word 'Ġorange')."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(clean_text(text)))
        return counts

    def word_text(self, word: str) -> str:
        """The text of a `word` as `word_counts` names it ('Ġorange' -> 'orange')."""
        return self.tokenizer.decoder.decode([word]).strip() if self.tokenizer.decoder else word.strip()

    def pieces(self, word: str) -> list[int]:
        """The ids a `word` (as `word_counts` names it) is spelt with."""
        return [token.id for token in self.tokenizer.model.tokenize(word)]

    def with_words(self, words: Iterable[str]) -> TextTokenizer:
        """A copy in which each of `words` (as `word_counts` names them) is one token, with the next free ids
        in their order; every other text is tokenized as before (a word already in the vocabulary keeps
        its token: BPE's merges are skipped only for whole words the vocabulary holds). Only byte-level
        BPE tokenizers (ours, and LLaMA-3's kind) can grow this way."""
        why = self.cannot_take_words()
        if why:
            raise ValueError(f"new words cannot be added: {why}")
        spec = json.loads(self.tokenizer.to_str())
        vocab, next_id = spec["model"]["vocab"], len(self)
        for word in words:
            if word not in vocab:
                vocab[word], next_id = next_id, next_id + 1
        spec["model"]["ignore_merges"] = True
        return TextTokenizer(Tokenizer.from_str(json.dumps(spec)), self.special, self.max_len)

    # use ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str | bytes, max_len: int | None = None) -> list[int]:
        """Token ids of `text` without special tokens, truncated to `max_len` (default: self.max_len)."""
        limit = self.max_len if max_len is None else max_len
        ids = self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids
        return ids[:limit] if limit else ids

    def encode_batch(self, texts: list[str], max_len: int | None = None) -> list[list[int]]:
        return [self.encode(t, max_len) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens dropped, stopping at the first end-of-text."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(int(i))
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    @property
    def bos_id(self) -> int:
        return self.ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.ids["eos"]

    @property
    def boi_id(self) -> int:
        return self.ids["boi"]

    @property
    def eoi_id(self) -> int:
        return self.ids["eoi"]
