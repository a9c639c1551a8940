"""Small helpers the lessons share: where figures go, and the self-check that grades an exercise.

`cmp` follows nn-zero-to-hero's helper of the same name: it reports whether a student's answer is exact, close,
or how far off, and then asserts it is close, so a wrong answer stops the notebook with a readable message.
"""

from pathlib import Path

import numpy as np
import torch

_REPO = Path(__file__).resolve().parents[1]


def figures_dir():
    """The repository's figures/ folder (made if missing); ./figures when the package runs outside the repo."""
    root = _REPO if (_REPO / "lessons").is_dir() else Path.cwd()
    path = root / "figures"
    path.mkdir(exist_ok=True)
    return path


def save_figure(fig, name):
    """Save a matplotlib figure as figures/<name>.png at a resolution that reads well in a README."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _as_array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cmp(name, answer, expected, rtol=1e-6, atol=1e-9):
    """Grade an exercise: print 'exact', 'close' or the max difference, then assert the answer is close."""
    if answer is None or answer is Ellipsis:
        raise AssertionError(f"{name}: no answer yet: replace the ... with your code")
    a, e = _as_array(answer), _as_array(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape}, expected {e.shape}")
    exact = bool(np.array_equal(a, e))
    close = bool(np.allclose(a, e, rtol=rtol, atol=atol))
    max_diff = float(np.max(np.abs(a - e), initial=0.0))
    print(f"{name:30s} | exact: {exact!s:5} | close: {close!s:5} | max diff: {max_diff:.2e}")
    assert close, f"{name}: not close to the expected answer (max diff {max_diff:.2e})"
