"""Figures for the lessons and benchmarks: where they go, how they are shown, and the drawings that are not the idea.

A lesson's code cells should be about the model; the diagram-drawing and axis-styling around them lives here, so
a lesson calls `draw_...(...)` and then `show_figure(fig, "NN_name")`. `show_figure` saves the PNG into
`figures/` (which the lesson's markdown embeds, so a reader on GitHub sees it without running anything) and shows
the figure once, inline, where it is made. Under a non-interactive backend (`MPLBACKEND=Agg`, which the Makefile
sets for `make test`) it only saves and closes.
"""

from pathlib import Path

import matplotlib.pyplot as plt

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


def show_figure(fig, name):
    """Save figures/<name>.png, then show the figure inline once (a notebook) or just close it (headless runs)."""
    path = save_figure(fig, name)
    plt.show()  # the inline backend displays and closes it; Agg does nothing
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Diagram primitives: boxes and labelled arrows in axes coordinates (the block, layout and kernel pictures)
# ----------------------------------------------------------------------------------------------------------


def blank_axes(figsize, xlim=(0, 1), ylim=(0, 1)):
    """A figure with one axes and no frame or ticks, for a diagram drawn in data coordinates."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.set(xlim=xlim, ylim=ylim)
    ax.axis("off")
    return fig, ax


def box(ax, xy, text, color="#dbe9f6", fontsize=9):
    """A rounded, filled text box centred at xy."""
    ax.text(*xy, text, ha="center", va="center", fontsize=fontsize, bbox={"boxstyle": "round,pad=0.4", "fc": color})


def arrow(ax, start, end, label="", side=0.02, ha="left", fontsize=7.5):
    """An arrow from start to end, with an optional monospace label beside its middle (a shape, say)."""
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "lw": 1.2, "shrinkA": 0, "shrinkB": 0})
    if label:
        mid = ((start[0] + end[0]) / 2 + side, (start[1] + end[1]) / 2)
        ax.text(*mid, label, fontsize=fontsize, color="#444", ha=ha, va="center", family="monospace")


# ----------------------------------------------------------------------------------------------------------
# Lesson 01 — S4 discretization
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lessons 02 and 03 — selection, and the scans
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lesson 04 — the Mamba block
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lesson 05 — the Jamba hybrid
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lesson 06 — MoE routing
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lesson 07 — the fused scan kernel
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Lesson 08 — TinyStories
# ----------------------------------------------------------------------------------------------------------
