"""The student's edition of the lessons: every exercise blank, every solution removed.

    python -m minijamba.student                 # lessons/*.ipynb -> student/*.ipynb (what `make student` runs)
    python -m minijamba.student --execute       # ... then run each one top to bottom, as a student would on day one

The lessons in `lessons/` are the teacher's edition. An exercise there is a markdown question and three code
cells: the blank (given data, and `my_answer = ...` or a function whose body is `...`), the solution (tagged
`solution` in the cell's metadata), and the check (`teaching.cmp`). The student's edition drops the solution
cells, so the blank is what a student fills in and the check grades it. `--execute` proves the edition usable:
no cell fails, and every check cell says "no answer yet" instead of stopping the notebook.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import nbformat

SOLUTION_TAG = "solution"
NO_ANSWER = "no answer yet"
_REPO = Path(__file__).resolve().parents[1]


class EditionError(ValueError):
    """A lesson whose exercises do not follow the blank / solution / check format."""


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def exercises(nb):
    """The (blank, solution, check) code-cell indices of each exercise; EditionError if one is malformed.

    A solution cell must directly follow its blank, a code cell holding `...`, and be directly followed by its
    check, a code cell that calls `cmp`.
    """
    found = []
    for i, cell in enumerate(nb.cells):
        if SOLUTION_TAG not in _tags(cell):
            continue
        if cell.cell_type != "code":
            raise EditionError(f"cell {i} is tagged {SOLUTION_TAG!r} but is not a code cell")
        blank = nb.cells[i - 1] if i > 0 else None
        check = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if blank is None or blank.cell_type != "code" or "..." not in blank.source or SOLUTION_TAG in _tags(blank):
            raise EditionError(f"solution cell {i} must follow its blank: a code cell with a `...` to fill in")
        if check is None or check.cell_type != "code" or "cmp(" not in check.source:
            raise EditionError(f"solution cell {i} must be followed by its check: a code cell that calls cmp(...)")
        found.append((i - 1, i, i + 1))
    return found


def student_edition(nb):
    """A copy of a lesson without its solution cells and without outputs."""
    exercises(nb)
    out = copy.deepcopy(nb)
    out.cells = [cell for cell in out.cells if SOLUTION_TAG not in _tags(cell)]
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return out


def write_edition(lessons_dir, out_dir, only="[0-9][0-9]_*.ipynb"):
    """Write the student's edition of every lessons_dir/NN_*.ipynb (or those matching `only`) into out_dir.

    Returns the paths written."""
    lessons_dir, out_dir = Path(lessons_dir), Path(out_dir)
    paths = sorted(lessons_dir.glob(only))
    if not paths:
        raise EditionError(f"lessons_dir: no lessons matching {only} in {lessons_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        try:
            edition = student_edition(nb)
        except EditionError as err:
            raise EditionError(f"{path.name}: {err}") from None
        target = out_dir / path.name
        nbformat.write(edition, target)
        written.append(target)
    return written


def _text(outputs):
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def execute_edition(path, timeout=600):
    """Run a student notebook top to bottom; returns its number of checks. Raises if a cell fails or a check
    cell does not report its blank as "no answer yet"."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    checks = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "cmp(" in cell.source]
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    for i in checks:
        if NO_ANSWER not in _text(nb.cells[i].outputs):
            raise EditionError(f"{path.name}: check cell {i} ran but did not say {NO_ANSWER!r}")
    return len(checks)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minijamba.student", description=__doc__.splitlines()[0])
    parser.add_argument("--lessons", default=str(_REPO / "lessons"), help="folder of the teacher's lessons")
    parser.add_argument("--out", default=str(_REPO / "student"), help="folder to write the student's edition to")
    parser.add_argument("--only", default="[0-9][0-9]_*.ipynb", help="a glob of the lessons to write, e.g. '04_*'")
    parser.add_argument("--execute", action="store_true", help="then run each notebook and check its blanks")
    args = parser.parse_args(argv)
    try:
        written = write_edition(args.lessons, args.out, args.only)
    except EditionError as err:
        parser.error(str(err))
    print(f"wrote the student's edition of {len(written)} lessons to {args.out}")
    failed = []
    if args.execute:
        for path in written:
            try:
                start = time.perf_counter()
                n = execute_edition(path)
                seconds = time.perf_counter() - start
                print(f"{path.name}: ran top to bottom in {seconds:.0f} s, {n} checks say {NO_ANSWER!r}", flush=True)
            except Exception as err:  # report every lesson, then fail
                print(f"{path.name}: FAILED: {err}", flush=True)
                failed.append(path.name)
    if failed:
        sys.exit(f"the student's edition failed in {', '.join(failed)}")


if __name__ == "__main__":
    main()
