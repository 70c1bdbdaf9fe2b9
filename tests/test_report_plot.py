"""report.png: the names of variants that sit close together do not overlap."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg", force=True)
from matplotlib import pyplot as plt

from prunefleet.server.prepare.report import _place_labels, plot_png

# Six variants of one model: four of them within a few microseconds and tenths of a point.
POINTS = {"dense": (0.066, 99.2), "struct50": (0.028, 99.2), "struct50-int8": (0.029, 99.1),
          "struct75": (0.018, 99.7), "struct75-iter": (0.019, 99.6), "mag50": (0.065, 99.1)}


def test_close_variants_get_labels_that_do_not_overlap():
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for x, y in POINTS.values():
            ax.scatter([x], [y])
        labels = _place_labels(fig, ax, POINTS)
        assert sorted(lb.get_text() for lb in labels) == sorted(POINTS)
        fig.canvas.draw()
        boxes = [lb.get_window_extent(fig.canvas.get_renderer()) for lb in labels]
        pairs = itertools.combinations(zip(labels, boxes, strict=True), 2)
        clashes = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in pairs
                   if ba.overlaps(bb)]
        assert clashes == []
    finally:
        plt.close(fig)


def test_the_report_plot_renders():
    report = {"pareto_metric": "accuracy", "pareto": ["struct75", "dense"], "variants": [
        {"name": n, "latency_ms_p50": x, "accuracy": y / 100, "quantize": "int8" in n,
         "pareto": n in ("struct75", "dense")} for n, (x, y) in POINTS.items()]}
    png = plot_png(report)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
