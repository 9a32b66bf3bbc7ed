"""Caption metrics through pycocoevalcap: PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L, CIDEr, and
SPICE where its Stanford models are present.

`COCOEvalCap.evaluate()` always builds SPICE, which downloads Stanford CoreNLP and so fails offline
before scoring anything; we run the same scorers on the same tokenized captions ourselves and add
SPICE only when its jars are installed (a test checks equality with a direct COCOEvalCap call).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfusion.data.datasets import load_captioned
from mmfusion.errors import UserError
from mmfusion.evaluation.report import write_json

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars in pycocoevalcap's spice/lib (fetched by its get_stanford_models)."""
    import pycocoevalcap.spice.spice as spice_mod

    lib = Path(spice_mod.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*-models.jar"))


def _require_java() -> None:
    if not java_available():
        raise UserError(
            "caption metrics need Java for the PTB tokenizer and METEOR: install it with "
            "`apt-get install -y default-jre-headless` (Debian/Ubuntu)"
        )


@contextlib.contextmanager
def java_stderr_kept() -> Iterator[None]:
    """The PTB tokenizer's Java process writes a line per call to the terminal ("PTBTokenizer tokenized
    53586 tokens at ..."). Its stderr (file descriptor 2, shared with this process) goes to a temporary
    file instead, which is shown if the call fails."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def score_captions(
    references: dict[Any, list[str]],
    candidates: dict[Any, str],
    spice: bool | None = None,
    meteor: bool = True,
    verbose: bool = False,
) -> dict[str, float]:
    """Corpus scores for candidates[id] against references[id] (pycocoevalcap scale: CIDEr 1.0 = "100").

    `spice`: None runs SPICE only when its models are present (else it is skipped with a message).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _require_java()
    missing = [k for k in candidates if k not in references]
    if missing:
        raise UserError(f"{len(missing)} candidate ids have no references (e.g. {missing[0]!r})")
    ids = list(candidates)
    tok = PTBTokenizer()
    with java_stderr_kept():
        gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tok.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    scorers: list[tuple[Any, Any]] = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if meteor:
        scorers.append((Meteor(), "METEOR"))
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if spice or (spice is None and spice_available()):
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    elif spice is None and verbose:
        print("SPICE skipped: its Stanford CoreNLP models are not installed (pycocoevalcap/spice/lib)")
    out: dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
            score, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
        else:
            out[names] = float(score)
    return out


def score_coco_files(annotations: str | Path, results: str | Path, **kwargs: Any) -> dict[str, float]:
    """Score a COCO results file ([{image_id, caption}]) against COCO caption annotations."""
    ann = json.loads(Path(annotations).read_text())
    res = json.loads(Path(results).read_text())
    refs: dict[Any, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    cands = {r["image_id"]: r["caption"] for r in res}
    return score_captions(refs, cands, **kwargs)


def run_caption_benchmark(
    pipe: Any, rows: Any, out: str | Path, settings: Any = None, batch_size: int = 32, spice: bool | None = None
) -> dict[str, float]:
    """Caption the images of `rows` (a split with `image` and `captions` columns, `image_id` if it has
    one) and score them against their references with pycocoevalcap; writes OUT/captions_results.json
    (COCO results format) and OUT/caption_metrics.json, and returns the metrics."""
    caps = pipe.caption(list(rows["image"]), batch_size=batch_size, progress=True, settings=settings)
    ids = rows["image_id"] if "image_id" in rows.column_names else list(range(len(rows)))
    metrics = score_captions(dict(zip(ids, rows["captions"])), dict(zip(ids, caps)), spice=spice, verbose=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "captions_results.json", [{"image_id": i, "caption": c} for i, c in zip(ids, caps)])
    write_json(out / "caption_metrics.json", metrics)
    return metrics


def caption_split(
    data: str,
    split: str,
    image_root: str | None = None,
    limit: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Any:
    """The first `limit` rows (all by default) of `split` of any captioned data `load_captioned` reads."""
    ds = load_captioned(data, image_root, image_column, caption_column)
    if split not in ds:
        raise UserError(f"split {split!r} not in {data} (has: {', '.join(ds)})")
    return ds[split] if limit is None else ds[split].select(range(min(limit, len(ds[split]))))
