// The dashboard: reads tokenfused's JSON API (docs/http-api.md) every 2 s and draws it. It has no
// other source and loads nothing from anywhere else. The admin token, once typed, lives in this
// script's memory only: a reload forgets it.
"use strict";

(() => {
  let adminToken = null;
  let killActive = false;
  const $ = (id) => document.getElementById(id);

  // --- Helpers -------------------------------------------------------------------------------

  // Ids come from applications (and from whatever writes the region): always text, never HTML.
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function usd(text) {
    if (text === null || text === undefined) return "unlimited";
    const v = Number(text);
    return "$" + (Math.abs(v) >= 100 ? v.toFixed(2) : v.toFixed(4));
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (options.admin) headers.Authorization = "Bearer " + adminToken;
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method: options.method || "GET",
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
    });
    if (r.status === 204) return null;
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const err = new Error(body.message || r.status + " " + r.statusText);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  // A bar and its numbers: `used` of `limit` (either may be a USD string or a number).
  function limitLine(label, used, limit, money) {
    const row = el("div", undefined, "limit");
    row.appendChild(el("span", label));
    const bar = el("div", undefined, "bar");
    const fill = el("span");
    const share = limit && Number(limit) > 0 ? Number(used) / Number(limit) : 0;
    fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
    if (share >= 0.95) bar.classList.add("bad");
    else if (share >= 0.8) bar.classList.add("warn");
    bar.appendChild(fill);
    row.appendChild(bar);
    const fmt = (v) => (money ? usd(v) : String(v));
    row.appendChild(el("span", limit === null ? fmt(used) + " (unlimited)" : fmt(used) + " of " + fmt(limit) +
                                                  " (" + Math.round(share * 100) + "%)", "num"));
    row.dataset.share = String(share);
    return row;
  }

  function fillTable(id, rows) {
    const body = $(id).querySelector("tbody");
    body.replaceChildren(...rows);
  }

  // --- Sections ------------------------------------------------------------------------------

  function drawKill(k) {
    killActive = k.active;
    const state = $("kill-state");
    state.textContent = k.active ? "on" : "off";
    state.className = "state " + (k.active ? "on" : "off");
    $("kill-detail").textContent = k.active
      ? (k.reason || "") + " (since " + new Date(k.since_unix_ms).toISOString() + ")" +
        (k.expires_at_unix_ms ? ", until " + new Date(k.expires_at_unix_ms).toISOString() : "")
      : "every call is checked against its budgets";
    const toggle = $("kill-toggle");
    toggle.textContent = k.active ? "Turn off" : "Turn on";
    toggle.disabled = false;
  }

  function drawPlatform(p) {
    const used = Number(p.used_usd) + Number(p.reserved_usd) + Number(p.elsewhere_usd);
    const body = $("platform-body");
    body.replaceChildren(limitLine("daily", used.toFixed(9), p.limit_usd, true),
                         el("p", "committed " + usd(p.used_usd) + ", held by live calls " + usd(p.reserved_usd) +
                                 ", elsewhere in the fleet " + usd(p.elsewhere_usd), "muted"));
    $("day").textContent = "budget day " + p.day;
  }

  // Each tenant's daily limit and the tenant rules that count it, sorted by the nearest limit.
  function drawTenants(tenants, rules) {
    const rows = tenants.map((t) => {
      const lines = [];
      const spent = Number(t.used_usd) + Number(t.reserved_usd) + Number(t.elsewhere_usd);
      lines.push(limitLine("daily", spent.toFixed(9), t.limit_usd, true));
      for (const r of rules) {
        if (!r.scope.startsWith("tenant")) continue;
        for (const c of r.counters) {
          const mine = r.scope === "tenant" ? c.key === t.project_id : c.key.startsWith(t.project_id + "/");
          if (!mine || c.limit === null) continue;
          const money = r.metric === "usd";
          const used = Number(c.used) + Number(c.reserved) + Number(c.elsewhere);
          lines.push(limitLine(r.name + (r.scope === "tenant" ? "" : " " + c.key.slice(t.project_id.length + 1)) +
                                   " (" + r.window + ")", money ? used.toFixed(9) : used, c.limit, money));
        }
      }
      const nearest = Math.max(...lines.map((l) => Number(l.dataset.share)));
      const tr = el("tr");
      tr.dataset.tenant = t.project_id;
      tr.dataset.share = String(nearest);
      tr.appendChild(el("td", t.project_id, "tenant"));
      tr.appendChild(el("td", usd(t.used_usd), "num spent"));
      const cell = el("td");
      cell.append(...lines);
      tr.appendChild(cell);
      return { tr, nearest, spent };
    });
    rows.sort((a, b) => b.nearest - a.nearest || b.spent - a.spent);
    fillTable("tenants", rows.map((r) => r.tr));
  }

  function drawReservations(body) {
    $("live-count").textContent = "(" + body.live + ")";
    fillTable("reservations", body.reservations.map((r) => {
      const tr = el("tr");
      for (const [text, cls] of [[r.reservation_id], [r.project_id], [r.run_id || ""], [r.model],
                                 [usd(r.held_usd), "num"], [r.prompt_tokens + r.completion_tokens, "num"],
                                 [r.expires_at]]) {
        tr.appendChild(el("td", text, cls));
      }
      return tr;
    }));
  }

  function drawLedger(body) {
    $("ledger-locked").hidden = true;
    fillTable("ledger", body.entries.map((e) => {
      const tr = el("tr");
      for (const [text, cls] of [[e.seq, "num"], [e.created_at], [e.project_id], [e.run_id || ""], [e.model],
                                 [e.prompt_tokens + e.completion_tokens, "num"], [usd(e.cost_usd), "num"]]) {
        tr.appendChild(el("td", text, cls));
      }
      return tr;
    }));
  }

  function drawAlerts(body) {
    fillTable("alerts", body.alerts.map((a) => {
      const tr = el("tr");
      for (const text of [a.fired_at, a.scope, a.id, a.level_pct + "%"]) tr.appendChild(el("td", text));
      return tr;
    }));
  }

  // Bars: what each hour of the budget day spent (all tenants); the line: the total so far.
  function drawChart(body) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    const W = 960, H = 180, left = 56, bottom = 20, top = 8;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const from = Date.parse(body.from);
    const perHour = new Array(24).fill(0);
    for (const h of body.hours) {
      const i = Math.floor((Date.parse(h.hour) - from) / 3600e3);
      if (i >= 0 && i < 24) perHour[i] += Number(h.cost_usd);
    }
    let sum = 0;
    const cumulative = perHour.map((v) => (sum += v));
    const max = Math.max(sum, 1e-9);
    const x = (i) => left + ((W - left - 4) * i) / 24;
    const y = (v) => H - bottom - ((H - bottom - top) * v) / max;
    const add = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    add("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" });
    add("text", { x: 2, y: top + 8 }, usd(max));
    add("text", { x: 2, y: H - bottom }, "$0");
    perHour.forEach((v, i) => {
      add("rect", { x: x(i) + 1, y: y(v), width: Math.max(1, x(1) - x(0) - 2), height: H - bottom - y(v) });
      if (i % 3 === 0) add("text", { x: x(i), y: H - 4 }, new Date(from + i * 3600e3).toISOString().slice(11, 16));
    });
    // The running total, up to the hour under way.
    const hours = Math.min(24, Math.floor((Date.now() - from) / 3600e3) + 1);
    add("polyline", { points: [`${x(0)},${y(0)}`, ...cumulative.slice(0, hours).map((v, i) => `${x(i + 1)},${y(v)}`)].join(" ") });
    svg.dataset.total = String(sum);
    $("chart").replaceChildren(svg);
  }

  // --- The loop ------------------------------------------------------------------------------

  async function refresh() {
    try {
      const [kill, platform, tenants, rules, reservations, alerts, spend] = await Promise.all([
        api("/v1/kill"), api("/v1/platform"), api("/v1/tenants?limit=200"), api("/v1/rules"),
        api("/v1/reservations?limit=50"), api("/v1/alerts?limit=20"), api("/v1/spend/hourly"),
      ]);
      drawKill(kill);
      drawPlatform(platform);
      drawTenants(tenants.tenants, rules.rules);
      drawReservations(reservations);
      drawAlerts(alerts);
      drawChart(spend);
      if (adminToken) drawLedger(await api("/v1/ledger?order=desc&limit=20", { admin: true }));
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (e) {
      if (e.status === 401) adminToken = null;
      $("status").textContent = "cannot read the agent: " + e.message;
    }
  }

  function openForm() {
    $("kill-form").hidden = false;
    $("token").closest("label").hidden = adminToken !== null;
    $("token").required = adminToken === null;
    $("reason-label").hidden = killActive;
    $("kill-confirm").textContent = killActive ? "Turn the kill switch off" : "Turn the kill switch on";
    $("kill-error").textContent = "";
    (adminToken === null ? $("token") : $("kill-confirm")).focus();
  }

  async function submitKill(event) {
    event.preventDefault();
    if (adminToken === null) adminToken = $("token").value.trim();
    $("token").value = "";
    try {
      if (killActive) {
        await api("/v1/kill", { method: "DELETE", admin: true });
      } else {
        await api("/v1/kill", { method: "PUT", admin: true, body: { reason: $("kill-reason").value || "dashboard" } });
      }
      $("kill-form").hidden = true;
    } catch (e) {
      if (e.status === 401) adminToken = null;
      openForm();   // asks for the token again if it was refused
      $("kill-error").textContent = e.status === 401 ? "The admin token was refused." : e.message;
    }
    await refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("kill-toggle").addEventListener("click", openForm);
    $("kill-cancel").addEventListener("click", () => { $("kill-form").hidden = true; });
    $("kill-form").addEventListener("submit", submitKill);
    refresh();
    setInterval(refresh, 2000);
  });
})();
