"""The README's benchmark table, generated from the committed records in ``benchmarks/results/``.

Run: ``python -m benchmarks.table`` (rewrites the README between the marker
comments) or ``python -m benchmarks.table --print``. Each row is one record
(:mod:`benchmarks.record`): the benchmark, its variant, the headline figure,
the target it is measured against, the device, and the command that produced it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.record import RESULTS

BEGIN = "<!-- benchmark-table: begin (python -m benchmarks.table) -->"
END = "<!-- benchmark-table: end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def headline(rec: dict[str, Any]) -> str:
    """The record's main figure(s), as text."""
    if "qt_over_plain_worst" in rec:
        return (f"QT / plain_mt step {_fmt(rec['qt_over_plain_worst'])}x worst, {_fmt(rec['qt_over_plain_top'])}x "
                f"top ({rec.get('ratio_basis', 'wall')} time)")
    if "overhead" in rec:
        return f"{_fmt(rec['img_per_s'])} img/s; overhead over the sum of its parts {100 * rec['overhead']:.0f}%"
    if "img_per_s" in rec:
        return f"{_fmt(rec['img_per_s'])} img/s"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in rec.get("figures", {}).items())


def sizes(rec: dict[str, Any]) -> str:
    """Model, metrics, image size and batch, where the record has them."""
    parts = [rec.get("model"), "+".join(rec.get("metrics", [])) or None]
    side = rec.get("size", rec.get("patch"))
    if side is not None:
        parts.append(f"{side} px")
    if rec.get("batch") is not None:
        parts.append(f"batch {rec['batch']}")
    if rec.get("precision"):
        parts.append(rec["precision"])
    return ", ".join(p for p in parts if p)


def rows(records: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: a header and one row per record."""
    out = ["| benchmark | variant | setting | figure | target | device | command (file) |",
           "|---|---|---|---|---|---|---|"]
    for name, rec in records:
        out.append("| " + " | ".join([
            rec["benchmark"], rec.get("variant", ""), sizes(rec), headline(rec), rec.get("target", ""),
            rec.get("device_name", rec.get("device", "")), f"`{rec.get('command', '')}` ({name})",
        ]) + " |")
    return out


def load(folder: Path = RESULTS) -> list[tuple[str, dict[str, Any]]]:
    """Every record of every ``*.json`` in ``folder``, by file name then order in the file."""
    found = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        for rec in data if isinstance(data, list) else [data]:
            found.append((path.name, rec))
    return found


def splice(text: str, table: list[str]) -> str:
    """``text`` with the lines between :data:`BEGIN` and :data:`END` replaced by ``table``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README: expected the markers {BEGIN!r} ... {END!r}")
    return text[:i + len(BEGIN)] + "\n" + "\n".join(table) + "\n" + text[j:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--print", action="store_true", help="print the table instead of editing the README")
    args = parser.parse_args(argv)
    table = rows(load(args.results))
    if args.print:
        print("\n".join(table))
        return
    args.readme.write_text(splice(args.readme.read_text(), table))
    print(f"{args.readme}: {len(table) - 2} benchmark rows")


if __name__ == "__main__":
    main()
