"""The figure style of the experiments' plots: sized to read where they are shown.

The figures are shown about 800 px wide (a GitHub README column, a documentation page). A
figure ``w`` inches wide is then drawn at ``800 / w`` px per inch, so a ``f``-point font comes
out ``f · 800 / (72 · w)`` px tall: 11 pt in a 12-inch figure is about 10 px. Every figure here
is at most 12 inches wide with fonts of at least 10 pt, and puts its legend beside or under the
panels (never over the curves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

MAX_WIDTH_IN = 12.0
DPI = 120
STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "lines.linewidth": 1.8,
    "savefig.dpi": DPI,
}


@contextlib.contextmanager
def style() -> Iterator[object]:
    """Yields ``matplotlib.pyplot`` (Agg backend) with :data:`STYLE` applied inside the block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        yield plt


def legend_below(fig, axes: Sequence, *, ncol: int = 3, extra: Sequence = ()) -> None:
    """One legend for all ``axes`` under the figure: each label once, in order of appearance.

    Args:
      fig: the figure.
      axes: the panels whose labelled artists go into the legend.
      ncol: legend columns.
      extra: more ``(handle, label)`` pairs appended after the panels' own.
    """
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    for handle, label in extra:
        seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="outside lower center",
            ncol=min(ncol, len(seen)),
            frameon=False,
        )


def log_ticks(axis, values: Sequence[float]) -> None:
    """Labels a log axis at exactly ``values`` (plain numbers) and drops the minor labels, which
    overlap when the axis spans less than two decades."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    axis.set_major_locator(FixedLocator(list(values)))
    axis.set_major_formatter(lambda x, _: f"{x:g}")
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
