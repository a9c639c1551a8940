"""Figures for the lessons and benchmarks: where they go, how they are shown, and the drawings that are not the idea.

A lesson's code cells should be about the model; the diagram-drawing and axis-styling around them lives here, so
a lesson calls `draw_...(...)` and then `show_figure(fig, "NN_name")`. `show_figure` saves the PNG into
`figures/` (which the lesson's markdown embeds, so a reader on GitHub sees it without running anything) and shows
the figure once, inline, where it is made. Under a non-interactive backend (`MPLBACKEND=Agg`, which the Makefile
sets for `make test`) it only saves and closes.
"""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from mpl_toolkits.axes_grid1 import make_axes_locatable

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
    """Save figures/<name>.png, then show the figure inline once (a notebook) or just close it (headless runs).

    Returns nothing, so a cell that ends with it shows the figure and no other output."""
    save_figure(fig, name)
    plt.show()  # the inline backend displays and closes it; Agg does nothing
    plt.close(fig)


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


def plot_discretization_error(deltas, global_err, global_slope, hs, local_err, local_slope, title):
    """Figure 01_discretization_error: error against step size, log-log; global (left) and one step (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    panels = (
        (axes[0], deltas, global_err, global_slope, "osD^", r"$\|x_L - x(T)\|$", title),
        (axes[1], hs, local_err, local_slope, "s^v", "error of one step (Frobenius norm)", "Local error of Ā, B̄"),
    )
    for ax, steps, errors, slopes, markers, ylabel, panel_title in panels:
        for (label, err), marker in zip(errors.items(), markers, strict=True):
            ax.loglog(steps, err, marker + "-", ms=4, label=f"{label}: slope {slopes[label]:.2f}")
        ax.set(xlabel="step size Δ", ylabel=ylabel, title=panel_title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kernels(legs_kernels, delta_legs, layer_kernels, delta, title_legs, title_layers):
    """Figure 01_kernels: HiPPO-LegS's first state kernels (left), three channels of each S4D layer (right)."""
    fig, axes = plt.subplots(1, 1 + len(layer_kernels), figsize=(15, 4.6))
    for n, K in enumerate(legs_kernels):
        axes[0].plot(np.arange(len(K)) * delta_legs, K / delta_legs, label=f"state n = {n}")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    axes[0].set(xlabel=r"time into the past $t = j\Delta$", ylabel=r"$\bar K_j\, /\, \Delta$", title=title_legs)
    channels = np.argsort(delta)[::-1][[0, len(delta) // 2, -1]]  # fastest, middle, slowest: bottom to top
    for ax, (name, (K_layer, rate)) in zip(axes[1:], layer_kernels.items(), strict=True):
        steps = np.arange(1, K_layer.shape[-1] + 1)  # j + 1, so that the log axis can start at tap 0
        for row, h in enumerate(channels):
            offset = 2.4 * row  # each channel in its own row
            ax.hlines(offset, 1, steps[-1], colors="grey", lw=0.4)
            ax.plot(steps, offset + K_layer[h] / np.abs(K_layer[h]).max(), lw=0.8, color=f"C{row}")
            ax.vlines(rate / delta[h], offset - 1.1, offset + 1.1, colors="k", linestyles=":", lw=1)
            ax.text(1.1, offset + 1.2, f"channel {h}: Δ = {delta[h]:.4f}", fontsize=8, color=f"C{row}")
        ax.set(
            xscale="log",
            yticks=[],
            ylim=(-1.3, 2.4 * len(channels)),
            xlabel="steps into the past j + 1 (log scale)",
            title=f"{name} {title_layers}: kernels scaled to max 1\nmemory timescale {rate:g}/Δ dotted",
        )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Lessons 02 and 03 — selection, and the scans
# ----------------------------------------------------------------------------------------------------------


def plot_selective_copying(histories, chance, title):
    """Answer accuracy against training step for the LTI and the S6 model ({selective: history})."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    models = ((False, "LTI (S4-like: fixed Δ, B, C)", "C0"), (True, "S6 (selective Δ, B, C)", "C1"))
    for selective, label, color in models:
        steps, accuracy = zip(*((h["step"], h["accuracy"]) for h in histories[selective]), strict=True)
        ax.plot(steps, accuracy, "o-", ms=4, color=color, label=f"{label}: final {accuracy[-1]:.1%}")
    ax.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.0%})")
    note = "Mamba paper, Table 1 (L = 4096, no gate):\nS4 18.3%,  S6 97.0%"
    bbox = {"facecolor": "white", "edgecolor": "lightgrey"}
    ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=9, bbox=bbox)
    ax.set(xlabel="training step", ylabel="answer accuracy (held-out batches)", ylim=(0, 1.02), title=title)
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig


def plot_delta_gate(delta, typical, kinds, labels, title):
    """Δ of every channel along one sequence (heatmap) over its geometric mean per position, on one time axis.

    delta: (channels, L), rows in the order to draw them top down; typical: (L,); kinds: (mask (L,), label, colour)
    for the scatter; labels: {position: text} written above those points.
    """
    L = delta.shape[1]
    positions = np.arange(L)
    fig, (ax_heat, ax_mean) = plt.subplots(2, 1, figsize=(11, 6.4), sharex=True, height_ratios=[1.3, 1])
    # Both panels get a colorbar slot of the same width (the lower one left empty), so their time axes line up.
    cax, spare = (make_axes_locatable(ax).append_axes("right", size="2%", pad=0.1) for ax in (ax_heat, ax_mean))
    spare.axis("off")
    extent = (-0.5, L - 0.5, delta.shape[0] - 0.5, -0.5)
    image = ax_heat.imshow(np.log10(delta), aspect="auto", cmap="viridis", interpolation="nearest", extent=extent)
    fig.colorbar(image, cax=cax, label="log10 Δ")
    ax_heat.set(ylabel="channel (strongest gate on top)", title=title)
    ax_mean.semilogy(positions, typical, "k-", lw=0.8)
    for mask, label, color in kinds:
        ax_mean.scatter(positions[mask], typical[mask], color=color, s=28, zorder=3, label=label)
    for t, text in labels.items():
        ax_mean.annotate(
            text, (t, typical[t]), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=9, color="C3"
        )
    ax_mean.set(
        xlabel="position in the sequence",
        ylabel="Δ, geometric mean\nover channels",
        xlim=(-0.5, L - 0.5),
        ylim=(typical.min() / 1.5, typical.max() * 2),
    )
    ax_mean.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    return fig


def draw_hillis_steele(ax, rounds, L):
    """The Hillis–Steele dependency diagram: row r holds the values after r rounds, arrows are the combines."""
    for r, combines in enumerate(rounds):
        absorbers = {t for _, t in combines}
        for t in range(L):
            ax.plot([t, t], [r, r + 1], color="C0" if t in absorbers else "lightgrey", lw=1.2, zorder=1)
        for s, t in combines:
            ax.annotate("", xy=(t, r + 1), xytext=(s, r), arrowprops={"arrowstyle": "->", "color": "C1", "lw": 1.2})
    for r in range(len(rounds) + 1):
        ax.scatter(range(L), [r] * L, s=60, color="k", zorder=2)
    for t in range(L):
        ax.text(t, -0.35, f"$(a_{t + 1}, b_{t + 1})$", ha="center", va="top", fontsize=8)
        ax.text(t, len(rounds) + 0.2, f"$x_{t + 1}$", ha="center", va="bottom", fontsize=10)
    work = sum(len(c) for c in rounds)
    ax.set(
        yticks=range(len(rounds) + 1),
        yticklabels=["input"] + [f"after k = {2**r}" for r in range(len(rounds))],
        xticks=[],
        ylim=(-0.9, len(rounds) + 0.6),
        title=f"Hillis–Steele, L = {L}: {len(rounds)} rounds, {work} combines (orange)",
    )


def plot_work_depth(ax, lengths, costs, chunk):
    """Work (solid) and depth (dashed) against L, log-log; costs: {scan: (work list, depth list)}."""
    for (scan, (work, depth)), color in zip(costs.items(), ("C0", "C1", "C2"), strict=True):
        if work == depth:  # the loop: one line
            ax.loglog(lengths, work, "-", color=color, lw=2.5, alpha=0.6, label=f"{scan}: work = depth = L")
            continue
        ax.loglog(lengths, work, "-", color=color, label=f"{scan}: work")
        ax.loglog(lengths, depth, "--", color=color, label=f"{scan}: depth")
    ax.set(xlabel="sequence length L", ylabel="combines", title=f"Work (solid) and depth (dashed); chunk T = {chunk}")
    ax.legend(fontsize=8)


def plot_scan_errors(ax, lengths, errors, nan_level=3.0):
    """Relative error against L per (method, dtype); non-finite errors drawn on a line at nan_level."""
    styles = {"sequential": ("C0", "o"), "parallel": ("C1", "s"), "chunked": ("C2", "^"), "cumprod": ("C3", "x")}
    for (method, dtype), errs in errors.items():
        color, marker = styles[method]
        shown = np.where(~np.isfinite(errs), nan_level, np.maximum(errs, 1e-17))
        ls = "-" if dtype == "float32" else ":"
        ax.loglog(lengths, shown, ls, marker=marker, color=color, ms=4, label=f"{method}, {dtype}")
    ax.axhline(nan_level, color="grey", lw=0.5)
    ax.text(lengths[0], nan_level * 1.6, "inf / NaN", fontsize=8, color="C3")
    ax.set(
        xlabel="sequence length L",
        ylabel="max |y - y_ref| / max |y_ref|",
        ylim=(1e-17, 1e2),
        title="Agreement with the float64 reference\n(cumprod: the unsafe closed form)",
    )
    ax.legend(fontsize=7, ncol=2, loc="center", bbox_to_anchor=(0.4, 0.3))


# ----------------------------------------------------------------------------------------------------------
# Lesson 04 — the Mamba block
# ----------------------------------------------------------------------------------------------------------


def draw_mamba_block():
    """Figure 3 of the Mamba paper as a data-flow diagram: one MambaBlock, with the shape on every edge."""
    fig, ax = blank_axes((9, 10), ylim=(0, 1.02))
    U, Z, MID = 0.33, 0.72, 0.5  # the u branch, the z branch, the centre line
    nodes = {  # key: (x, y, text); a box's half-height follows its number of lines
        "hidden": (MID, 0.98, "hidden: the residual stream\n(embedding, or the previous block)"),
        "norm": (MID, 0.89, "RMSNorm"),
        "in_proj": (MID, 0.80, "in_proj: Linear d_model → 2·d_inner"),
        "conv": (U, 0.67, "conv1d: causal, depthwise,\nd_conv = 4 taps per channel"),
        "silu_u": (U, 0.57, "SiLU"),
        "ssm": (U, 0.46, "S6 selective SSM (lesson 02)\ny = SSM(u) + D·u"),
        "silu_z": (Z, 0.57, "SiLU"),
        "gate": (MID, 0.35, "×  (gate)"),
        "out_proj": (MID, 0.25, "out_proj: Linear d_inner → d_model"),
        "add": (MID, 0.15, "+  (residual)"),
        "next": (MID, 0.05, "next block … ×n_layer, then\nfinal RMSNorm → LM head (tied to the embedding)"),
    }
    colors = {"ssm": "#f6d9b5", "gate": "#e3f0d5", "add": "#e3f0d5", "hidden": "#eeeeee", "next": "#eeeeee"}
    for key, (x, y, text) in nodes.items():
        box(ax, (x, y), text, colors.get(key, "#dbe9f6"))

    def edge(key, end, dx=0.0):
        x, y, text = nodes[key]
        half = 0.017 + 0.011 * text.count("\n")  # half the box's height, in axes units
        return (x + dx, y - half if end == "bottom" else y + half)

    stream, inner = "(batch, L, d_model)", "(batch, d_inner, L)"
    arrow(ax, edge("hidden", "bottom"), edge("norm", "top"), stream)
    arrow(ax, edge("norm", "bottom"), edge("in_proj", "top"), stream)
    arrow(ax, edge("in_proj", "bottom", -0.08), edge("conv", "top"), f"u: {inner}", side=-0.03, ha="right")
    arrow(ax, edge("in_proj", "bottom", 0.08), edge("silu_z", "top"), f"z: {inner}", side=0.03)
    arrow(ax, edge("conv", "bottom"), edge("silu_u", "top"), inner)
    arrow(ax, edge("silu_u", "bottom"), edge("ssm", "top"), inner)
    arrow(ax, edge("ssm", "bottom"), edge("gate", "top", -0.03), f"y: {inner}", side=-0.03, ha="right")
    arrow(ax, edge("silu_z", "bottom"), edge("gate", "top", 0.03), inner, side=0.03)
    arrow(ax, edge("gate", "bottom"), edge("out_proj", "top"), "(batch, L, d_inner)")
    arrow(ax, edge("out_proj", "bottom"), edge("add", "top"), stream)
    arrow(ax, edge("add", "bottom"), edge("next", "top"), stream)
    dashed = {"ls": "--", "color": "grey"}  # the residual path skips the whole mixer
    ax.plot([0.8, 0.93, 0.93], [0.98, 0.98, 0.15], lw=1.0, **dashed)
    ax.annotate("", xy=(0.59, 0.15), xytext=(0.93, 0.15), arrowprops={"arrowstyle": "->", **dashed})
    ax.text(0.945, 0.56, f"residual: hidden {stream}", rotation=90, fontsize=8, color="grey", va="center")
    ax.set_title("one Mamba block (MambaBlock = RMSNorm + MambaMixer + residual)", fontsize=11)
    return fig


def plot_decode_per_token(lengths, latency_ms, cache_bytes, title, crossover=None):
    """Per-token step latency and cache bytes against the context length, one line per model, on log-log axes."""
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in latency_ms:
        ax_time.plot(lengths, latency_ms[name], "o-", label=name)
        ax_mem.plot(lengths, cache_bytes[name], "s-", label=name)
    if crossover is not None:
        ax_mem.axvline(crossover, color="grey", ls=":", lw=1)
        top = max(max(b) for b in cache_bytes.values())
        ax_mem.text(crossover * 1.1, top / 4, f"equal at T = {crossover:g}", fontsize=8, color="grey")
    ax_time.set(ylabel="ms per generated token (best of the steps timed)", title="time per token")
    ax_mem.set(ylabel="inference cache (bytes, batch 1)", title="memory per sequence")
    for ax in (ax_time, ax_mem):
        ax.set(xscale="log", yscale="log", xlabel="context length T (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Lesson 05 — the Jamba hybrid
# ----------------------------------------------------------------------------------------------------------

_LAYER_COLORS = {"attention": "#f28e2b", "Mamba": "#4e79a7", "MoE": "#59a14f", "dense MLP": "#d7d7d7"}


def draw_layout(layer_types, moe_layers, block=8, title=""):
    """A stack's layers as columns: the mixer on top (attention or Mamba), the MLP below (MoE or dense)."""
    n = len(layer_types)
    fig, ax = blank_axes((11, 2.6), xlim=(-0.2, n), ylim=(-0.7, 2.7))
    for i, (kind, moe) in enumerate(zip(layer_types, moe_layers, strict=True)):
        mixer = _LAYER_COLORS["attention" if kind == "attention" else "Mamba"]
        ax.add_patch(plt.Rectangle((i, 1), 0.9, 0.9, color=mixer))
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 0.9, color=_LAYER_COLORS["MoE" if moe else "dense MLP"]))
        ax.text(i + 0.45, -0.35, str(i), ha="center", va="center", fontsize=7)
    for b in range(n // block):
        ax.plot([block * b + 0.05, block * b + block - 0.15], [2.1, 2.1], color="k", lw=1)
        ax.text(block * b + block / 2 - 0.05, 2.35, f"Jamba block {b + 1}", ha="center", fontsize=8)
    ax.text(-0.4, 1.45, "mixer", ha="right", va="center", fontsize=9)
    ax.text(-0.4, 0.45, "MLP", ha="right", va="center", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=name) for name, c in _LAYER_COLORS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cache_memory(contexts, memory, ylabel="inference cache (GiB)", title=""):
    """Cache bytes against context length on log-log axes, one line per layout, each labelled at its end."""
    gib = 2**30
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for (name, values), marker in zip(memory.items(), "os^v", strict=False):
        ax.plot(contexts, [v / gib for v in values], marker + "-", label=name)
        end = f"{values[-1] / gib:.3g} GiB" if values[-1] > gib else f"{values[-1] / 1e6:.1f} MB"
        ax.annotate(end, (contexts[-1], values[-1] / gib), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlim=(contexts[0] / 1.3, contexts[-1] * 3.5), xlabel="context length (tokens)",
           ylabel=ylabel, title=title)  # fmt: skip
    ax.set_xticks(contexts, [f"{T // 1024}K" for T in contexts])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_throughput(lengths, tokens_per_second, title=""):
    """Left: tokens/s against the prompt's length, one line per model; right: the first model's over the second's."""
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in tokens_per_second.items():
        ax.plot(lengths, values, "o-", label=name)
    first, second = tokens_per_second.values()
    names = list(tokens_per_second)
    ax_ratio.plot(lengths, [a / b for a, b in zip(first, second, strict=True)], "o-", color="C2")
    ax_ratio.axhline(1, color="grey", lw=1, ls="--")
    ax.set(ylabel="tokens / s (prompt + generated)", title="throughput of one request")
    ax_ratio.set(ylabel=f"{names[0]} / {names[1]}", title="throughput ratio")
    for a in (ax, ax_ratio):
        a.set_xscale("log", base=2)
        a.set_xticks(lengths, [f"{T // 1024}K" if T >= 1024 else str(T) for T in lengths])
        a.minorticks_off()
        a.set_xlabel("prompt length T (tokens)")
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_recall(histories, labels, baselines, title=""):
    """Answer accuracy against training step per model, with horizontal baselines {label: accuracy}."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (layout, label), color in zip(labels.items(), ("C0", "C1"), strict=False):
        steps, accuracy = zip(*((h["step"], h["accuracy"]) for h in histories[layout]), strict=True)
        ax.plot(steps, accuracy, "o-", ms=4, color=color, label=f"{label}: final {accuracy[-1]:.1%}")
    for (label, value), style in zip(baselines.items(), ("--", ":"), strict=False):
        ax.axhline(value, color="grey", ls=style, lw=1, label=f"{label} ({value:.0%})")
    ax.set(xlabel="training step", ylabel="answer accuracy (held-out batches)", ylim=(0, 1.02), title=title)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Lesson 06 — MoE routing
# ----------------------------------------------------------------------------------------------------------


def draw_moe_dispatch(probs, top_k_index, top_k_weights, title):
    """Tokens -> router probabilities -> top-k -> runs grouped by expert -> experts -> weighted sums, for one batch."""
    probs, index, weights = probs.tolist(), top_k_index.tolist(), top_k_weights.tolist()
    n_tok, n_e, k = len(probs), len(probs[0]), len(index[0])
    fig, ax = blank_axes((13, 0.75 * n_tok + 1.6), xlim=(0, 13), ylim=(-0.9, n_tok + 0.4))
    line_color = [plt.cm.tab10(t % 10) for t in range(n_tok)]
    token_color = [(*c[:3], 0.3) for c in line_color]  # the same hue, light enough to write on
    row = [n_tok - 0.5 - t for t in range(n_tok)]  # token t's y, token 0 on top
    cell, x_p = 0.55, 1.3  # the probability table: one column per expert from x_p
    for t in range(n_tok):
        box(ax, (0.45, row[t]), f"$h_{t}$", color=token_color[t])
        for e in range(n_e):
            x0 = x_p + e * cell
            ax.add_patch(plt.Rectangle((x0, row[t] - 0.4), cell, 0.8, fc=plt.cm.Blues(0.85 * probs[t][e]), ec="w"))
            ax.text(
                x0 + cell / 2,
                row[t],
                f"{probs[t][e]:.2f}",
                ha="center",
                va="center",
                fontsize=7.5,
                color="w" if probs[t][e] > 0.6 else "k",
            )
        for slot, e in enumerate(index[t]):  # the top-k: solid frame for the first choice, dashed for the others
            ax.add_patch(
                plt.Rectangle(
                    (x_p + e * cell, row[t] - 0.4), cell, 0.8, fill=False, lw=2, ls="-" if slot == 0 else "--", ec="k"
                )
            )
    for e in range(n_e):
        ax.text(x_p + (e + 0.5) * cell, n_tok + 0.05, f"e{e}", ha="center", fontsize=8)
    x_end = x_p + n_e * cell
    ax.text(
        (x_p + x_end) / 2,
        -0.55,
        "p = softmax(W_r h), top-k framed\n(solid: 1st choice, dashed: 2nd)",
        ha="center",
        va="center",
        fontsize=8,
    )

    # The assignments sorted (stably) by expert, slot-major: each expert's run lists its first choices, then its second.
    runs = [[] for _ in range(n_e)]
    for slot in range(k):
        for t in range(n_tok):
            runs[index[t][slot]].append((t, slot, weights[t][slot]))
    expert_y = [n_tok * (1 - (e + 0.5) / n_e) for e in range(n_e)]
    x_run, chip = x_end + 1.3, 0.62
    arrow(ax, (x_end + 0.1, n_tok / 2), (x_run - 0.15, n_tok / 2))
    ax.text((x_end + x_run) / 2, n_tok / 2 + 0.1, "sort by\nexpert", ha="center", va="bottom", fontsize=8)
    for e, run in enumerate(runs):
        for i, (t, slot, g) in enumerate(run):
            ax.text(
                x_run + (i + 0.5) * chip,
                expert_y[e],
                f"$h_{t}$\n{g:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                bbox={"boxstyle": "round,pad=0.3", "fc": token_color[t], "ls": "-" if slot == 0 else "--"},
            )
    x_expert = x_run + max(len(run) for run in runs) * chip + 1.0
    for e, run in enumerate(runs):
        arrow(ax, (x_run + len(run) * chip + 0.1, expert_y[e]), (x_expert - 0.55, expert_y[e]))
        rows = f"{len(run)} row" if len(run) == 1 else f"{len(run)} rows"
        box(ax, (x_expert, expert_y[e]), f"expert {e}\n{rows}", color="#d9ead3", fontsize=8)
    ax.text(
        (x_run + x_expert - 1.0) / 2,
        -0.55,
        "grouped by expert: (token, g)\n(dashed: a 2nd choice)",
        ha="center",
        va="center",
        fontsize=8,
    )
    ax.text(x_expert, -0.55, "each expert runs once\non its rows", ha="center", va="center", fontsize=8)

    # index_add_: each token's output is the sum of its k experts' outputs, weighted by g.
    x_out = x_expert + 1.6
    for e, run in enumerate(runs):
        for t, slot, _ in run:
            ax.plot(
                [x_expert + 0.55, x_out - 0.1],
                [expert_y[e], row[t]],
                color=line_color[t],
                lw=0.9,
                ls="-" if slot == 0 else "--",
            )
    for t in range(n_tok):
        terms = " + ".join(f"{g:.2f}·E{e}" for e, g in zip(index[t], weights[t], strict=True))
        ax.text(
            x_out,
            row[t],
            f"out$_{t}$ = {terms}",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.3", "fc": token_color[t]},
        )
    ax.text(x_out + 1.2, -0.55, "index_add_: weighted sums\nback to their tokens", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, x_out + 2.6)
    ax.set_title(title, fontsize=10)
    return fig


def plot_moe_utilisation(shares_without, shares_with, entropy_without, entropy_with, entropy_control, aux_coef, title):
    """Expert shares over training without and with the aux loss (one seed), and the entropy of every run."""
    n_e = shares_without.shape[1]
    steps = range(1, shares_without.shape[0] + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    colors = plt.cm.tab10(range(n_e))
    for ax, shares, panel in (
        (axes[0], shares_without, "without the aux loss"),
        (axes[1], shares_with, f"with {aux_coef} · aux loss"),
    ):
        ax.stackplot(steps, shares.T, colors=colors, labels=[f"expert {e}" for e in range(n_e)])
        for level in range(1, n_e):
            ax.axhline(level / n_e, color="white", lw=0.6, ls=":")
        ax.set(xlim=(1, len(steps)), ylim=(0, 1), xlabel="training step", ylabel="share of assignments", title=panel)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    for runs, color, label in ((entropy_without, "C3", "without aux"), (entropy_with, "C2", "with aux")):
        for i, entropy in enumerate(runs):
            axes[2].plot(steps, entropy, color=color, lw=1, alpha=0.8, label=label if i == 0 else None)
    axes[2].plot(steps, entropy_control, color="grey", lw=1, ls="--", label="without aux, no common shift")
    for level, text in ((np.log(n_e), f"log {n_e}: balanced"), (np.log(2), "log 2: all on 2 experts")):
        axes[2].axhline(level, color="k", lw=0.8, ls=":")
        axes[2].text(len(steps), level + 0.02, text, ha="right", va="bottom", fontsize=8)
    axes[2].set(
        xlim=(1, len(steps)),
        ylim=(0.5, np.log(n_e) + 0.12),
        xlabel="training step",
        ylabel="routing entropy (nats)",
        title=f"entropy, {len(entropy_without)} seeds",
    )
    axes[2].legend(fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.68))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_capacity(factors, dropped_without, dropped_with, aux_coef, title):
    """The fraction of assignments dropped against the capacity factor, for the two routers and perfect balance."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(factors, dropped_without, "o-", color="C3", label="trained without the aux loss")
    ax.plot(factors, dropped_with, "s-", color="C2", label=f"trained with {aux_coef} · aux loss")
    ax.plot(factors, [max(0.0, 1 - c) for c in factors], "k:", label="perfect balance: 1 − c")
    ax.set(xlabel="capacity factor c", ylabel="fraction of assignments dropped", ylim=(-0.02, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Lesson 07 — the fused scan kernel
# ----------------------------------------------------------------------------------------------------------


def _region(ax, x0, y0, width, height, title, color):
    """A filled rectangle with a bold title at its top left: one level of the memory hierarchy."""
    ax.add_patch(plt.Rectangle((x0, y0), width, height, fc=color, ec="#888", lw=1))
    ax.text(x0 + 0.01, y0 + height - 0.035, title, fontsize=10, weight="bold", va="top")


def draw_states_on_chip(batch, dim, N, L, bytes_per_number=4):
    """Mamba Fig. 1's idea: the scan's inputs and output cross HBM once; its (batch, dim, L, N) states stay on chip."""
    mib = bytes_per_number / 2**20
    per_channel, per_state, states = batch * dim * L * mib, batch * N * L * mib, batch * dim * L * N * mib
    fig, ax = blank_axes((12, 5.2))
    _region(ax, 0.0, 0.02, 0.4, 0.9, "HBM: GPU main memory (large, slow)", "#f3f3f3")
    _region(ax, 0.52, 0.02, 0.48, 0.9, "SRAM and registers: on chip (small, fast)", "#eaf4ea")
    box(ax, (0.2, 0.74), f"u, Δ, z: (batch, dim, L)\n3 × {per_channel:.1f} MiB")
    box(ax, (0.2, 0.56), f"B, C: (batch, N, L), 2 × {per_state:.2f} MiB\nA: (dim, N);  D: (dim)")
    box(ax, (0.2, 0.12), f"y: (batch, dim, L)\n{per_channel:.1f} MiB", "#fde2c8")
    never = {"boxstyle": "round,pad=0.4", "fc": "white", "ec": "#a33", "ls": "--"}
    note = f"never written here:\nĀ, B̄u and the states x,\neach (batch, dim, L, N): 3 × {states:.0f} MiB"
    ax.text(0.2, 0.34, note, ha="center", va="center", fontsize=9, color="#a33", bbox=never)
    box(ax, (0.76, 0.74), "discretize, per step t and state n:\nĀ = exp(ΔA),  B̄u = Δ·B·u", "#ffffff")
    scan = f"scan: x_t = Ā_t·x_(t-1) + B̄_t·u_t\neach channel's {N} states, a chunk of steps at a time"
    box(ax, (0.76, 0.47), scan + ":\nthe (batch, dim, L, N) states exist only here", "#ffffff")
    box(ax, (0.76, 0.2), "read out: y_t = C_t·x_t + D·u_t,  y_t ·= SiLU(z_t)", "#ffffff")
    arrow(ax, (0.76, 0.67), (0.76, 0.55))
    arrow(ax, (0.76, 0.39), (0.76, 0.25))
    arrow(ax, (0.36, 0.74), (0.6, 0.74))
    arrow(ax, (0.36, 0.58), (0.6, 0.71))
    ax.text(0.47, 0.79, "read once", ha="center", fontsize=9)
    arrow(ax, (0.6, 0.18), (0.29, 0.12))
    ax.text(0.45, 0.1, "written once", ha="center", fontsize=9)
    title = f"the selective scan with its states kept on chip (after Mamba Fig. 1): batch {batch}, dim {dim}, N {N}"
    ax.set_title(f"{title}, L {L}, {8 * bytes_per_number}-bit numbers", fontsize=10)
    return fig


def draw_kernel_layout(threads, items, warp, shown_chunks=3):
    """The CUDA kernel's split of the work: a block per (batch, channel), chunks of threads × items steps, warps."""
    chunk, warps = threads * items, threads // warp
    fig, ax = blank_axes((12, 6.2))
    ax.text(0.0, 0.97, "grid: one thread block per (batch b, channel d), blockIdx = (d, b)", fontsize=10, weight="bold")
    for row in range(2):
        for col in range(6):
            ax.add_patch(plt.Rectangle((0.02 + 0.045 * col, 0.84 - 0.06 * row), 0.04, 0.05, fc="#dbe9f6", ec="#666"))
    ax.text(0.3, 0.84, "…  dim × batch blocks,\nspread over the GPU's SMs", fontsize=8.5, va="center")
    ax.annotate("", xy=(0.05, 0.69), xytext=(0.04, 0.84), arrowprops={"arrowstyle": "->", "lw": 1.2})
    heading = f"one block walks its channel's L steps in chunks of {threads} threads × {items} items = {chunk} steps"
    ax.text(0.06, 0.69, heading, fontsize=10, weight="bold", va="center")
    width = 0.96 / shown_chunks
    carry = {"arrowstyle": "->", "lw": 1.5, "color": "#a33", "connectionstyle": "arc3,rad=0.6"}
    for c in range(shown_chunks):
        x = 0.02 + c * width
        ax.add_patch(plt.Rectangle((x, 0.56), width * 0.9, 0.07, fc="#c9e7c9" if c == 1 else "#eaf4ea", ec="#666"))
        label = f"chunk {c}: steps {c * chunk}–{(c + 1) * chunk - 1}"
        ax.text(x + width * 0.45, 0.595, label, ha="center", va="center", fontsize=8.5)
        if c:
            ax.annotate("", xy=(x + 0.01, 0.56), xytext=(x - width * 0.1 - 0.01, 0.56), arrowprops=carry)
    note = "red: the carry, the N states at a chunk's end (in shared memory), starts the next chunk"
    ax.text(0.02, 0.5, note, fontsize=8.5, color="#a33", va="center")
    heading = f"inside chunk 1: {threads} threads in {warps} warps of {warp} lanes; thread j owns the chunk's steps"
    ax.text(0.0, 0.43, f"{heading} {items}j … {items}j + {items - 1}", fontsize=10, weight="bold")
    colors = ["#fde2c8", "#dbe9f6", "#f6dbe9", "#e9f6db"]
    cell = 0.96 / threads
    for j in range(threads):
        color = colors[j // warp % len(colors)]
        ax.add_patch(plt.Rectangle((0.02 + j * cell, 0.32), cell, 0.07, fc=color, ec="#999", lw=0.3))
    for w in range(warps):
        first, last = w * warp, (w + 1) * warp - 1
        label = f"warp {w}: threads {first}–{last},\nsteps {first * items}–{(last + 1) * items - 1}"
        ax.text(0.02 + (w + 0.5) * warp * cell, 0.3, label, ha="center", va="top", fontsize=7.5)
    ax.annotate("", xy=(0.035, 0.16), xytext=(0.02 + cell / 2, 0.32), arrowprops={"arrowstyle": "->", "color": "#555"})
    for i in range(items):
        box(ax, (0.06 + 0.06 * i, 0.14), f"step {i}", "#fde2c8", fontsize=8)
    note = f"thread 0's {items} steps: it composes their (a, b) pairs into one, then walks them from its start state"
    ax.text(0.04 + 0.06 * items, 0.14, note, va="center", fontsize=8.5)
    rounds = warp.bit_length() - 1
    scan = f"block scan of the threads' pairs, per state n: Hillis–Steele across each warp's {warp} lanes ({rounds}"
    ax.text(0.0, 0.04, f"{scan} rounds of __shfl_up_sync), then the {warps} warp totals via shared memory", fontsize=9)
    return fig


def plot_scan_times(lengths, timings, title):
    """Time against L, log-log, a panel per mode: timings maps (impl, backward) to milliseconds, one per length."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, backward in zip(axes, (False, True), strict=True):
        for (impl, mode), ms in timings.items():
            if mode == backward:
                ax.loglog(lengths, ms, "o-", label=impl)
        ax.set(xlabel="sequence length L", title="forward+backward" if backward else "forward (no_grad)")
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("time (ms)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Lesson 08 — TinyStories
# ----------------------------------------------------------------------------------------------------------

_RUN_COLORS = {"jamba": "C0", "mamba": "C1", "transformer": "C2"}


def plot_live_run(rows, planned_lr):
    """A live run's log rows: the learning rate it used beside planned_lr (one per step), and its losses."""
    fig, (ax_lr, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.5))
    trained = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    ax_lr.plot(range(len(planned_lr)), planned_lr, color="0.6", label="by steps alone (the clock at 0)")
    ax_lr.plot([r["step"] for r in trained], [r["lr"] for r in trained], "C0.", ms=4, label="used (the log)")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="warmup, then cosine to lr · min_lr_ratio")
    ax_loss.plot([r["step"] for r in trained], [r["loss"] for r in trained], "C0-", label="training (log_every means)")
    ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "C3o", label="validation windows")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="the loss")
    for ax in (ax_lr, ax_loss):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_loss_curves(runs, live=()):
    """Validation bits/byte of logged runs ({name: rows}; pair_* dashed) by wall-clock minutes and by tokens seen."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        evals = [r for r in rows if "val_bpb" in r]
        together = name.startswith("pair_")
        model = name.removeprefix("pair_")
        label = model + (" (together, 1 thread each)" if together else " (alone)")
        style = dict(color=_RUN_COLORS[model], ls="--" if together else "-", marker=".", label=label)
        axes[0].plot([r["elapsed_s"] / 60 for r in evals], [r["val_bpb"] for r in evals], **style)
        axes[1].plot([r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], **style)
    live = [r for r in live if "val_bpb" in r]
    axes[0].plot([r["elapsed_s"] / 60 for r in live], [r["val_bpb"] for r in live], "k:", label="the live run (§4)")
    axes[0].set(xlabel="wall-clock minutes", ylabel="validation bits/byte", title="at equal wall-clock budget")
    axes[1].set(xlabel="training tokens (millions)", ylabel="validation bits/byte", title="per token seen")
    for ax in axes:
        ax.set_ylim(0.8, 2.7)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_training_curves(curves, chance, title, paper=None):
    """Accuracy against training step, one colour per model and one thin line per seed, the mean over seeds bold.

    curves: {label: {seed: [(step, accuracy), ...]}}; paper: {label: accuracy} drawn as a dashed level per model.
    """
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for i, (label, runs) in enumerate(curves.items()):
        color = f"C{i}"
        for points in runs.values():
            ax.plot(*zip(*points, strict=True), color=color, lw=0.8, alpha=0.45)
        steps = [s for s, _ in next(iter(runs.values()))]
        mean = np.mean([[a for _, a in points] for points in runs.values()], axis=0)
        ax.plot(steps, mean, color=color, lw=2.2, label=f"{label}: {mean[-1]:.1%}")
        if paper and label in paper:
            ax.axhline(paper[label], color=color, ls="--", lw=1)
    ax.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.1%})")
    ax.set(xlabel="training step", ylabel="answer accuracy (eval batches)", ylim=(0, 1.02), title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_length_generalization(results, train_length, chance, title, paper=None):
    """Accuracy against log2(test length), one line per model, the training length marked (the paper's Figure).

    results: {label: {length: accuracy}}; paper: {label: {length: accuracy}} drawn as hollow markers.
    """
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    for i, (label, accuracies) in enumerate(results.items()):
        lengths = sorted(accuracies)
        ax.plot(np.log2(lengths), [accuracies[n] for n in lengths], "o-", color=f"C{i}", label=label)
        if paper and label in paper:
            reported = sorted(paper[label])
            ax.plot(np.log2(reported), [paper[label][n] for n in reported], "o", mfc="none", color=f"C{i}", ms=9)
    ax.axvline(np.log2(train_length), color="black", ls="--", lw=1, label=f"training length {train_length}")
    ax.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.1%})")
    ax.set(xlabel="log2(test length)", ylabel="answer accuracy", ylim=(0, 1.04), title=title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig
