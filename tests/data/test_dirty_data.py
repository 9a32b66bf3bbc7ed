"""Dirty data never crashes training: bad rows are skipped and counted, odd images are converted."""

import json

import numpy as np
import torch
from PIL import Image

from mmfusion.data.shapes import render_example
from mmfusion.image_io import to_tensor


def _dirty_folder(root):
    root.mkdir()
    rows = []
    for i in range(24):  # good rows
        ex = render_example(0, "train", i)
        ex["image"].save(root / f"good{i}.png")
        rows.append({"file_name": f"good{i}.png", "captions": ex["captions"]})
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    good = (root / "good0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (32, 32), 128).save(root / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "rgba.png")
    Image.new("P", (32, 32), 3).save(root / "palette.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(root / "deep16.png")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(root / "tiny.png")
    Image.new("RGB", (2000, 1500), (0, 255, 0)).save(root / "huge.png")
    odd = [
        ("corrupt.png", ["a red circle"]),
        ("truncated.png", ["a red circle"]),
        ("missing.png", ["a red circle"]),
        ("gray.png", ["a gray square"]),
        ("rgba.png", ["a clear image"]),
        ("palette.png", ["a palette image"]),
        ("deep16.png", ["a 16 bit image"]),
        ("tiny.png", ["a tiny image"]),
        ("huge.png", ["a huge image"]),
        ("good1.png", [""]),
        ("good2.png", ["   \t "]),
        ("good3.png", ["word " * 3000]),
    ]
    rows += [{"file_name": f, "captions": c} for f, c in odd]
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"file_name": "good4.png", "text": "bad bytes \xff\xfe here"}')  # not UTF-8
    lines.append(b"{not json")
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def test_odd_image_modes_become_rgb():
    assert to_tensor(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 8).min() == 1.0  # transparent -> white
    deep = to_tensor(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), 8)
    assert deep.shape == (3, 8, 8) and deep.min() == 1.0
    assert to_tensor(Image.new("P", (3, 5)), 16).shape == (3, 16, 16)
    assert to_tensor(Image.new("L", (1, 1), 0), 4).max() == -1.0


def test_training_survives_dirty_data(tmp_path, capsys):
    from mmfusion.cli.main import main
    from tests.conftest import TINY_RUN

    data = _dirty_folder(tmp_path / "dirty")
    code = main(
        [
            "train",
            *TINY_RUN,
            f"data.source={data}",
            "data.batch_size=12",
            "train.max_steps=8",
            f"train.out={tmp_path / 'run'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    line = next(x for x in out.splitlines() if x.startswith("skipped"))
    # corrupt, truncated and missing files; empty and whitespace-only captions
    assert "skipped 5 unusable rows" in line, line
    assert "no usable caption: 2" in line and "unreadable image" in line


def test_row_cache_returns_what_uncached_reads_return(tmp_path):
    """Cached rows (decoded once, image kept as uint8) equal fresh reads, skipped rows included."""
    from mmfusion.data.datamodule import CaptionedImages
    from mmfusion.data.datasets import load_captioned
    from mmfusion.tokenizers.text import TextTokenizer

    split = load_captioned(_dirty_folder(tmp_path / "dirty"))["train"]
    tok = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    plain, cached = (CaptionedImages(split, tok, 16, 35, cache=c) for c in (False, True))
    for _ in range(2):  # the second pass is served from the cache
        for i in range(len(split)):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys(), i
            for key in a:
                if key == "image":
                    assert torch.equal(a[key], b[key]), i
                else:
                    assert a[key] == b[key], (i, key)
    assert len(cached.cache) == len(split) and plain.cache is None


def test_two_processes_report_the_rows_both_skipped_once(tmp_path):
    """2-process DDP on dirty data: one summary line, for the rows either process skipped (the same as a
    1-process run over the same global batches), one precision choice and one 'model written' line."""
    import os
    import subprocess
    import sys

    from tests.conftest import TINY_RUN

    data = _dirty_folder(tmp_path / "dirty")
    run = [*TINY_RUN, f"data.source={data}", "data.global_batch_size=12", "train.max_steps=2", "train.precision=auto"]
    from mmfusion.training.trainer import AUTO_PRECISION_ENV

    env = {k: v for k, v in os.environ.items() if k != AUTO_PRECISION_ENV} | {"OMP_NUM_THREADS": "1"}

    def train(out, *extra):
        cmd = [sys.executable, "-m", "mmfusion.cli.main", "train", *run, f"train.out={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [x for x in proc.stdout.splitlines() if not x.startswith("training")]

    one = train(tmp_path / "one")
    two = train(tmp_path / "two", "train.devices=2", "train.strategy=ddp")
    summary = lambda lines: [x for x in lines if x.startswith(("skipped", "no rows skipped"))]  # noqa: E731
    assert len(summary(two)) == 1 and summary(two) == summary(one), (one, two)
    assert summary(one)[0].startswith("skipped")  # the two steps did meet bad rows
    assert sum(x.startswith("model written to") for x in two) == 1
    # one line on what was trained, the same samples and tokens as the one process (the times differ)
    trained = lambda lines: [x.split(" in ")[0] for x in lines if x.startswith("trained ")]  # noqa: E731
    assert len(trained(two)) == 1 and trained(two) == trained(one) and trained(one)[0].startswith("trained 2 steps (")
    assert sum(x.startswith("precision auto") for x in two) == 1


def test_decoded_rows_give_the_batches_of_row_reads(tmp_path):
    """Rows decoded once into tensors (read in chunks, a chunk with a bad row re-read row by row) give
    the batches that reading each row gives: the same images, captions, labels and skipped rows."""
    from mmfusion.data.datamodule import CaptionedImages, DecodedRows, collate_items, pick_captions
    from mmfusion.data.datasets import load_captioned
    from mmfusion.tokenizers.text import TextTokenizer

    split = load_captioned(_dirty_folder(tmp_path / "dirty"))["train"]
    tok = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    rows = CaptionedImages(split, tok, 16, 35)
    decoded = DecodedRows(rows.read_all(chunk=7))
    assert len(decoded) == len(split) and len(decoded.skip) >= 5
    for indices in ([0, 1, 2], list(range(len(split)))[::-1], [30, 3, 25, 26, 24]):
        a, b = collate_items([rows[i] for i in indices]), collate_items(decoded.__getitems__(indices))
        assert a["skipped"] == b["skipped"] and torch.equal(a["index"], b["index"])
        assert torch.equal(a["labels"], b["labels"])
        assert a["size"] == b["size"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["caption_counts"], b["caption_counts"])
        gens = [torch.Generator().manual_seed(i) for i in a["index"].tolist()]
        picked_a = pick_captions(a, gens)
        gens = [torch.Generator().manual_seed(i) for i in b["index"].tolist()]
        assert picked_a == pick_captions(b, gens)
    every = collate_items([rows[i] for i in range(len(split))])
    assert max(every["caption_counts"].tolist()) > 1  # rows with several captions: the draw matters
