"""The lessons' format, checked without running them (make test executes both editions separately).

What a teacher and a reader rely on: figures shown where they are made and embedded in the markdown, exercises in
the blank / solution / check form that `make student` turns into a student's edition, check cells that ask the
package rather than re-type the solution, prerequisites first and references last, outputs cleared in git.
Also the grading helper `teaching.cmp` and the edition writer `minijamba.student`.
"""

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from minijamba import student
from minijamba.teaching import cmp, is_blank

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb"))
MAX_CELLS = 35


def read(path):
    return nbformat.read(path, as_version=4)


def code_lines(source):
    """Non-blank, non-comment lines of a code cell, stripped."""
    return [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_lessons_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(1, len(LESSONS) + 1)), [p.name for p in LESSONS]
    for path in LESSONS:
        title = read(path).cells[0].source.splitlines()[0]
        assert title.startswith(f"# Lesson {path.name[:2]} "), f"{path.name}: first line {title!r}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_outputs_cleared_and_short(path):
    nb = read(path)
    assert len(nb.cells) <= MAX_CELLS, f"{path.name}: {len(nb.cells)} cells, at most {MAX_CELLS} (one idea a lesson)"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_prerequisites_first_references_last(path):
    nb = read(path)
    assert "**Prerequisites" in nb.cells[0].source, f"{path.name}: the first cell states its prerequisites"
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert "## References" in markdown[-1], f"{path.name}: the last markdown cell is its references"
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", markdown[-1]), f"{path.name}: references cite an arXiv id"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_figures_shown_inline_and_embedded(path):
    nb = read(path)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "matplotlib.use(" not in code, f"{path.name}: the backend is the Makefile's (MPLBACKEND), not the lesson's"
    assert "plt.close(" not in code and "save_figure(" not in code, f"{path.name}: figures go through show_figure"
    shown = re.findall(r"show_figure\(\s*\w+,\s*[\"'](\w+)[\"']", code)
    assert shown, f"{path.name}: a lesson shows at least one figure"
    embedded = re.findall(r"!\[[^\]]*\]\(\.\./figures/(\w+)\.png\)", markdown)
    for name in shown:
        assert name.startswith(path.name[:3]), f"{path.name}: figure {name} is named after its lesson"
        assert name in embedded, f"{path.name}: figure {name} is not embedded in the markdown (![...](../figures/..))"
    for name in embedded:
        assert (ROOT / "figures" / f"{name}.png").is_file(), f"{path.name}: embeds missing figures/{name}.png"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_exercises_blank_solution_check(path):
    nb = read(path)
    found = student.exercises(nb)
    assert len(found) >= 2, f"{path.name}: at least two exercises"
    assert any(len(code_lines(nb.cells[s].source)) >= 4 for _, s, _ in found), (
        f"{path.name}: at least one exercise needs several lines of real code"
    )
    for _, s, c in found:
        solution = {line for line in code_lines(nb.cells[s].source) if len(line) > 12}
        retyped = solution & set(code_lines(nb.cells[c].source))
        assert not retyped, f"{path.name}: check cell {c} re-types the solution: {sorted(retyped)}"
    edition = student.student_edition(nb)
    assert not any(student.SOLUTION_TAG in cell.metadata.get("tags", []) for cell in edition.cells)
    assert len(edition.cells) == len(nb.cells) - len(found)


def test_readme_maps_every_lesson():
    readme = (ROOT / "README.md").read_text()
    for path in LESSONS:
        assert f"`{path.stem}`" in readme, f"README's lesson map misses {path.stem}"


# ----------------------------------------------------------------------------------------------------------
# The grading helper and the edition writer
# ----------------------------------------------------------------------------------------------------------


def test_cmp_blank_says_no_answer_and_goes_on(capsys):
    cmp("blank", ..., 1.0)
    cmp("blank function", None, np.ones(3))
    cmp("blank pair", (np.ones(2), ...), (np.ones(2), np.ones(2)))
    assert capsys.readouterr().out.count("no answer yet") == 3
    assert is_blank([1.0, None]) and not is_blank((1.0, 2.0))


def test_cmp_grades_and_says_how_far_off(capsys):
    cmp("right", torch.tensor([1.0, 2.0], dtype=torch.float64), np.array([1.0, 2.0]))
    cmp("pair", (1, torch.ones(2)), (1, np.ones(2)))
    assert capsys.readouterr().out.count("exact: True") == 3
    with pytest.raises(AssertionError, match=r"max diff 0\.1"):  # the imaginary part counts
        cmp("complex", np.array([1 + 0.1j]), np.array([1.0 + 0j]))
    with pytest.raises(AssertionError, match=r"max diff 0\.5, 25\.0% of the largest"):
        cmp("wrong", np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    with pytest.raises(AssertionError, match="shape"):
        cmp("shape", np.ones(3), np.ones(2))
    with pytest.raises(AssertionError, match="expected 2 results"):
        cmp("arity", np.ones(2), (np.ones(2), np.ones(2)))


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, source, tags in cells:
        new = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(new(source, metadata={"tags": tags} if tags else {}))
    return nb


GOOD = (
    ("markdown", "**Exercise 1.** Add one.", []),
    ("code", "given = 2\nmy_answer = ...", []),
    ("code", "my_answer = given + 1", ["solution"]),
    ("code", "cmp('exercise 1', my_answer, 3)", []),
)


def test_student_edition_drops_solutions(tmp_path):
    nb = _notebook(*GOOD)
    assert student.exercises(nb) == [(1, 2, 3)]
    edition = student.student_edition(nb)
    assert [c.source for c in edition.cells] == [GOOD[0][1], GOOD[1][1], GOOD[3][1]]
    (tmp_path / "lessons").mkdir()
    nbformat.write(nb, tmp_path / "lessons" / "01_x.ipynb")
    written = student.write_edition(tmp_path / "lessons", tmp_path / "student")
    assert [p.name for p in written] == ["01_x.ipynb"]
    assert len(read(written[0]).cells) == 3


@pytest.mark.parametrize(
    "cells, message",
    [
        ((GOOD[0], ("code", "my_answer = 1", []), GOOD[2], GOOD[3]), "must follow its blank"),
        ((GOOD[0], GOOD[1], GOOD[2], ("code", "print(my_answer)", [])), "must be followed by its check"),
        ((GOOD[0], GOOD[1], ("markdown", "answer: 3", ["solution"]), GOOD[3]), "not a code cell"),
        ((GOOD[2], GOOD[3]), "must follow its blank"),
    ],
)
def test_malformed_exercise_is_refused(cells, message):
    with pytest.raises(student.EditionError, match=message):
        student.student_edition(_notebook(*cells))


def test_write_edition_needs_lessons(tmp_path):
    with pytest.raises(student.EditionError, match="lessons_dir: no lessons matching"):
        student.write_edition(tmp_path, tmp_path / "out")
