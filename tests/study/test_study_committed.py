"""The committed study results are what the committed records render to (a fresh clone can
rebuild docs/study_results.md from docs/study_records.jsonl alone)."""

from pathlib import Path

from torchsage.study.records import load
from torchsage.study.render import render_results

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_results_render_from_the_committed_records(tmp_path):
    text = render_results(*load(DOCS / "study_records.jsonl"), tmp_path)
    assert (DOCS / "study_results.md").read_text() == "# Evidence study: results\n\n" + text
    assert (tmp_path / "study_sensitivity.png").exists()


def test_summary_table_quoted_in_the_docs_is_the_rendered_one():
    # study.md and results.md quote the summary table; a new export must update the quotes too
    rendered = (DOCS / "study_results.md").read_text()
    start = rendered.index("| Method ", rendered.index("**Summary: difference to ERM in every cell**"))
    table = rendered[start : rendered.index("\n\n", start)]
    for page in ("study.md", "results.md"):
        assert table in (DOCS / page).read_text(), f"docs/{page} quotes an outdated summary table"
