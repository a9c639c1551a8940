"""The self-check that grades a lesson's exercises, in the teacher's and in the student's edition.

Every exercise in `lessons/` is three cells: a blank (the given data and `my_answer = ...`), a solution cell
tagged `solution`, and a check cell that calls `cmp`. The repository's lessons are the teacher's edition: the
solution runs, so `make test` grades every solution against the package. `make student` writes the student's
edition (`minijamba.student`), the same notebooks without the solution cells; there `cmp` finds the blank and
says "no answer yet", and the notebook goes on to the next exercise.

`cmp` follows nn-zero-to-hero's helper of the same name: it reports whether an answer is exact, close, or how far
off it is, and stops on a wrong answer with that distance in the message.
"""

import numpy as np
import torch

__all__ = ["cmp", "is_blank"]


def is_blank(answer):
    """True for an answer not written yet: `...` (the blank's placeholder) or None (a function body of `...`)."""
    if answer is None or answer is Ellipsis:
        return True
    return isinstance(answer, tuple | list) and any(is_blank(a) for a in answer)


def _as_array(x):
    """A NumPy array in float64 (complex128 for complex input), so any two answers can be subtracted."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().resolve_conj().numpy()
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def cmp(name, answer, expected, rtol=1e-6, atol=1e-9):
    """Grade an exercise: print 'no answer yet', or exact / close / max diff, and stop if the answer is not close.

    answer, expected: numbers, arrays or tensors, or tuples of them (compared pairwise, e.g. (y, last_state)).
    Returns nothing (a check cell shows only its report); raises AssertionError, saying how far off, if wrong.
    """
    if is_blank(answer):
        print(f"{name}: no answer yet (replace the ... in the cell above with your code, then run this cell)")
        return
    if isinstance(expected, tuple | list):
        if not isinstance(answer, tuple | list) or len(answer) != len(expected):
            raise AssertionError(f"{name}: expected {len(expected)} results, got {type(answer).__name__}")
        for i, (a, e) in enumerate(zip(answer, expected, strict=True)):
            cmp(f"{name} [{i}]", a, e, rtol=rtol, atol=atol)
        return
    a, e = _as_array(answer), _as_array(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape}, expected {e.shape}")
    exact = bool(np.array_equal(a, e))
    close = bool(np.allclose(a, e, rtol=rtol, atol=atol))
    max_diff = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    print(f"{name:30s} | exact: {exact!s:5} | close: {close!s:5} | max diff: {max_diff:.2e}")
    relative = f", {max_diff / scale:.1%} of the largest expected value" if scale > 0 else ""
    assert close, f"{name}: not close to the expected answer: max diff {max_diff:.3g}{relative}"
