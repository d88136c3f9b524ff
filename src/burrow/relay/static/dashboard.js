// The relay's dashboard: reads the admin API of the listener that served it every
// REFRESH_MS and draws what it says. Strings from the API (subjects come from
// tokens, agent names from agents) only ever go into textContent and attributes.
// With an admin token on the relay, the page asks for it and sends it as a bearer
// token; without one, the API is read-only and the page says so.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "burrow-admin-token"; // sessionStorage: gone with the tab
  const CERT_WARN_DAYS = 14;
  const SVG = "http://www.w3.org/2000/svg";
  const CHART_W = 300;
  const CHART_H = 80;

  const $ = (id) => document.getElementById(id);
  const authForm = $("auth");
  const authInput = $("auth-token");
  const errorBox = $("error");

  let token = readToken();
  let relayAuth = null; // whether the relay has an admin token; null until /api/status says
  let timer = null;
  let refreshing = false;
  let waitingForToken = false;

  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return ""; // storage disabled: the token lives as long as the page
    }
  }

  function storeToken(value) {
    token = value;
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage disabled: keep it in memory only
    }
  }

  // -- the API ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // One call; resolves to the decoded JSON body, or throws an ApiError.
  async function api(method, path) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store" });
    } catch (exc) {
      throw new ApiError(0, `cannot reach the relay (${exc.message || exc})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const why = body && typeof body.error === "string" ? body.error : response.statusText;
      throw new ApiError(response.status, `${method} ${path}: ${response.status} ${why}`);
    }
    if (body === null || typeof body !== "object") {
      throw new ApiError(response.status, `${method} ${path}: the answer is not JSON`);
    }
    return body;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  // The outcome of the operator's last action; it stays until the next one.
  function showAction(message, isError) {
    const box = $("action");
    box.textContent = message;
    box.className = isError ? "bad" : "good";
    box.hidden = !message;
  }

  function askForToken(message) {
    waitingForToken = true;
    document.body.dataset.state = "auth";
    $("auth-message").textContent = message;
    authForm.hidden = false;
    $("updated").textContent = "waiting for the admin token";
    authInput.focus();
  }

  authForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = authInput.value.trim();
    if (!value) return;
    storeToken(value);
    authInput.value = "";
    authForm.hidden = true;
    waitingForToken = false;
    showError("");
    refresh();
  });

  // -- refreshing ------------------------------------------------------------------

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    clearTimeout(timer);
    try {
      // Status first: a refused token shows as one 401, not four.
      const status = await api("GET", "/api/status");
      const [sessions, tunnels, history] = await Promise.all([
        api("GET", "/api/sessions"),
        api("GET", "/api/tunnels"),
        api("GET", "/api/history"),
      ]);
      relayAuth = Boolean(status.relay && status.relay.auth);
      drawStatus(status);
      drawCharts(history);
      drawRefusals(status.refusals || []);
      drawSessions(sessions.sessions || []);
      drawTunnels(tunnels.tunnels || []);
      showError("");
      authForm.hidden = true;
      document.body.dataset.state = "ok";
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
      $("updated").textContent = `updated ${clock(Date.now() / 1000)}`;
    } catch (exc) {
      failed(exc);
    } finally {
      refreshing = false;
      if (!waitingForToken) timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  function failed(exc) {
    if (exc instanceof ApiError && exc.status === 401) {
      const hadToken = Boolean(token);
      storeToken("");
      relayAuth = true;
      askForToken(
        hadToken
          ? "The relay refused that admin token (401 Unauthorized). Enter the right one."
          : "This relay needs its admin token to show its state.",
      );
      return;
    }
    document.body.dataset.state = "error";
    showError(exc instanceof Error ? exc.message : String(exc));
    $("updated").textContent = "not updated: see the error above; trying again";
  }

  // -- formatting --------------------------------------------------------------------

  const number = new Intl.NumberFormat("en");

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = Number(n) || 0;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
  }

  function duration(seconds) {
    let s = Math.max(0, Math.floor(Number(seconds) || 0));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${s} s`;
    return `${s} s`;
  }

  // A Unix time as UTC, to the second: what logs and certificates say too.
  function when(unix) {
    if (typeof unix !== "number") return "–";
    return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function clock(unix) {
    return when(unix).slice(11);
  }

  // Shorter, for table cells: the time alone when it is today (UTC).
  function since(unix) {
    const full = when(unix);
    return full.slice(0, 10) === when(Date.now() / 1000).slice(0, 10) ? full.slice(11) : full;
  }

  function text(element, value, title) {
    element.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
    if (title !== undefined) element.title = title;
  }

  // Rows are kept from one refresh to the next and only their text changes, so a
  // focused button keeps its focus and a click never lands on a row being replaced.
  // columns: [value(item), options] with options header (a row header), code, numeric.
  function syncRows(tableId, items, keyOf, columns, setUp) {
    const body = $(tableId).tBodies[0];
    const old = new Map([...body.rows].map((row) => [row.dataset.key, row]));
    const seen = new Map();
    items.forEach((item, index) => {
      const base = String(keyOf(item));
      const n = (seen.get(base) || 0) + 1; // the API's keys may repeat (shortened names)
      seen.set(base, n);
      const key = `${base}#${n}`;
      let row = old.get(key);
      old.delete(key);
      if (row === undefined) {
        row = document.createElement("tr");
        row.dataset.key = key;
        for (const [, options = {}] of columns) {
          const td = document.createElement(options.header ? "th" : "td");
          if (options.header) td.scope = "row";
          if (options.numeric) td.className = "num";
          if (options.code) td.append(document.createElement("code"));
          row.append(td);
        }
        if (setUp) setUp(row, item);
      }
      row.item = item;
      columns.forEach(([value, options = {}], i) => {
        const td = row.cells[i];
        text(options.code ? td.firstChild : td, value(item));
      });
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    for (const row of old.values()) row.remove();
    $(`${tableId}-none`).hidden = items.length > 0;
    return [...body.rows];
  }

  // -- drawing -------------------------------------------------------------------------

  function drawStatus(status) {
    const relay = status.relay || {};
    text($("relay-domain"), relay.domain);
    document.title = relay.domain ? `burrow relay · ${relay.domain}` : "burrow relay";
    text($("relay-version"), relay.version);
    text($("relay-uptime"), duration(relay.uptime_seconds), `since ${when(relay.started)}`);
    const state = $("relay-state");
    state.textContent = relay.draining ? "draining" : relay.ready ? "ready" : "not ready";
    state.className = `badge ${relay.draining ? "warn" : relay.ready ? "good" : "bad"}`;
    text(
      $("relay-access"),
      relay.auth ? "admin token required" : "read-only: the relay has no admin token",
    );

    const counts = status.counts || {};
    for (const element of document.querySelectorAll("[data-count]")) {
      const value = element.dataset.count
        .split(".")
        .reduce((object, key) => (object == null ? undefined : object[key]), counts);
      element.dataset.value = value === undefined ? "" : String(value);
      if (element.dataset.count.startsWith("bytes_")) {
        text(element, bytes(value), `${number.format(value || 0)} bytes`);
      } else {
        text(element, value === undefined ? undefined : number.format(value));
      }
    }

    const cert = status.certificate || {};
    const days = Math.floor((Number(cert.expires_in_seconds) || 0) / 86400);
    const box = $("certificate");
    const expiry = $("certificate-expiry");
    text(expiry, when(cert.not_after));
    if (typeof cert.not_after === "number") {
      expiry.dateTime = new Date(cert.not_after * 1000).toISOString();
    }
    box.dataset.daysLeft = String(days);
    const expired = !cert.valid || Number(cert.expires_in_seconds) <= 0;
    text(
      $("certificate-days"),
      expired ? "not valid now" : days === 1 ? "1 day left" : `${days} days left`,
    );
    box.className = expired ? "bad" : days < CERT_WARN_DAYS ? "warn" : "";
    text($("certificate-serial"), cert.serial ? `serial ${cert.serial}` : "");

    const limits = $("limits");
    limits.replaceChildren();
    for (const [key, value] of Object.entries(status.limits || {})) {
      const item = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = key.replaceAll("_", " ");
      const dd = document.createElement("dd");
      dd.textContent = typeof value === "number" ? number.format(value) : String(value);
      item.append(dt, dd);
      limits.append(item);
    }
  }

  function drawRefusals(refusals) {
    const newestFirst = [...refusals].reverse();
    const rows = syncRows(
      "refusals",
      newestFirst,
      (r) => `${r.time}/${r.peer}/${r.reason}`,
      [
        [(r) => since(r.time), { header: true }],
        [(r) => r.reason, { code: true }],
        [(r) => r.peer],
        [(r) => r.message],
      ],
    );
    for (const row of rows) {
      row.dataset.reason = String(row.item.reason);
      row.dataset.time = String(row.item.time);
    }
  }

  const READ_ONLY =
    "Read-only: the relay has no admin token (start it with --admin-token-file " +
    "to end sessions from here)";

  function drawSessions(sessions) {
    const rows = syncRows(
      "sessions",
      sessions,
      (s) => s.id,
      [
        [(s) => s.subject, { header: true }],
        [(s) => s.id, { code: true }],
        [(s) => s.token_id, { code: true }],
        [(s) => s.peer],
        [(s) => s.agent],
        [(s) => s.workload],
        [(s) => since(s.connected_since)],
        [(s) => s.tunnels, { numeric: true }],
        [(s) => s.visitors, { numeric: true }],
        [(s) => `${bytes(s.bytes_to_agent)} / ${bytes(s.bytes_to_visitor)}`, { numeric: true }],
        [(s) => s.worker, { numeric: true }],
      ],
      (row) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "end-session";
        button.dataset.action = "end-session";
        button.textContent = "End session";
        button.addEventListener("click", () => endSession(row.item, button));
        const actions = document.createElement("td");
        actions.append(button);
        row.append(actions);
      },
    );
    for (const row of rows) {
      const session = row.item;
      row.dataset.sessionId = String(session.id);
      const button = row.querySelector("button");
      button.setAttribute("aria-label", `End the session of ${session.subject} (${session.id})`);
      if (button.dataset.busy) continue; // its DELETE is under way
      button.disabled = !relayAuth;
      button.title = relayAuth
        ? "Ends this session: its tunnels close and its agent is told why"
        : READ_ONLY;
    }
  }

  function drawTunnels(tunnels) {
    const rows = syncRows(
      "tunnels",
      tunnels,
      (t) => `${t.session}/${t.kind}/${t.name}`,
      [
        [(t) => t.name, { header: true, code: true }],
        [(t) => t.kind],
        [(t) => t.subject],
        [(t) => t.session, { code: true }],
        [(t) => t.tcp_port, { numeric: true }],
        [(t) => t.visitors, { numeric: true }],
        [(t) => bytes(t.bytes_to_agent), { numeric: true }],
        [(t) => bytes(t.bytes_to_visitor), { numeric: true }],
        [(t) => duration(t.age_seconds), { numeric: true }],
        [(t) => t.worker, { numeric: true }],
      ],
    );
    for (const row of rows) row.dataset.kind = String(row.item.kind);
  }

  // -- ending a session ---------------------------------------------------------------

  async function endSession(session, button) {
    const who = session.subject ? `${session.subject}'s session` : "the session";
    if (!window.confirm(`End ${who} ${session.id}? Its tunnels close and its agent stops.`)) {
      return;
    }
    button.disabled = true;
    button.dataset.busy = "1";
    try {
      const answer = await api("DELETE", `/api/sessions/${encodeURIComponent(session.id)}`);
      showAction(`Ended session ${answer.ended || session.id} (${session.subject}).`, false);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) {
        showAction("", false);
        failed(exc);
        return;
      }
      showAction(`Could not end the session: ${exc instanceof Error ? exc.message : exc}`, true);
      button.disabled = false;
    } finally {
      delete button.dataset.busy;
    }
    // Now, not at the next tick: the row goes as soon as the relay says so.
    if (!refreshing) refresh();
  }

  // -- charts -------------------------------------------------------------------------

  function drawCharts(history) {
    const samples = Array.isArray(history.samples) ? history.samples : [];
    const times = samples.map((s) => s.time);
    const series = (key) => samples.map((s) => Number(s[key]) || 0);
    // Bytes as a rate: the change between two samples over the time between them.
    const rate = (key) =>
      samples.slice(1).map((s, i) => {
        const dt = s.time - samples[i].time;
        return dt > 0 ? Math.max(0, (Number(s[key]) - Number(samples[i][key])) / dt) : 0;
      });
    chart("chart-sessions", times, [{ values: series("sessions"), cls: "line" }], number.format);
    chart("chart-tunnels", times, [{ values: series("tunnels"), cls: "line" }], number.format);
    chart("chart-visitors", times, [{ values: series("visitors"), cls: "line" }], number.format);
    chart(
      "chart-bytes",
      times.slice(1),
      [
        { values: rate("bytes_to_agent"), cls: "line to-agent" },
        { values: rate("bytes_to_visitor"), cls: "line to-visitor" },
      ],
      (v) => `${bytes(Math.round(v))}/s`,
    );
    const span = times.length > 1 ? times[times.length - 1] - times[0] : 0;
    $("charts-span").textContent = times.length
      ? `${samples.length} ${samples.length === 1 ? "sample" : "samples"}, one every ` +
        `${history.interval} s, over the last ${duration(span)}.`
      : "No samples yet.";
  }

  function chart(id, times, lines, format) {
    const figure = $(id);
    const max = Math.max(1, ...lines.flatMap((line) => line.values));
    const now = lines.map((line) => (line.values.length ? format(line.values.at(-1)) : "–"));
    figure.querySelector(".now").textContent = `now ${now.join(" / ")}, top of the chart ${format(max)}`;

    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${CHART_W} ${CHART_H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${figure.querySelector("figcaption").textContent.trim()}; highest ${format(max)}`;
    svg.append(title);

    const first = times[0];
    const span = times.length > 1 ? times[times.length - 1] - first : 1;
    for (const line of lines) {
      if (line.values.length === 0) continue;
      const points = line.values.map((v, i) => {
        const x = times.length > 1 ? ((times[i] - first) / span) * CHART_W : CHART_W;
        const y = CHART_H - 2 - (v / max) * (CHART_H - 4);
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      if (points.length === 1) points.unshift(`0,${points[0].split(",")[1]}`);
      const polyline = document.createElementNS(SVG, "polyline");
      polyline.setAttribute("points", points.join(" "));
      polyline.setAttribute("class", line.cls);
      polyline.setAttribute("vector-effect", "non-scaling-stroke");
      svg.append(polyline);
    }
    const old = figure.querySelector("svg");
    if (old) old.replaceWith(svg);
    else figure.append(svg);
  }

  // -- start --------------------------------------------------------------------------

  refresh();
})();
