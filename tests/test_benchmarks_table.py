"""benchmarks.table: the README's benchmark table from result records (smoke + exception)."""

import json

import pytest

from benchmarks import table

SAMPLE = [
    {"benchmark": "bench_train", "device": "cpu", "device_name": "x86_64 CPU, 2 threads", "model": "U-Net",
     "metrics": ["brisque"], "patch": 96, "batch": 4, "precision": "fp32", "ratio_basis": "cpu",
     "qt_over_plain_worst": 2.91, "qt_over_plain_top": 2.2, "target": "qt_over_plain_worst <= 3",
     "command": "python benchmarks/bench_train.py --json x.json"},
    {"benchmark": "bench_label", "variant": "ours", "device": "cpu", "img_per_s": 1.5, "overhead": 0.12,
     "size": 192, "batch": 8, "command": "python benchmarks/bench_label.py"},
]


def test_smoke(tmp_path):
    (tmp_path / "2026-12-01_cpu_bench.json").write_text(json.dumps(SAMPLE))
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n{table.BEGIN}\nold row\n{table.END}\nafter\n")
    table.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old row" not in text and text.startswith("# t\n\nbefore\n") and text.endswith(f"{table.END}\nafter\n")
    assert "2.91x worst, 2.2x top (cpu time)" in text
    assert "| bench_label | ours |" in text and "overhead over the sum of its parts 12%" in text
    assert "(2026-12-01_cpu_bench.json)" in text
    # idempotent: a second run gives the same README
    table.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == text


def test_exception_no_markers():
    with pytest.raises(ValueError, match="markers"):
        table.splice("no markers here", ["| a |"])
