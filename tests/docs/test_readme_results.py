"""The README's Results table is computed from benchmarks/results/ (docs/readme_results.py), never typed in."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

import readme_results  # noqa: E402


def _results_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]


def test_readme_results_table_is_what_the_files_say():
    table = readme_results.markdown_table()
    assert table in _results_section(), ("README's Results table differs from the files; regenerate it: "
                                         "python docs/readme_results.py")


def test_results_section_is_one_table_and_one_figure_with_no_other_number():
    section = _results_section()
    assert section.count("\n|---") == 1 and section.count("![") == 1
    assert (ROOT / "docs" / "img" / "results.png").read_bytes()[:4] == b"\x89PNG"
    prose = section.replace(readme_results.markdown_table(), "")
    numbers = re.findall(r"(?<![§\w.-])\d+(?:\.\d+)?(?![\w])", prose)
    assert set(numbers) <= {"75", "3", "8"}, f"numbers outside the table need a file: {numbers}"


def test_every_row_reads_its_file_and_rtl_is_within_range():
    rows = readme_results.rows()
    assert len(rows) == 5
    for r in rows:
        assert r["rtl"] > 0 and r["single"] > 0 and r["rtl_params"] > 0 and r["single_params"] > 0
        if r["multi"] is not None:
            assert r["rtl_params"] < r["multi_params"]  # the union of K tickets is smaller than K models
