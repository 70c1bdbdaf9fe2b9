// The prunefleet dashboard: polls the /v1 JSON API with the bearer token and renders
// tables. Device-provided strings only ever reach the DOM as text (textContent), never
// as markup; the page's Content-Security-Policy forbids inline script as a second line.
"use strict";

(function () {
  const POLL_MS = 3000;
  const KEY = "prunefleet.token";
  let timer = null;

  const $ = (id) => document.getElementById(id);

  // The token arrives in the fragment (#token=...), which the browser never sends to the
  // server; keep it for this tab and take it out of the address bar and history.
  function takeTokenFromFragment() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const token = params.get("token");
    if (token) {
      sessionStorage.setItem(KEY, token);
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
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
    return Math.round(s / 3600) + " h ago";
  }

  function chips(items) {
    const td = document.createElement("td");
    for (const t of items) td.appendChild(el("span", t, "chip"));
    return td;
  }

  function renderDevices(devices) {
    const online = devices.filter((d) => d.online).length;
    $("fleet-summary").textContent =
      `${devices.length} devices: ${online} online, ${devices.length - online} offline`;
    $("fleet-summary").dataset.online = String(online);
    fill("devices", devices.map((d) => {
      const r = d.rollout;
      let phase = "–";
      if (r) {
        phase = `v${r.manifest_version} ${r.phase}`;
        if (r.phase === "downloading") phase += ` ${Math.round(100 * r.progress)} %`;
      }
      const counters = Object.entries(d.counters || {})
        .filter(([, n]) => n !== 0).map(([k, n]) => `${k}=${n}`);
      const tr = row([
        el("td", d.device_id),
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
    }), 8, "no device has reported yet");
  }

  function renderTelemetry(summary, registered) {
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
    const switches = Object.entries(summary.switches || {}).sort((a, b) => b[1] - a[1]);
    fill("switches", switches.map(([reason, n]) => row([el("td", reason), num(n)])), 2,
         "no switches yet");
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

  class Unauthorized extends Error {}

  async function get(path, token) {
    const resp = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store", credentials: "omit",
    });
    if (resp.status === 401) throw new Unauthorized("the token was refused");
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  async function refresh() {
    const token = sessionStorage.getItem(KEY);
    if (!token) return showForm("");
    try {
      const [devices, summary, rollouts, variants] = await Promise.all([
        get("/v1/devices", token), get("/v1/telemetry/summary", token),
        get("/v1/rollouts", token), get("/v1/variants", token),
      ]);
      renderDevices(devices);
      renderTelemetry(summary, variants);
      renderRollouts(rollouts);
      $("content").hidden = false;
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    } catch (e) {
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

  function start() {
    takeTokenFromFragment();
    window.addEventListener("hashchange", () => {
      takeTokenFromFragment();
      clearTimeout(timer);
      refresh();
    });
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(KEY, token);
      $("token-input").value = "";
      $("token-form").hidden = true;
      setStatus("loading…", false);
      clearTimeout(timer);
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
