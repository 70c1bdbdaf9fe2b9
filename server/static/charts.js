// Time-series charts drawn as SVG, with no library: lines with a point per bucket, stacked
// bars, a band of the active variant, and vertical markers (switches). Every drawn value
// carries its data (data-t, data-v) and the svg its scale (data-x0/x1, data-y0/y1 and the
// plot box), so what is drawn can be checked against the API. Labels are text nodes only.
"use strict";

window.PfCharts = (function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2557a7", "#d9730d", "#1f7a3d", "#b3261e", "#7b4bb7", "#0f8a8a",
                   "#a3690f", "#c2185b", "#546e7a", "#6d8d1e"];
  const PAD = { left: 52, right: 14, top: 10, bottom: 24 };
  const BAND_H = 12; // height of the active-variant strip under the plot

  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function titled(e, text) {
    e.appendChild(svgEl("title", {}, text));
    return e;
  }

  // Colours that stay the same for a name across charts and refreshes.
  function colorMap(names) {
    const m = new Map();
    [...new Set(names)].sort().forEach((n, i) => m.set(n, PALETTE[i % PALETTE.length]));
    return m;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function fmtNum(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100 || Number.isInteger(v)) return Math.round(v).toLocaleString("en-US");
    if (a >= 10) return v.toFixed(1);
    if (a >= 0.1) return v.toFixed(2);
    return String(Number(v.toPrecision(2))); // small energies: 0.00031, not 0.00
  }

  function fmtTime(t, span) {
    const d = new Date(t * 1000);
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
    if (span <= 2 * 86400) return hm;
    return d.toLocaleDateString([], { month: "short", day: "numeric" }) +
      (d.getHours() || d.getMinutes() ? " " + hm : "");
  }

  function timeTicks(x0, x1) {
    const span = x1 - x0;
    const steps = [60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                   2 * 86400, 7 * 86400];
    const step = steps.find((s) => span / s <= 7) || steps[steps.length - 1];
    const tzOffset = new Date(x0 * 1000).getTimezoneOffset() * 60; // local midnight
    const out = [];
    for (let t = Math.ceil((x0 - tzOffset) / step) * step + tzOffset; t <= x1; t += step) {
      out.push(t);
    }
    return out;
  }

  // opts: {x0, x1, step, kind: "line"|"bar"|"band", series: [{key, label, color, points: [[t, v]],
  //        stepLine}], yMax, unit, markers: [{t, label, cls, data}], bands: [{t0, t1, key,
  //        label, color}], empty, height}
  function draw(container, opts) {
    const width = Math.max(280, Math.round(container.clientWidth || 560));
    const hasBand = (opts.bands || []).length > 0;
    const bandOnly = opts.kind === "band"; // the band fills the plot; no value axis
    const height = opts.height || 180;
    const plotH = height - PAD.top - PAD.bottom - (hasBand && !bandOnly ? BAND_H + 4 : 0);
    const plotW = width - PAD.left - PAD.right;
    const { x0, x1 } = opts;
    const series = opts.series || [];
    const stacked = opts.kind === "bar";

    let top = 0;
    if (stacked) {
      const sums = new Map();
      for (const s of series) for (const [t, v] of s.points) sums.set(t, (sums.get(t) || 0) + v);
      top = Math.max(0, ...sums.values());
    } else {
      for (const s of series) for (const [, v] of s.points) if (v !== null) top = Math.max(top, v);
    }
    const y0 = opts.yMin || 0;
    let y1 = opts.yMax || niceMax(top);
    if (opts.integer && !opts.yMax) y1 = Math.max(4, Math.ceil(y1 / 4) * 4); // whole ticks
    const x = (t) => PAD.left + ((t - x0) / (x1 - x0)) * plotW;
    const y = (v) => PAD.top + plotH - ((v - y0) / (y1 - y0)) * plotH;

    const svg = svgEl("svg", {
      width, height, viewBox: `0 0 ${width} ${height}`, class: "chart-svg",
      "data-x0": x0, "data-x1": x1, "data-y0": y0, "data-y1": y1, "data-step": opts.step || 0,
      "data-plot-left": PAD.left, "data-plot-top": PAD.top, "data-plot-width": plotW,
      "data-plot-height": plotH, role: "img", "aria-label": opts.title || "chart",
    });

    const grid = svg.appendChild(svgEl("g", { class: "grid" }));
    for (let i = 0; i <= 4 && !bandOnly; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      grid.appendChild(svgEl("line", { x1: PAD.left, x2: PAD.left + plotW, y1: y(v), y2: y(v) }));
      grid.appendChild(svgEl("text", { x: PAD.left - 6, y: y(v) + 4, class: "ylabel" },
                             fmtNum(v) + (i === 4 && opts.unit ? " " + opts.unit : "")));
    }
    for (const t of timeTicks(x0, x1)) {
      grid.appendChild(svgEl("line", { x1: x(t), x2: x(t), y1: PAD.top, y2: PAD.top + plotH,
                                       class: "vgrid" }));
      grid.appendChild(svgEl("text", { x: x(t), y: height - 6, class: "xlabel" },
                             fmtTime(t, x1 - x0)));
    }

    const plot = svg.appendChild(svgEl("g", { class: "plot" }));
    // Points further apart than three buckets are not joined: the device was silent.
    const gap = 3 * (opts.step || 0);
    if (stacked) {
      const base = new Map();
      const bw = Math.max(3, (opts.step / (x1 - x0)) * plotW - 1);
      for (const s of series) {
        for (const [t, v] of s.points) {
          if (!v) continue;
          const b = base.get(t) || 0;
          base.set(t, b + v);
          plot.appendChild(titled(svgEl("rect", {
            class: "bar", x: x(t), y: y(b + v), width: bw, height: Math.max(0, y(b) - y(b + v)),
            fill: s.color, "data-series": s.key, "data-t": t, "data-v": v,
          }), `${s.label}: ${fmtNum(v)} at ${fmtTime(t, 0)}`));
        }
      }
    } else {
      for (const s of series) {
        let d = "";
        let prev = null;
        for (const [t, v] of s.points) {
          if (v === null || v === undefined) { prev = null; continue; }
          const broken = prev === null || (gap > 0 && t - prev[0] > gap && !s.stepLine);
          if (broken) d += `M${x(t).toFixed(1)},${y(v).toFixed(1)}`;
          else if (s.stepLine) d += `H${x(t).toFixed(1)}V${y(v).toFixed(1)}`;
          else d += `L${x(t).toFixed(1)},${y(v).toFixed(1)}`;
          prev = [t, v];
        }
        if (s.stepLine && prev) d += `H${x(x1).toFixed(1)}`;
        plot.appendChild(svgEl("path", { class: "line", d, stroke: s.color,
                                         "data-series": s.key }));
        for (const [t, v] of s.points) {
          if (v === null || v === undefined) continue;
          plot.appendChild(titled(svgEl("circle", {
            class: "pt", cx: x(t).toFixed(2), cy: y(v).toFixed(2), r: s.points.length > 150 ? 1.6 : 2.4,
            fill: s.color, "data-series": s.key, "data-t": t, "data-v": v,
          }), `${s.label}: ${fmtNum(v)}${opts.unit ? " " + opts.unit : ""} at ${fmtTime(t, 0)}`));
        }
      }
    }

    if (hasBand) {
      const by = bandOnly ? PAD.top : PAD.top + plotH + 4;
      const bh = bandOnly ? plotH : BAND_H;
      const band = svg.appendChild(svgEl("g", { class: "bands" }));
      for (const b of opts.bands) {
        const bx0 = Math.max(x(b.t0), PAD.left);
        const bx1 = Math.min(x(b.t1), PAD.left + plotW);
        if (bx1 <= bx0) continue;
        band.appendChild(titled(svgEl("rect", {
          class: "band", x: bx0, y: by, width: bx1 - bx0, height: bh, fill: b.color,
          "data-variant": b.key, "data-t0": b.t0, "data-t1": b.t1,
        }), `${b.label}: ${fmtTime(b.t0, 0)}–${fmtTime(b.t1, 0)}`));
      }
    }

    const marks = svg.appendChild(svgEl("g", { class: "markers" }));
    for (const m of opts.markers || []) {
      if (m.t < x0 || m.t > x1) continue;
      const attrs = { class: "marker " + (m.cls || ""), x1: x(m.t).toFixed(2),
                      x2: x(m.t).toFixed(2), y1: PAD.top, y2: PAD.top + plotH, "data-t": m.t };
      for (const [k, v] of Object.entries(m.data || {})) attrs["data-" + k] = v;
      marks.appendChild(titled(svgEl("line", attrs), m.label));
      marks.appendChild(titled(svgEl("path", {
        class: "marker-head " + (m.cls || ""),
        d: `M${(x(m.t) - 4).toFixed(1)},${PAD.top}h8l-4,6z`,
      }), m.label));
    }

    // A band-only chart (kind "band") is empty without bands; any other without points.
    if (!series.some((s) => s.points.length) && (opts.kind !== "band" || !hasBand)) {
      svg.appendChild(svgEl("text", { x: PAD.left + plotW / 2, y: PAD.top + plotH / 2,
                                      class: "empty" }, opts.empty || "no data in this range"));
    }
    container.replaceChildren(svg);
    return svg;
  }

  function legend(container, items) {
    container.replaceChildren(...items.map(({ label, color, value }) => {
      const item = document.createElement("span");
      item.className = "legend-item";
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = color; // CSSOM, allowed by the page's CSP
      item.appendChild(sw);
      item.appendChild(document.createTextNode(label));
      if (value !== undefined) {
        const v = document.createElement("span");
        v.className = "legend-value";
        v.textContent = value;
        item.appendChild(v);
      }
      return item;
    }));
  }

  return { draw, legend, colorMap, fmtNum, fmtTime, PALETTE };
})();
