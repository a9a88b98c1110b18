"""The release workflow (.github/workflows/) as actionlint sees it, through scripts/actionlint (the lint
step of scripts/test): ours has no finding, and a workflow with a mistake is reported with its line and
exit code 1, so the lint step can fail."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = REPO / "scripts" / "actionlint"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="needs node and npm"),
]


def _lint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), *map(str, files)], capture_output=True, text=True, timeout=170)


def test_the_release_workflow_lints_clean() -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflow in .github/workflows"
    result = _lint(*workflows)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(workflows)} file(s), 0 finding(s)" in result.stdout


def test_a_workflow_mistake_is_reported_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.no_such_property }}\n"
    )
    result = _lint(bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{bad}:6:" in result.stdout and "no_such_property" in result.stdout
