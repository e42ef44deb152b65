"""PNG plots (matplotlib, Agg backend: no display needed): heatmaps for depth x length grids and line charts."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(grid: dict[str, dict[str, float]], path: Path, title: str, label: str = "score") -> None:
    """grid[length][depth] -> value; depth down, length across, each cell annotated."""
    plt = _pyplot()
    lengths = list(grid)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    values = [[grid[length].get(depth, float("nan")) for length in lengths] for depth in depths]
    figure, axes = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = axes.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(lengths)), [format_length(int(x)) for x in lengths])
    axes.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            if value == value:  # not NaN
                axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label=label)
    axes.set_title(title)
    _save(figure, path)


def lines(
    series: dict[str, dict[float, float]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    marks: dict[str, float] | None = None,
    percent: bool = False,
) -> None:
    """One line per series (x -> y); `marks` draws labelled vertical lines (e.g. the training length); percent
    fixes the y axis to 0-100."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", markersize=3, label=name)
    for name, x in (marks or {}).items():
        axes.axvline(x, color="grey", linestyle="--", linewidth=1)
        axes.text(x, 1.0, f" {name}", transform=axes.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    if logx:
        axes.set_xscale("log", base=2)
    if logy:
        axes.set_yscale("log")
    if percent:
        axes.set_ylim(-3, 103)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(series) > 1 or marks:
        axes.legend(fontsize=7)
    _save(figure, path)


def head_heatmaps(panels: dict, positions: list[int], path: Path, title: str, mark: int | None = None) -> None:
    """One heatmap per panel (name -> heads x chunks array), heads down and position across, each with its own
    colour scale (log10 where the values span more than a decade); `mark` draws the training length."""
    import numpy as np

    plt = _pyplot()
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 0.9 + 1.3 * len(panels)), squeeze=False)
    for axis, (name, values) in zip(axes[:, 0], panels.items(), strict=True):
        values = np.asarray(values, dtype=float)
        positive = values[values > 0]
        log = positive.size == values.size and positive.max() > 10 * positive.min()
        shown = np.log10(values) if log else values
        image = axis.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest",
                            extent=(0, positions[len(values[0]) - 1], values.shape[0] - 0.5, -0.5))
        if mark:
            axis.axvline(mark, color="red", linestyle="--", linewidth=1)
        axis.set_ylabel("head", fontsize=7)
        axis.set_title(name + (" (log10)" if log else ""), fontsize=8)
        axis.tick_params(labelsize=7)
        figure.colorbar(image, ax=axis, pad=0.01)
    axes[-1, 0].set_xlabel("position (tokens)")
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 and tokens >= 1024 else str(tokens)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
