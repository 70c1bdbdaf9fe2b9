"""The human side of a report: Pareto selection, a Markdown table and an accuracy/latency plot.

The Pareto front keeps each variant that no other variant beats on both latency (p50, lower
is better) and accuracy (higher is better): another one at least as good on both and better
on one. Without data the score is the top-1 agreement with the dense model instead.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

UNSTRUCTURED_NOTE = (
    "unstructured sparsity: ONNX Runtime runs it no faster than dense (zeros are still "
    "multiplied); its gain is the compressed size"
)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated ``(name, latency, score)`` points, fastest first."""
    front = []
    for name, lat, score in points:
        dominated = any(
            (lat2 <= lat and s2 >= score) and (lat2 < lat or s2 > score)
            for n2, lat2, s2 in points if n2 != name
        )
        if not dominated:
            front.append((lat, name))
    return [n for _, n in sorted(front)]


def _fmt(v: Any, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def markdown(report: dict[str, Any], plot_name: str | None) -> str:
    """``report.md``: what was prepared, one row per variant, the Pareto front, the plot."""
    lat = report["latency"]
    lines = [
        f"# Variants of `{report['model']['factory']}`",
        "",
        f"Input shape {report['input_shape']}; data: {report['dataset']['name'] if report.get('dataset') else 'none (accuracy not measured)'}. "  # noqa: E501
        f"Latency: ONNX Runtime {report['versions']['onnxruntime']}, CPU, "
        f"{lat['intra_op_num_threads']} intra-op thread, batch {lat['batch']}, "
        f"{lat['runs']} runs interleaved over {lat['rounds']} rounds; "
        f"speedup against `{report['dense']}` in the same run.",
        "",
        "| variant | technique | ratio | int8 | params | MACs | ONNX KiB | zlib KiB | "
        "p50 ms | p95 ms | speedup | accuracy % | top-1 agree % | memory MB | energy mJ | "
        "Pareto | target |",
        "|---|---|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for v in report["variants"]:
        ratio = (f"{v['ratio']:.2f}" if v["ratio"] is not None
                 else f"MACs {v['macs_ratio']:.2f}" if v["macs_ratio"] is not None else "—")
        acc = _fmt(None if v["accuracy"] is None else 100 * v["accuracy"], ".2f")
        lines.append(
            f"| {v['name']} | {v['technique']} | {ratio} | {'yes' if v['quantize'] else ''} | "
            f"{v['params']:,} | {v['macs']:,} | {v['onnx_bytes'] / 1024:.1f} | "
            f"{v['compressed_bytes'] / 1024:.1f} | {v['latency_ms_p50']:.3f} | "
            f"{v['latency_ms_p95']:.3f} | {v['speedup']:.2f}x | {acc} | "
            f"{100 * v['top1_agreement']:.2f} | {_fmt(v.get('memory_mb'), '.1f')} | "
            f"{_fmt(v.get('energy_mj'), '.4f')} | {'★' if v['pareto'] else ''} | "
            f"{_target_cell(v.get('target'))} |"
        )
    lines += ["", f"Pareto front ({report['pareto_metric']} vs p50 latency): "
              + ", ".join(f"`{n}`" for n in report["pareto"]) + "."]
    sources = sorted({v["energy_source"] for v in report["variants"] if v.get("energy_source")})
    lines += ["", "Memory: what creating the variant's ONNX Runtime session and one run added "
              "to a fresh process's resident memory. Energy: per inference on this host "
              f"({', '.join(sources) or 'not measured'})."]
    lines += _target_lines(report.get("target"))
    notes = [f"- `{v['name']}`: {v['note']}" for v in report["variants"] if v.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    if plot_name:
        lines += ["", f"![{report['pareto_metric']} vs latency]({plot_name})"]
    return "\n".join(lines) + "\n"


def _target_cell(t: dict[str, Any] | None) -> str:
    return "" if t is None else "meets" if t["meets"] else "**misses**"


def _target_lines(t: dict[str, Any] | None) -> list[str]:
    """The target, how channels were rounded, the latency model, dropped INT8 variants."""
    if not t:
        return []
    budgets = [f"p95 ≤ {t['latency_budget_ms']:g} ms" if t.get("latency_budget_ms") else "",
               f"session memory ≤ {t['memory_budget_mb']:g} MB"
               if t.get("memory_budget_mb") else "",
               f"accuracy drop ≤ {t['max_accuracy_drop_pp']:g} points"
               if t.get("max_accuracy_drop_pp") is not None else ""]
    what = f"class `{t['device_class']}`" if t.get("device_class") else "this host"
    lines = ["", f"## Target: {what}", ""]
    if any(budgets) or t.get("goal"):
        lines.append(f"Budgets: {', '.join(b for b in budgets if b) or 'none'}; goal: "
                     f"{t.get('goal', 'latency')}. Latency judged from: "
                     f"{t.get('latency_source', 'this host')}. A variant that misses a "
                     "budget is still produced, and marked.")
    if t.get("tier_note"):
        lines.append(f"{t['tier_note']}.")
    r = t.get("round_to")
    if r:
        timed = "; ".join(f"{k}: {v['speedup']:.2f}x of ideal {v['ideal_speedup']:.2f}x"
                          for k, v in sorted(r.get("timed", {}).items(), key=lambda kv:
                                             int(kv[0])))
        lines.append(f"Channel rounding (`round_to = \"auto\"`): {r['chosen']} "
                     f"({r['source']}; the {r['tier']} rule says {r['rule']})"
                     + (f"; timed keeping {r.get('probe_macs_ratio')} of the MACs: {timed}"
                        if timed else "")
                     + (f"; not timed: {r['not_timed']}" if r.get("not_timed") else "")
                     + ".")
    m = t.get("latency_model")
    if m:
        for fam, f in m["fits"].items():
            loo = ("leave-one-out error "
                   f"{f['loo_mae_ms']:.4f} ms ({100 * f['loo_mape']:.1f}%)"
                   if f.get("loo_mae_ms") is not None else "too few points for a "
                   "leave-one-out error")
            lines.append(f"Latency model ({m['source']}, {fam}): p95 ≈ {f['a']:.4f} ms + "
                         f"{f['b_ms_per_mmac']:.4f} ms per million MACs, {f['n']} points, "
                         f"{loo}.")
        if m.get("note"):
            lines.append(m["note"] + ".")
    if t.get("latency_note"):
        lines.append(t["latency_note"] + ".")
    # One paragraph each (Markdown joins adjacent lines), then the list.
    lines = [*lines[:3], *[x for line in lines[3:] for x in (line, "")]]
    for name, s in (t.get("search") or {}).items():
        lines.append(f"- `{name}`: {s['result']}.")
    for d in t.get("dropped") or []:
        lines.append(f"- dropped `{d['name']}`: {d['reason']}.")
    return lines


def plot_png(report: dict[str, Any]) -> bytes:
    """Accuracy (or top-1 agreement) against p50 latency; the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    metric = report["pareto_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        pts = {v["name"]: (v["latency_ms_p50"], 100 * v[metric]) for v in report["variants"]
               if v[metric] is not None}
        for v in report["variants"]:
            if v["name"] not in pts:
                continue
            x, y = pts[v["name"]]
            marker = "s" if v["quantize"] else "o"
            ax.scatter([x], [y], marker=marker, s=40,
                       color="C1" if v["pareto"] else "C0", zorder=3)
        _place_labels(fig, ax, pts)
        front = [pts[n] for n in report["pareto"] if n in pts]
        if len(front) > 1:
            ax.plot(*zip(*sorted(front), strict=True), color="C1", lw=1, zorder=2)
        ax.set_xlabel("p50 latency, ms (ONNX Runtime, 1 thread, batch 1)")
        ax.set_ylabel("accuracy, %" if metric == "accuracy" else "top-1 agreement with dense, %")
        ax.set_title("variants (orange: Pareto front; squares: INT8)")
        ax.grid(True, alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


# Where a label may go around its point (offset in points, horizontal alignment), nearest
# first: variants of one model often sit close together, and their names must not overlap.
_LABEL_SPOTS = [(4, 4, "left"), (4, -11, "left"), (-4, 4, "right"), (-4, -11, "right"),
                (4, 15, "left"), (4, -22, "left"), (-4, 15, "right"), (-4, -22, "right"),
                (4, 26, "left"), (4, -33, "left"), (-4, 26, "right"), (-4, -33, "right")]


def _place_labels(fig, ax, pts: dict[str, tuple[float, float]]) -> list:
    """Annotate each point with its name at the first spot where the label overlaps no
    label placed before it and stays inside the axes; the last spot tried otherwise."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list = []
    labels = []
    for name, (x, y) in sorted(pts.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        for dx, dy, ha in _LABEL_SPOTS:
            label = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy),
                                fontsize=8, ha=ha)
            box = label.get_window_extent(renderer)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                      and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(b) for b in placed):
                break
            if (dx, dy, ha) != _LABEL_SPOTS[-1]:
                label.remove()
        placed.append(box)
        labels.append(label)
    return labels
