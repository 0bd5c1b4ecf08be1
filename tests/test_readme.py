"""The README's Python snippet runs as written (on a tiny generated revisitop layout)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _extract_helpers import write_revisitop  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The Python API in one snippet", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    # the real roxford5k ground truth is checked for its 4993 images: a toy dataset gets its own name
    write_revisitop(tmp_path / "data", "toyoxf", n_db=6, n_q=2, long_side=64)
    monkeypatch.chdir(tmp_path)
    # and one scale instead of five keeps the suite fast; everything else runs as printed
    code = _snippet().replace("roxford5k", "toyoxf").replace('parse_scales("cfcd")', 'parse_scales("single")')
    assert "toyoxf" in code and 'parse_scales("single")' in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert ">> toyoxf: mAP" in out
    top5 = eval(out.strip().splitlines()[-1])
    assert len(top5) == 5 and all(i.startswith("db_") for i in top5)
    assert (tmp_path / "index" / "roxf").is_dir() and (tmp_path / "stores" / "roxf.q").is_dir()
