"""The README's quick start runs as written: the first Python block after "## Quick start", in a fresh folder."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes ckpt/ where it runs
    exec(compile(code, "README.md quick start", "exec"), {})
    assert (tmp_path / "ckpt" / "config.json").is_file()
