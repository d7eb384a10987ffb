"""Every config section a workflow script reads is hashed in its rule's params, so an edit always reruns it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtlib.config.types import Config

WORKFLOW = Path(__file__).resolve().parents[1] / "workflow"
#: Read by scripts but deliberately not a rerun trigger: where a job runs, not what it computes.
NOT_TRIGGERS = {"device"}
RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.S | re.M)


def rules() -> dict[str, tuple[set[str], Path]]:
    """rule name -> (config sections named in slice_json(...) of its params, its script)."""
    out = {}
    for smk in sorted((WORKFLOW / "rules").glob("*.smk")):
        for name, body in RULE.findall(smk.read_text()):
            script = re.search(r'script:\s*\n\s*"([^"]+)"', body)
            if script is None:
                continue
            params = body.split("params:", 1)[1] if "params:" in body else ""
            sections = {s for call in re.findall(r"slice_json\(([^)]*)\)", params)
                        for s in re.findall(r'"(\w+)"', call)}
            out[name] = (sections, (smk.parent / script.group(1)).resolve())
    return out


def test_every_rule_with_a_script_is_found() -> None:
    assert {"demo_data", "prepare_unlabeled", "prepare_paired", "pretrain", "label", "gate", "train",
            "evaluate", "headroom"} <= set(rules())


@pytest.mark.parametrize("rule", sorted(rules()))
def test_params_cover_every_section_the_script_reads(rule: str) -> None:
    sections, script = rules()[rule]
    read = set(re.findall(r"ctx\.cfg\.(\w+)", script.read_text()))
    assert read, f"{script.name}: reads no config section through ctx.cfg (is the pattern still used?)"
    known = set(Config.__dataclass_fields__)
    assert read <= known, f"{script.name}: unknown sections {read - known}"
    missing = read - sections - NOT_TRIGGERS
    assert not missing, f"rule {rule}: {script.name} reads {sorted(missing)} but params hash only {sorted(sections)}"


def test_checker_fails_on_a_missing_section(tmp_path: Path) -> None:
    """The check itself can fail: a script reading a section its rule does not hash is caught."""
    script = tmp_path / "s.py"
    script.write_text("ctx.cfg.train.lr, ctx.cfg.iqa")
    read = set(re.findall(r"ctx\.cfg\.(\w+)", script.read_text()))
    assert read - {"train"} == {"iqa"}
