"""Our caption-metric wrapper returns exactly what pycocoevalcap's COCOEvalCap returns."""

import json
import shutil
from pathlib import Path

import pytest

from mmfusion.evaluation.captions import METRICS, score_captions, score_coco_files

FIXTURES = Path(__file__).parent.parent / "fixtures"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java (CI installs it)")


class _NoSpice:
    """Stands in for SPICE, whose Stanford models cannot be downloaded offline."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@needs_java
def test_wrapper_equals_direct_cocoevalcap(monkeypatch):
    import pycocoevalcap.eval as cocoeval
    from pycocotools.coco import COCO

    monkeypatch.setattr(cocoeval, "Spice", _NoSpice)
    coco = COCO(str(FIXTURES / "coco_captions.json"))
    res = coco.loadRes(str(FIXTURES / "coco_results.json"))
    direct = cocoeval.COCOEvalCap(coco, res)
    direct.params["image_id"] = res.getImgIds()
    direct.evaluate()
    ours = score_coco_files(FIXTURES / "coco_captions.json", FIXTURES / "coco_results.json", spice=False)
    assert set(METRICS) <= set(ours)
    for m in METRICS:
        assert ours[m] == direct.eval[m], m
    assert 0 < ours["CIDEr"] < 10 and ours["Bleu_4"] > 0


@needs_java
def test_identical_candidate_scores_bleu4_one(capfd):
    refs = {1: ["a red circle to the left of a blue square"] * 5, 2: ["a green triangle above a yellow circle"] * 5}
    cands = {1: "a red circle to the left of a blue square", 2: "a green triangle above a yellow circle"}
    s = score_captions(refs, cands, spice=False, meteor=False)
    assert s["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0)
    assert "PTBTokenizer" not in capfd.readouterr().err  # the Java tokenizer's chatter stays off the terminal


def test_java_stderr_is_shown_when_the_call_fails(capfd):
    import os
    import subprocess

    from mmfusion.evaluation.captions import java_stderr_kept

    with java_stderr_kept():
        subprocess.run(["sh", "-c", "echo quiet line >&2"], check=True)
    with pytest.raises(subprocess.CalledProcessError), java_stderr_kept():
        subprocess.run(["sh", "-c", "echo why it failed >&2; exit 3"], check=True)
    os.write(2, b"after\n")  # fd 2 is back
    err = capfd.readouterr().err
    assert "quiet line" not in err and "why it failed" in err and "after" in err


def test_results_file_has_coco_format():
    res = json.loads((FIXTURES / "coco_results.json").read_text())
    assert all(set(r) == {"image_id", "caption"} for r in res)
