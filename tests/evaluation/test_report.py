import json

from mmfusion.evaluation.report import write_report


def test_write_report_saves_json_and_markdown(tmp_path):
    results = {"a": {"x": 0.5}}
    table = write_report(tmp_path / "r", "res", results, ["name", "x"], [["a", "50.0%"]])
    assert json.loads((tmp_path / "r" / "res.json").read_text()) == results
    assert (tmp_path / "r" / "res.md").read_text() == table
    assert table.splitlines() == ["| name | x |", "|---|---|", "| a | 50.0% |"]
