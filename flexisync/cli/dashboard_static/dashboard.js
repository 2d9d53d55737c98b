// flexisync dashboard: renders the snapshots of /events (Server-Sent Events).
// No framework, no build step. Every name from Redis is set as text, never as HTML.
// window.dashboard holds what the page has seen (frames, EventSource opens and errors,
// uncaught script errors, the last snapshot), for tests and the browser console.
"use strict";

(() => {
  const seen = { frames: 0, opens: 0, errors: 0, scriptErrors: 0, last: null, unavailable: null };
  window.dashboard = seen;
  window.addEventListener("error", () => { seen.scriptErrors += 1; });
  let receivedAt = Date.now();
  let allowWrite = false;
  const SVG = "http://www.w3.org/2000/svg";
  const OUTCOMES = ["success", "failure", "rejected", "probe", "ignored"];
  const breakerRows = new Map(); // name -> {tr, cells}

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "never";
    if (value < 0) value = 0;
    if (value < 10) return value.toFixed(1) + " s";
    if (value < 120) return Math.round(value) + " s";
    if (value < 7200) return Math.floor(value / 60) + " min " + Math.round(value % 60) + " s";
    if (value < 172800) return Math.floor(value / 3600) + " h " + Math.round((value % 3600) / 60) + " min";
    return Math.round(value / 86400) + " days";
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function ago(unix) {
    return seconds(Math.max(0, Date.now() / 1000 - unix)) + " ago";
  }

  function elapsed() {
    return (Date.now() - receivedAt) / 1000;
  }

  // --- breakers ------------------------------------------------------------------

  function timeLeft(b) {
    switch (b.state) {
      case "open":
        if (b.retry_after === null) return "until reset";
        return b.retry_after - elapsed() > 0 ? seconds(b.retry_after - elapsed()) : "probe due";
      case "forced_open": return "until reset";
      case "half_open": return "probing";
      default: return "\u2014";
    }
  }

  function sparkline(outcomes) {
    const width = 150, height = 26, n = 30;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", 0); base.setAttribute("x2", width);
    base.setAttribute("y1", height - 0.5); base.setAttribute("y2", height - 0.5);
    svg.appendChild(base);
    const buckets = (outcomes || []).slice(-n);
    let max = 1;
    const totals = { success: 0, failure: 0, rejected: 0, probe: 0, ignored: 0 };
    for (const bucket of buckets) {
      let sum = 0;
      for (const k of OUTCOMES) { sum += bucket[k] || 0; totals[k] += bucket[k] || 0; }
      max = Math.max(max, sum);
    }
    const step = width / n;
    buckets.forEach((bucket, i) => {
      const x = (n - buckets.length + i) * step;
      let y = height - 1;
      for (const k of OUTCOMES) {
        const count = bucket[k] || 0;
        if (!count) continue;
        const h = Math.max(1, (count / max) * (height - 2));
        const rect = document.createElementNS(SVG, "rect");
        rect.setAttribute("class", k);
        rect.setAttribute("x", x.toFixed(1));
        rect.setAttribute("y", (y - h).toFixed(1));
        rect.setAttribute("width", Math.max(1, step - 1).toFixed(1));
        rect.setAttribute("height", h.toFixed(1));
        svg.appendChild(rect);
        y -= h;
      }
    });
    const title = document.createElementNS(SVG, "title");
    title.textContent = OUTCOMES.map((k) => `${k} ${totals[k]}`).join(", ");
    svg.appendChild(title);
    return svg;
  }

  function controls(name) {
    const td = el("td", "controls");
    const force = el("button", "danger", "Force open");
    force.title = "reject every call in every process until reset";
    force.addEventListener("click", () => act("open", { name }));
    const input = el("input");
    input.type = "number"; input.min = "1"; input.value = "30";
    input.title = "seconds";
    const openFor = el("button", "danger", "Open for");
    openFor.title = "open for this many seconds, then allow a probe";
    openFor.addEventListener("click", () => act("open", { name, seconds: Number(input.value) }));
    const reset = el("button", "", "Reset");
    reset.title = "close it now and clear its failures (breaker close/reset)";
    reset.addEventListener("click", () => act("reset", { name }));
    td.append(force, openFor, input, el("span", "muted", " s "), reset);
    return td;
  }

  function breakerRow(name) {
    let row = breakerRows.get(name);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.breaker = name;
    const cells = {
      name: el("td", "name", name), state: el("td"), left: el("td", "left"),
      since: el("td", "since"), trips: el("td", "num trips"), failures: el("td", "num failures"),
      window: el("td", "num window"), spark: el("td", "sparkcell"),
      transitions: el("td", "transitions"),
    };
    cells.name.title = name;
    const badge = el("span", "state");
    cells.state.appendChild(badge);
    cells.badge = badge;
    tr.append(cells.name, cells.state, cells.left, cells.since, cells.trips, cells.failures,
      cells.window, cells.spark, cells.transitions, controls(name));
    row = { tr, cells, state: null, outcomes: "" };
    breakerRows.set(name, row);
    return row;
  }

  function renderBreakers(breakers) {
    const tbody = $("breakers").tBodies[0];
    const names = new Set();
    breakers.forEach((b, i) => {
      names.add(b.name);
      const row = breakerRow(b.name);
      const c = row.cells;
      if (row.state !== b.state) {
        if (row.state !== null) {
          row.tr.classList.remove("flash");
          void row.tr.offsetWidth; // restart the animation
          row.tr.classList.add("flash");
        }
        row.state = b.state;
        c.badge.className = "state state-" + b.state;
        c.badge.textContent = b.state.replace("_", " ");
        row.tr.dataset.state = b.state;
      }
      c.left.textContent = timeLeft(b);
      c.since.textContent = b.changed_at ? `${clock(b.changed_at)} (${ago(b.changed_at)})` : "\u2014";
      c.trips.textContent = b.trips ?? 0;
      c.failures.textContent = b.failures ?? 0;
      c.window.textContent = b.window_calls ? `${b.window_failures}/${b.window_calls}` : "\u2014";
      const key = JSON.stringify(b.outcomes || []);
      if (key !== row.outcomes) {
        row.outcomes = key;
        c.spark.replaceChildren(sparkline(b.outcomes));
      }
      const transitions = (b.transitions || []).slice(-4).reverse();
      c.transitions.replaceChildren(...transitions.map((t) =>
        el("span", "", `${clock(t.at)}  ${t.from.replace("_", " ")} \u2192 ${t.to.replace("_", " ")}`)));
      if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
    });
    for (const [name, row] of breakerRows) {
      if (!names.has(name)) { row.tr.remove(); breakerRows.delete(name); }
    }
    $("breakers-empty").hidden = breakers.length > 0;
    $("breakers-count").textContent = `(${breakers.length})`;
  }

  // --- locks, streams, semaphores ----------------------------------------------------

  function renderTable(id, items, columns) {
    const tbody = $(id).tBodies[0];
    tbody.replaceChildren(...items.map((item) => {
      const tr = el("tr");
      tr.dataset.name = item.name;
      for (const [className, value] of columns) {
        const td = el("td", className, value(item));
        if (className.includes("name")) td.title = item.name;
        tr.appendChild(td);
      }
      return tr;
    }));
    const empty = $(id + "-empty");
    if (empty) empty.hidden = items.length > 0;
    $(id + "-count").textContent = `(${items.length})`;
  }

  function streamTime(id) {
    const ms = Number(String(id || "").split("-")[0]);
    return ms ? `${clock(ms / 1000)} (${ago(ms / 1000)})` : "\u2014";
  }

  // --- the whole picture -------------------------------------------------------------

  function render(doc) {
    const info = doc.dashboard || {};
    allowWrite = Boolean(info.allow_write);
    document.body.classList.toggle("read-only", !allowWrite);
    $("namespace").textContent = info.namespace || doc.namespace || "";
    $("redis").textContent = info.url || "";
    const mode = $("mode");
    mode.textContent = allowWrite ? "controls enabled" : "read-only";
    mode.classList.toggle("write", allowWrite);
    renderBreakers(doc.breakers || []);
    renderTable("locks", doc.locks || [], [
      ["name", (l) => l.name], ["mono", (l) => l.holder || "\u2014"],
      ["left", (l) => l.ttl_left === null ? "no expiry" : seconds(l.ttl_left - elapsed())],
      ["num mono", (l) => l.fencing_token ?? "\u2014"],
    ]);
    renderTable("streams", doc.streams || [], [
      ["name", (s) => s.name], ["num", (s) => s.length], ["mono", (s) => s.last_id || "\u2014"],
      ["", (s) => streamTime(s.last_id)],
    ]);
    const semaphores = doc.semaphores || [];
    $("semaphores-section").hidden = semaphores.length === 0;
    renderTable("semaphores", semaphores, [
      ["name", (s) => s.name], ["num", (s) => s.holders],
      ["num", (s) => s.limit ?? "\u2014"],
    ]);
    const cut = doc.truncated;
    const truncated = cut === true ? ["objects"]
      : (cut && typeof cut === "object" ? Object.keys(cut).filter((k) => cut[k]) : []);
    $("updated").textContent = `updated ${clock(doc.taken_at || Date.now() / 1000)}` +
      (truncated.length ? ` \u2014 showing the first of many ${truncated.join(", ")}` : "");
  }

  function setStatus(kind, text) {
    const status = $("status");
    status.className = "status status-" + kind;
    status.textContent = text;
  }

  function banner(text) {
    const node = $("banner");
    node.hidden = !text;
    node.textContent = text || "";
    document.querySelector("main").classList.toggle("stale", Boolean(text));
  }

  let toastTimer = null;
  function toast(text, isError) {
    const node = $("toast");
    node.textContent = text;
    node.className = "toast" + (isError ? " error" : "");
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 4000);
  }

  async function act(action, body) {
    try {
      const reply = await fetch("/api/breaker/" + action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-FlexiSync-Dashboard": "1" },
        body: JSON.stringify(body),
      });
      const answer = await reply.json();
      if (!reply.ok) throw new Error(answer.error || reply.statusText);
      toast(`breaker ${answer.name} is now ${answer.breaker.state.replace("_", " ")}`, false);
    } catch (err) {
      toast(`${action} ${body.name}: ${err.message}`, true);
    }
  }

  function connect() {
    const source = new EventSource("/events");
    source.onopen = () => { seen.opens += 1; setStatus("live", "live"); };
    source.onerror = () => {
      seen.errors += 1;
      setStatus("reconnecting", "reconnecting\u2026");
    };
    source.addEventListener("snapshot", (event) => {
      const doc = JSON.parse(event.data);
      receivedAt = Date.now();
      seen.frames += 1;
      seen.last = doc;
      seen.unavailable = null;
      banner(null);
      setStatus("live", "live");
      render(doc);
    });
    source.addEventListener("unavailable", (event) => {
      const reason = JSON.parse(event.data).error;
      seen.unavailable = reason;
      setStatus("unavailable", "Redis unavailable");
      banner(`Redis does not answer: ${reason}. Showing the last picture; retrying.`);
    });
  }

  // Count the open periods and lock leases down between frames.
  setInterval(() => { if (seen.last) render(seen.last); }, 1000);
  connect();
})();
