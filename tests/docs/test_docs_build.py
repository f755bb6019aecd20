"""The docs site builds with warnings as errors (what CI runs), and its generated pages hold what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config_page = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert 'id="learner-optim"' in config_page and "peak learning rate" in config_page
    commands_page = (tmp_path / "site" / "reference" / "commands" / "index.html").read_text()
    assert "agentrl doctor" in commands_page and "--print-config" in commands_page
    assert (tmp_path / "site" / "tutorial" / "index.html").exists()


def _python_block(text: str, heading: str) -> str:
    match = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S)
    assert match, heading
    return match.group(1)


def test_the_serving_snippet_is_the_one_the_readme_test_runs() -> None:
    readme = _python_block((REPO / "README.md").read_text(), "### Serving the trained model")
    docs = _python_block((REPO / "docs" / "getting-started.md").read_text(), "## Serving the trained model")
    assert docs == readme
