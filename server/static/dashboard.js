// The prunefleet dashboard: polls the /v1 JSON API with the bearer token and renders the
// fleet (summary tiles, trend charts, a searchable paged device table, device classes with
// their on-device profiles, variants, rollouts) or one device (its hardware facts and
// profiles, its telemetry charts, active variant band, switch markers). Charts are
// SVG drawn by charts.js. Device-provided strings only ever reach the DOM as text
// (textContent), never as markup; the page's Content-Security-Policy forbids inline
// script as a second line.
"use strict";

(function () {
  const POLL_MS = 5000;
  const KEY = "prunefleet.token";
  const PAGE = 50;
  const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400 };
  const C = window.PfCharts;
  let timer = null;
  let typing = null;
  const state = { range: "24h", device: null, q: "", group: "", online: "", offset: 0,
                  classQ: "" };
  let last = null; // the last data rendered, redrawn on resize
  let lastClasses = null; // GET /v1/classes as last shown, refiltered as one types
  let generation = 0; // a newer refresh supersedes an older one still in flight

  const $ = (id) => document.getElementById(id);

  // Route and time range live in the fragment (#device=ID&range=1h). The token may arrive
  // there too (#token=...), which the browser never sends to the server: keep it for this
  // tab and take it out of the address bar and history.
  function readFragment() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const token = params.get("token");
    if (token) {
      sessionStorage.setItem(KEY, token);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", window.location.pathname + window.location.search +
                           (rest ? "#" + rest : ""));
    }
    const range = params.get("range");
    state.range = RANGES[range] ? range : "24h";
    state.device = params.get("device") || null;
  }

  function link(params) {
    return "#" + new URLSearchParams(params).toString();
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }

  function fill(tableId, rows, columns, emptyText) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
    if (rows.length === 0) {
      const td = el("td", emptyText, "empty");
      td.colSpan = columns;
      body.appendChild(row([td]));
    }
  }

  const num = (n) => el("td", n === null || n === undefined ? "–" : n.toLocaleString("en-US"),
                        "num");
  const pct = (x) => el("td", x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %",
                        "num");

  function ago(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 120) return Math.round(s) + " s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function per(seconds) {
    if (seconds % 86400 === 0) return `per ${seconds / 86400} d`;
    if (seconds % 3600 === 0) return `per ${seconds / 3600} h`;
    if (seconds % 60 === 0) return `per ${seconds / 60} min`;
    return `per ${seconds} s`;
  }

  function chips(items) {
    const td = document.createElement("td");
    for (const t of items) td.appendChild(el("span", t, "chip"));
    return td;
  }

  function setRangeLabels() {
    for (const b of document.querySelectorAll(".range button")) {
      b.setAttribute("aria-pressed", String(b.dataset.range === state.range));
    }
    for (const e of document.querySelectorAll(".range-label")) {
      e.textContent = "(last " + state.range.replace("h", " h").replace("d", " d") + ")";
    }
  }

  // -- the fleet ------------------------------------------------------------------------
  function renderSummary(summary) {
    const online = summary.online;
    $("fleet-summary").textContent =
      `${summary.devices} devices: ${online} online, ${summary.devices - online} offline`;
    $("fleet-summary").dataset.online = String(online);
  }

  function renderDevices(devices, total) {
    const end = state.offset + devices.length;
    $("page-info").textContent = total === 0 ? "no device matches"
      : `${(state.offset + 1).toLocaleString("en-US")}–${end.toLocaleString("en-US")} of ` +
        `${total.toLocaleString("en-US")}`;
    $("page-info").dataset.total = String(total);
    $("page-prev").disabled = state.offset === 0;
    $("page-next").disabled = end >= total;
    fill("devices", devices.map((d) => {
      const r = d.rollout;
      let phase = "–";
      if (r) {
        phase = `v${r.manifest_version} ${r.phase}`;
        if (r.phase === "downloading") phase += ` ${Math.round(100 * r.progress)} %`;
      }
      const counters = Object.entries(d.counters || {})
        .filter(([, n]) => n !== 0).map(([k, n]) => `${k}=${n}`);
      const name = el("td");
      const a = el("a", d.device_id);
      a.href = link({ device: d.device_id, range: state.range });
      name.appendChild(a);
      const tr = row([
        name,
        el("td", d.online ? "online" : "offline", d.online ? "online" : "offline"),
        el("td", d.active_variant || "–"),
        chips((d.installed || []).map((v) => (v && v.name) || String(v))),
        el("td", phase),
        el("td", ago(d.last_seen)),
        el("td", d.last_error || "", "error"),
        chips(counters),
      ]);
      tr.dataset.device = d.device_id;
      return tr;
    }), 8, total === 0 && (state.q || state.group || state.online)
      ? "no device matches these filters" : "no device has reported yet");
  }

  function renderVariants(summary, registered) {
    // Every registered variant, served or not, then names only telemetry knows.
    const macs = new Map();
    for (const v of registered) macs.set(v.name, v.macs);
    const served = summary.variants || {};
    const names = [...new Set([...macs.keys(), ...Object.keys(served)])];
    fill("variants", names.map((name) => {
      const v = served[name] || {};
      const p50 = v.latency_ms_p50_mean;
      const tr = row([
        el("td", name), num(macs.get(name)), num(v.devices ?? 0), num(v.requests ?? 0),
        num(v.errors ?? 0), pct(v.accuracy),
        el("td", p50 === null || p50 === undefined ? "–" : p50.toFixed(2) + " ms", "num"),
      ]);
      tr.dataset.variant = name;
      return tr;
    }), 7, "no variant registered");
  }

  function renderRollouts(rollouts) {
    fill("rollouts", rollouts.slice().reverse().map((r) => {
      const c = r.counts || {};
      return row([
        num(r.id), el("td", r.status, "rollout-" + r.status), el("td", r.stage),
        chips((r.variants || []).map((v) => v.name)),
        el("td", `${c.succeeded ?? 0} / ${c.failed ?? 0} / ${c.total ?? 0}`, "num"),
        el("td", r.reason || ""),
      ]);
    }), 6, "no rollouts");
  }

  function tile(label, value, note, key) {
    const t = el("div", null, "tile");
    t.dataset.tile = key;
    t.appendChild(el("div", label, "tile-label"));
    t.appendChild(el("div", value, "tile-value"));
    if (note) t.appendChild(el("div", note, "tile-note"));
    return t;
  }

  function sumOf(buckets, field) {
    let s = 0;
    for (const b of buckets) for (const v of Object.values(b[field])) s += v;
    return s;
  }

  function renderTiles(summary, series, rollouts) {
    const running = rollouts.filter((r) => r.status === "active" || r.status === "paused");
    const energy = sumOf(series.buckets, "energy_j");
    $("tiles").replaceChildren(
      tile("devices", summary.devices.toLocaleString("en-US"),
           `${(summary.devices - summary.online).toLocaleString("en-US")} offline`, "devices"),
      tile("online", summary.online.toLocaleString("en-US"),
           summary.devices ? `${Math.round((100 * summary.online) / summary.devices)} %` : "",
           "online"),
      tile("requests", C.fmtNum(sumOf(series.buckets, "requests")), "last " + state.range,
           "requests"),
      tile("energy", energy >= 1000 ? C.fmtNum(energy / 1000) + " kJ" : C.fmtNum(energy) + " J",
           "last " + state.range, "energy"),
      tile("switches", C.fmtNum(sumOf(series.buckets, "switches")), "last " + state.range,
           "switches"),
      tile("rollouts running", String(running.length),
           running.length ? running.map((r) => "#" + r.id + " " + r.stage).join(", ") : "none",
           "rollouts"),
    );
  }

  function chartIn(id, opts, legendItems) {
    const fig = $(id);
    C.draw(fig.querySelector(".plot-box"), opts);
    const lg = fig.querySelector(".legend");
    if (lg && legendItems) C.legend(lg, legendItems);
  }

  function byKey(buckets, field, keys, colors, fmt) {
    // A bucket with telemetry but nothing for a key is a 0; a bucket without telemetry
    // is a gap in the line.
    return keys.map((k) => ({
      key: k, label: k, color: colors.get(k),
      points: buckets.map((b) => [b.t, b[field][k] ?? 0]),
      total: buckets.reduce((s, b) => s + (b[field][k] ?? 0), 0), fmt,
    }));
  }

  function renderSeries(series, registered) {
    const x0 = series.since, x1 = series.until, step = series.resolution_s;
    const variants = [...new Set([...registered.map((v) => v.name), ...series.variants])];
    const vc = C.colorMap(variants);
    const shown = series.variants; // variants with telemetry in this range
    for (const id of ["chart-requests", "chart-energy", "chart-switches"]) {
      $(id).querySelector(".per").textContent = "(" + per(step) + ")";
    }
    const base = { x0, x1, step, empty: "no telemetry in this range" };
    // Buckets holding only switches (their batches fell into the next bucket) are no
    // evidence of zero requests: the lines skip them.
    const reported = series.buckets.filter((b) => b.devices_online > 0);
    const req = byKey(reported, "requests", shown, vc);
    chartIn("chart-requests", { ...base, series: req, title: "requests by variant" },
            req.map((s) => ({ label: s.label, color: s.color, value: C.fmtNum(s.total) })));
    const en = byKey(reported, "energy_j", shown, vc);
    chartIn("chart-energy", { ...base, series: en, unit: "J", title: "energy by variant" },
            en.map((s) => ({ label: s.label, color: s.color, value: C.fmtNum(s.total) + " J" })));
    const rc = C.colorMap(series.reasons);
    const sw = byKey(series.buckets, "switches", series.reasons, rc)
      .map((s) => ({ ...s, points: s.points.filter(([, v]) => v > 0) }));
    chartIn("chart-switches", { ...base, kind: "bar", integer: true, series: sw,
                                title: "switches by reason",
                                empty: "no switches in this range" },
            sw.map((s) => ({ label: s.label, color: s.color, value: C.fmtNum(s.total) })));
    chartIn("chart-online", { ...base, integer: true, title: "devices online", series: [{
      key: "online", label: "devices", color: C.PALETTE[2],
      points: reported.map((b) => [b.t, b.devices_online]) }] }, null);
    const ro = series.rollouts.map((r, i) => ({
      key: "#" + r.id, label: `#${r.id} ${r.status}`, color: C.PALETTE[(i + 4) % 10],
      stepLine: true, total: r.total,
      points: r.points.map((p) => [p.t, r.total ? (100 * p.succeeded) / r.total : 0]),
    }));
    chartIn("chart-rollouts", { ...base, yMax: 100, unit: "%", series: ro,
                                title: "rollout progress", empty: "no rollout in this range" },
            series.rollouts.map((r, i) => {
              const p = r.points[r.points.length - 1] || { succeeded: 0, failed: 0 };
              return { label: `#${r.id} ${r.status}`, color: ro[i].color,
                       value: `${p.succeeded}/${r.total} ok, ${p.failed} failed` };
            }));
  }

  // -- device classes: on-device profiles aggregated per class ---------------------------
  // A measured figure: three decimals below 1, two below 1,000, then grouped integers.
  function fmtFig(x) {
    if (x === null || x === undefined) return "–";
    const a = Math.abs(x);
    return a < 1 ? x.toFixed(3) : a < 1000 ? x.toFixed(2)
      : Math.round(x).toLocaleString("en-US");
  }

  // One aggregated figure ({n, median, p25, p75, min, max}): the median, under it the
  // quartiles where more than one profile stands behind it, and its count where that is
  // fewer than the variant's profiles (a field some devices leave out, like memory).
  function figCell(fig, profiled, field) {
    const td = el("td", null, "num");
    td.dataset.field = field;
    if (!fig) {
      td.textContent = "–";
      return td;
    }
    td.dataset.median = String(fig.median);
    td.dataset.n = String(fig.n);
    td.appendChild(el("span", fmtFig(fig.median), "median"));
    if (fig.n > 1) td.appendChild(el("span", `${fmtFig(fig.p25)}–${fmtFig(fig.p75)}`, "spread"));
    if (fig.n !== profiled) td.appendChild(el("span", `n ${fig.n}`, "spread n"));
    td.title = `median of ${fig.n} profile${fig.n === 1 ? "" : "s"}; quartiles ` +
      `${fmtFig(fig.p25)}–${fmtFig(fig.p75)}; range ${fmtFig(fig.min)}–${fmtFig(fig.max)}`;
    return td;
  }

  function sourcesCell(sources) {
    const td = el("td", null, "sources");
    for (const [src, n] of Object.entries(sources || {})) {
      const chip = el("span", `${src} ${n}`, "chip");
      chip.dataset.source = src;
      chip.dataset.n = String(n);
      td.appendChild(chip);
    }
    if (!td.firstChild) td.textContent = "–";
    return td;
  }

  const p95Of = (v) => (v.latency_ms_p95 ? v.latency_ms_p95.median : Infinity);

  // Classes with the most devices first; in each, the variants fastest (median p95) first.
  // A search keeps a class whose name matches whole, else only its matching variants.
  function renderClasses(data) {
    lastClasses = data;
    const classes = Object.entries(data.classes || {})
      .sort(([a, x], [b, y]) => y.devices - x.devices || (a < b ? -1 : a > b ? 1 : 0));
    const q = state.classQ.toLowerCase();
    const rows = [];
    let shown = 0, profiles = 0;
    for (const [name, c] of classes) {
      let variants = Object.values(c.variants || {})
        .sort((a, b) => p95Of(a) - p95Of(b) || (a.name < b.name ? -1 : 1));
      profiles += variants.reduce((sum, v) => sum + v.devices, 0);
      if (q && !name.toLowerCase().includes(q)) {
        variants = variants.filter((v) => v.name.toLowerCase().includes(q));
        if (variants.length === 0) continue;
      }
      shown++;
      const head = [el("td", name, "cls"), num(c.devices)];
      for (const td of head) td.rowSpan = Math.max(1, variants.length);
      if (variants.length === 0) {
        const td = el("td", "no profiles yet", "empty");
        td.colSpan = 8;
        const tr = row([...head, td]);
        tr.className = "class-first";
        tr.dataset.class = name;
        rows.push(tr);
        continue;
      }
      variants.forEach((v, i) => {
        const tr = row([...(i === 0 ? head : []), el("td", v.name, "variant"), num(v.devices),
                        figCell(v.latency_ms_p95, v.devices, "latency_ms_p95"),
                        figCell(v.latency_ms_p50, v.devices, "latency_ms_p50"),
                        figCell(v.energy_mj, v.devices, "energy_mj"),
                        sourcesCell(v.energy_sources),
                        figCell(v.memory_mb, v.devices, "memory_mb"),
                        figCell(v.cpu_ms, v.devices, "cpu_ms")]);
        if (i === 0) tr.className = "class-first";
        tr.dataset.class = name;
        tr.dataset.variant = v.name;
        rows.push(tr);
      });
    }
    const devices = classes.reduce((sum, [, c]) => sum + c.devices, 0);
    let empty = "no device has reported its facts and profiles yet (an agent profiles " +
      "each variant after installing it)";
    if (classes.length && q) empty = "no class or variant matches";
    fill("classes", rows, 10, empty);
    $("class-info").textContent = classes.length === 0 ? "" :
      (q ? `${shown} of ${classes.length} classes` :
        `${classes.length} class${classes.length === 1 ? "" : "es"}`) +
      `, ${devices.toLocaleString("en-US")} devices, ` +
      `${profiles.toLocaleString("en-US")} profiles`;
  }

  // -- one device -----------------------------------------------------------------------
  function fact(dl, term, value) {
    const pair = el("div");
    pair.appendChild(el("dt", term));
    const dd = el("dd", value);
    dd.dataset.fact = term;
    pair.appendChild(dd);
    dl.appendChild(pair);
  }

  // The variant a device reported holds until its next report: a band runs on over
  // buckets without telemetry up to three buckets wide (the telemetry interval may be
  // longer than a bucket) and breaks where the device was silent for longer.
  function bandsOf(hist, colors) {
    const out = [];
    const step = hist.resolution_s;
    for (const b of hist.buckets) {
      if (!b.active_variant) continue;
      const cur = out[out.length - 1];
      const joins = cur && b.t - cur.t1 <= 3 * step + 1e-6;
      if (joins) cur.t1 = b.t;
      if (joins && cur.key === b.active_variant) {
        cur.t1 = b.t + step;
      } else {
        out.push({ key: b.active_variant, label: b.active_variant, t0: b.t, t1: b.t + step,
                   color: colors.get(b.active_variant) });
      }
    }
    return out;
  }

  // The device's measured time of a profile, UTC to the second (as the CLI prints it).
  function utc(ts) {
    return ts ? new Date(ts * 1000).toISOString().replace(/\.\d+Z$/, "Z") : "–";
  }

  function renderHardware(prof) {
    const dl = $("device-hardware");
    dl.replaceChildren();
    const f = prof.facts;
    if (!f) {
      fact(dl, "class", "not reported yet");
      return;
    }
    fact(dl, "class", f.device_class);
    fact(dl, "arch", f.arch);
    fact(dl, "CPU", f.cpu_model || "unknown");
    fact(dl, "ISA", (f.isa || []).join(", ") || "–");
    fact(dl, "cores", f.cores);
    fact(dl, "memory", f.memory_mb ? f.memory_mb.toLocaleString("en-US") + " MB" : "–");
    fact(dl, "onnxruntime", f.ort_version || "–");
    fact(dl, "providers", (f.providers || []).join(", ") || "–");
    if (f.active_power_w) fact(dl, "active power", f.active_power_w + " W/core");
  }

  // One row per variant the device has a profile of or has installed: what it serves
  // first, then the others it may serve, then the profile-only candidates.
  function renderProfiles(d, prof, classes) {
    const profiles = prof.profiles || {};
    const only = new Set(prof.profile_only || []);
    const active = prof.active_variant ?? d.active_variant;
    const names = [...new Set([...Object.keys(profiles),
                               ...(d.installed || []).map((v) => v && v.name)])]
      .filter(Boolean);
    const rank = (n) => (n === active ? 0 : only.has(n) ? 2 : 1);
    names.sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : 1));
    const cls = prof.device_class && classes.classes ? classes.classes[prof.device_class]
      : null;
    const rows = names.map((n) => {
      const p = profiles[n];
      const role = n === active ? "active" : only.has(n) ? "profile-only" : "installed";
      const roleCell = el("td");
      roleCell.appendChild(el("span", role === "profile-only" ? "profile-only candidate"
        : role, "role " + role));
      const v = cls && cls.variants ? cls.variants[n] : null;
      const median = v && v.latency_ms_p95 ? v.latency_ms_p95 : null;
      const classCell = el("td", median ? `${fmtFig(median.median)} (n ${median.n})` : "–",
                           "num");
      const cell = (x, field) => {
        const td = el("td", fmtFig(x), "num");
        td.dataset.field = field;
        if (x !== null && x !== undefined) td.dataset.v = String(x);
        return td;
      };
      const tr = p ? row([el("td", n, "variant"), roleCell, cell(p.latency_ms_p50, "p50"),
                          cell(p.latency_ms_p95, "p95"), classCell, cell(p.cpu_ms, "cpu"),
                          cell(p.memory_mb, "memory"), cell(p.energy_mj, "energy"),
                          el("td", p.energy_source), num(p.runs), num(p.threads),
                          el("td", utc(p.ts))])
        : row([el("td", n, "variant"), roleCell,
               Object.assign(el("td", "not measured yet", "empty"), { colSpan: 10 })]);
      tr.dataset.variant = n;
      tr.dataset.role = role;
      if (p) tr.dataset.ts = String(p.ts);
      return tr;
    });
    fill("device-profiles", rows, 12,
         "no profiles yet (the agent profiles each variant after installing it)");
  }

  function renderDevice(d, hist, prof, classes) {
    renderHardware(prof);
    renderProfiles(d, prof, classes);
    $("device-title").textContent = d.device_id;
    $("crumb-device").textContent = d.device_id;
    const dl = $("device-facts");
    dl.replaceChildren();
    fact(dl, "state", d.online ? "online" : "offline");
    fact(dl, "active variant", d.active_variant || "–");
    fact(dl, "installed", (d.installed || []).map((v) => (v && v.name) || String(v)).join(", ")
         || "–");
    fact(dl, "groups", (d.groups || []).join(", ") || "–");
    fact(dl, "agent", d.agent_version || "–");
    fact(dl, "last seen", ago(d.last_seen));
    if (d.rollout) fact(dl, "rollout", `v${d.rollout.manifest_version} ${d.rollout.phase}`);
    if (d.last_error) fact(dl, "last error", d.last_error);

    const names = [...(d.installed || []).map((v) => v && v.name),
                   ...hist.buckets.map((b) => b.active_variant),
                   ...hist.buckets.flatMap((b) => Object.keys(b.shadow_variants)),
                   ...hist.switches.map((s) => s.to_variant)].filter(Boolean);
    const colors = C.colorMap(names);
    const bands = bandsOf(hist, colors);
    const markers = hist.switches.map((s) => ({
      t: s.ts, cls: "switch",
      label: `${new Date(s.ts * 1000).toLocaleString()}: ${s.from_variant || "–"} → ` +
             `${s.to_variant} (${s.reason})`,
      data: { reason: s.reason, to: s.to_variant, from: s.from_variant || "" },
    }));
    const base = { x0: hist.since, x1: hist.until, step: hist.resolution_s, bands, markers,
                   empty: "no telemetry in this range" };
    const one = (field, label, color) => [{
      key: field, label, color,
      points: hist.buckets.filter((b) => b[field] !== null).map((b) => [b.t, b[field]]) }];
    const used = [...new Set(bands.map((b) => b.key))];
    chartIn("dev-variant", { ...base, kind: "band", height: 64, series: [],
                             title: "active variant" },
            used.map((k) => ({ label: k, color: colors.get(k) })));
    chartIn("dev-battery", { ...base, yMax: 100, unit: "%", title: "battery",
                             series: one("battery_percent", "battery", C.PALETTE[2]) });
    chartIn("dev-cpu", { ...base, yMax: 100, unit: "%", title: "CPU",
                         series: one("cpu_percent", "CPU", C.PALETTE[0]) });
    chartIn("dev-temperature", { ...base, unit: "°C", title: "temperature",
                                 series: one("temperature_c", "temperature", C.PALETTE[3]) });
    chartIn("dev-latency", { ...base, unit: "ms", title: "latency", series: [
      ...one("latency_ms_p50", "p50", C.PALETTE[0]),
      ...one("latency_ms_p95", "p95 (highest)", C.PALETTE[1])] },
            [{ label: "p50", color: C.PALETTE[0] }, { label: "p95", color: C.PALETTE[1] }]);
    $("dev-requests").querySelector(".per").textContent = "(" + per(hist.resolution_s) + ")";
    chartIn("dev-requests", { ...base, title: "requests",
                              series: one("requests", "requests", C.PALETTE[4]) });
    // Per evaluated variant: the share of its shadow runs that agreed with the reference.
    const evaluated = [...new Set(hist.buckets.flatMap((b) => Object.keys(b.shadow_variants)))]
      .sort();
    const shadow = evaluated.map((v) => ({
      key: v, label: v, color: colors.get(v) || C.PALETTE[5],
      points: hist.buckets.filter((b) => v in b.shadow_variants)
        .map((b) => [b.t, 100 * b.shadow_variants[v]]),
    }));
    chartIn("dev-shadow", { ...base, yMax: 100, unit: "%", title: "shadow agreement",
                            empty: "no shadow evaluation in this range", series: shadow },
            shadow.map((s) => ({ label: s.label, color: s.color })));
    const recent = hist.switches.slice().reverse().slice(0, 200);
    fill("device-switches", recent.map((s) => {
      const tr = row([new Date(s.ts * 1000).toLocaleString(), s.from_variant || "–",
                      s.to_variant, s.reason]);
      tr.dataset.ts = String(s.ts);
      return tr;
    }), 4, "no switches in this range");
  }

  // -- fetching -------------------------------------------------------------------------
  class Unauthorized extends Error {}

  async function request(path, token) {
    const resp = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store", credentials: "omit",
    });
    if (resp.status === 401) throw new Unauthorized("the token was refused");
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp;
  }

  async function get(path, token) {
    return (await request(path, token)).json();
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  function since() {
    return Math.floor(Date.now() / 1000 - RANGES[state.range]);
  }

  async function loadFleet(token) {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(state.offset) });
    if (state.q) q.set("q", state.q);
    if (state.group) q.set("group", state.group);
    if (state.online) q.set("online", state.online);
    const s = since();
    const [page, summary, rollouts, variants, series, classes] = await Promise.all([
      request("/v1/devices?" + q, token), get("/v1/telemetry/summary?since=" + s, token),
      get("/v1/rollouts", token), get("/v1/variants", token),
      get("/v1/fleet/series?since=" + s, token), get("/v1/classes", token),
    ]);
    const devices = await page.json();
    const total = Number(page.headers.get("X-Total-Count") || devices.length);
    if (devices.length === 0 && state.offset > 0 && total > 0) {
      state.offset = Math.max(0, Math.floor((total - 1) / PAGE) * PAGE); // past the end
      return loadFleet(token);
    }
    return () => {
      renderClasses(classes);
      renderSummary(summary);
      renderTiles(summary, series, rollouts);
      renderSeries(series, variants);
      renderDevices(devices, total);
      renderVariants(summary, variants);
      renderRollouts(rollouts);
    };
  }

  async function loadDevice(token) {
    const id = encodeURIComponent(state.device);
    const [device, hist, prof, classes] = await Promise.all([
      get("/v1/devices/" + id, token),
      get(`/v1/devices/${id}/telemetry?since=${since()}`, token),
      get(`/v1/devices/${id}/profile`, token), get("/v1/classes", token),
    ]);
    return () => renderDevice(device, hist, prof, classes);
  }

  function showView() {
    const device = state.device !== null;
    $("fleet-view").hidden = device;
    $("device-view").hidden = !device;
    $("crumb").hidden = !device;
    $("home").href = link({ range: state.range });
    setRangeLabels();
  }

  async function refresh() {
    clearTimeout(timer);
    const token = sessionStorage.getItem(KEY);
    if (!token) return showForm("");
    const mine = ++generation;
    try {
      const render = await (state.device !== null ? loadDevice(token) : loadFleet(token));
      if (mine !== generation) return; // the view changed meanwhile
      showView();
      $("content").hidden = false;
      render();
      last = render;
      // What is on screen, for tests and scripts: "fleet" or "device:ID", and its range.
      document.body.dataset.loaded = state.device !== null ? "device:" + state.device : "fleet";
      document.body.dataset.range = state.range;
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    } catch (e) {
      if (mine !== generation) return;
      if (e instanceof Unauthorized) {
        sessionStorage.removeItem(KEY);
        return showForm("The server refused that token.");
      }
      setStatus("cannot reach the server: " + e.message + " (retrying)", true);
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  function showForm(message) {
    clearTimeout(timer);
    $("content").hidden = true;
    $("fleet-summary").textContent = "";
    setStatus(message, !!message);
    $("token-form").hidden = false;
    $("token-input").focus();
  }

  async function exportAs(format) {
    const token = sessionStorage.getItem(KEY);
    if (!token || state.device === null) return;
    const id = encodeURIComponent(state.device);
    try {
      const resp = await request(
        `/v1/devices/${id}/telemetry?since=${since()}&format=${format}`, token);
      const url = URL.createObjectURL(await resp.blob());
      const a = el("a");
      a.href = url;
      a.download = `${state.device}-telemetry.${format}`;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      setStatus("export failed: " + e.message, true);
    }
  }

  function filtersChanged() {
    state.q = $("device-search").value.trim();
    state.group = $("device-group").value.trim();
    state.online = $("device-online").value;
    state.offset = 0;
    refresh();
  }

  function start() {
    readFragment();
    window.addEventListener("hashchange", () => {
      readFragment();
      refresh();
    });
    for (const b of document.querySelectorAll(".range button")) {
      b.addEventListener("click", () => {
        const params = { range: b.dataset.range };
        if (state.device !== null) params.device = state.device;
        window.location.hash = link(params);
      });
    }
    $("device-filter").addEventListener("submit", (ev) => {
      ev.preventDefault();
      filtersChanged();
    });
    for (const id of ["device-search", "device-group"]) {
      $(id).addEventListener("input", () => {
        clearTimeout(typing);
        typing = setTimeout(filtersChanged, 250);
      });
    }
    $("device-online").addEventListener("change", filtersChanged);
    $("class-search").addEventListener("input", () => {
      state.classQ = $("class-search").value.trim();
      if (lastClasses) renderClasses(lastClasses);
    });
    $("page-prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - PAGE);
      refresh();
    });
    $("page-next").addEventListener("click", () => {
      state.offset += PAGE;
      refresh();
    });
    $("export-csv").addEventListener("click", () => exportAs("csv"));
    $("export-jsonl").addEventListener("click", () => exportAs("jsonl"));
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => last && last(), 150);
    });
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(KEY, token);
      $("token-input").value = "";
      $("token-form").hidden = true;
      setStatus("loading…", false);
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showForm("Token forgotten.");
    });
    refresh();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
