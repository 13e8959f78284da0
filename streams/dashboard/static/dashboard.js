// The DSPex dashboard page: draws the board the server sends (GET /api/state, then
// server-sent events on /api/events). Tables carry data-* attributes and every chart
// its point count and last values (data-points, data-last), so tests read the figures.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const charts = new Map(); // element id -> {plot, key}
const span = { from: 0, to: 1 }; // the x range every chart shows: the history, in seconds

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function num(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "-" : (100 * value).toFixed(1) + "%";
}

function clock(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "-";
}

function cell(field, text, cls) {
  return `<td data-field="${field}"${cls ? ` class="${cls}"` : ""}>${esc(text)}</td>`;
}

// One uPlot chart per element, recreated when its series change, else given new data.
function chart(id, labels, xs, columns, options = {}) {
  const el = document.getElementById(id);
  const key = labels.join("\u0000");
  el.dataset.points = String(xs.length);
  const last = {};
  labels.forEach((label, i) => { last[label] = columns[i].length ? columns[i][columns[i].length - 1] : null; });
  el.dataset.last = JSON.stringify(last);
  // a stepped series holds its last value until now: draw it to the right edge
  const held = options.stepped && xs.length && span.to * 1000 > xs[xs.length - 1];
  const data = held
    ? [[...xs, span.to * 1000].map((ms) => ms / 1000), ...columns.map((c) => [...c, c[c.length - 1]])]
    : [xs.map((ms) => ms / 1000), ...columns];
  const known = charts.get(id);
  if (known && known.key === key) {
    known.plot.setData(data);
    return;
  }
  if (known) known.plot.destroy();
  el.innerHTML = `<div class="title">${esc(el.dataset.title || "")}</div>`;
  const series = [{}].concat(labels.map((label, i) => ({
    label,
    stroke: PALETTE[i % PALETTE.length],
    width: 2,
    spanGaps: false,
    points: { show: xs.length < 40 },
    ...(options.stepped ? { paths: uPlot.paths.stepped({ align: 1 }) } : {}),
  })));
  const plot = new uPlot({
    width: el.clientWidth || 420,
    height: 200,
    series,
    scales: {
      x: { time: true, range: () => [span.from, span.to] },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      ...(options.scales || {}),
    },
    axes: [{}, { size: 56 }],
    legend: { live: false },
  }, data, el);
  charts.set(id, { plot, key });
}

// Points of several series (one list each) aligned on their union of timestamps.
function align(seriesPoints, value) {
  const times = [...new Set(seriesPoints.flatMap((points) => points.map((p) => p.t)))].sort((a, b) => a - b);
  const columns = seriesPoints.map((points) => {
    const at = new Map(points.map((p) => [p.t, value(p)]));
    return times.map((t) => (at.has(t) ? at.get(t) : null));
  });
  return { times, columns };
}

function renderPools(state) {
  const pools = Object.keys(state.pools);
  document.querySelector("#pool-table tbody").innerHTML = pools.map((pool) => {
    const points = state.pools[pool];
    const withRequests = points.filter((p) => p.rate !== undefined && p.rate !== null);
    const withLag = points.filter((p) => p.lag !== undefined && p.lag !== null);
    const r = withRequests.length ? withRequests[withRequests.length - 1] : {};
    const lag = withLag.length ? withLag[withLag.length - 1].lag : null;
    const end = points.length ? points[points.length - 1].t : null;
    return `<tr data-pool="${esc(pool)}">${cell("pool", pool, "text")}${cell("rate", num(r.rate, 2))}`
      + `${cell("count", num(r.count, 0))}${cell("p50", num(r.p50, 0))}${cell("p95", num(r.p95, 0))}`
      + `${cell("p99", num(r.p99, 0))}${cell("errors", pct(r.errors))}${cell("lag", num(lag, 0))}`
      + `${cell("window", clock(end))}</tr>`;
  }).join("") || `<tr><td colspan="9" class="empty">no metric windows yet</td></tr>`;
  const all = pools.map((p) => state.pools[p]);
  const rate = align(all, (p) => p.rate ?? null);
  chart("chart-throughput", pools, rate.times, rate.columns);
  const errors = align(all, (p) => (p.errors === undefined || p.errors === null ? null : 100 * p.errors));
  chart("chart-errors", pools, errors.times, errors.columns);
  const lag = align(all, (p) => p.lag ?? null);
  chart("chart-lag", pools, lag.times, lag.columns);
  renderLatency(state, pools);
}

function renderLatency(state, pools) {
  const holder = document.getElementById("latency-charts");
  const ids = pools.map((pool) => `chart-latency-${pool.replace(/[^A-Za-z0-9_-]/g, "_")}`);
  ids.forEach((id, i) => {
    if (!document.getElementById(id)) {
      const div = document.createElement("div");
      div.className = "chart";
      div.id = id;
      div.dataset.chart = "latency";
      div.dataset.pool = pools[i];
      div.dataset.title = `${pools[i]}: latency percentiles (ms)`;
      holder.appendChild(div);
    }
    const points = state.pools[pools[i]].filter((p) => p.rate !== undefined);
    const xs = points.map((p) => p.t);
    chart(id, ["p50", "p95", "p99"], xs, ["p50", "p95", "p99"].map((f) => points.map((p) => p[f] ?? null)));
  });
}

function renderWorkers(state) {
  const names = Object.keys(state.worker_points);
  const inFlight = align(names.map((n) => state.worker_points[n]), (p) => p.in_flight ?? null);
  chart("chart-in-flight", names, inFlight.times, inFlight.columns);
  document.querySelector("#worker-table tbody").innerHTML = state.workers.map((w) => {
    const breaker = w.breaker_open === 1 ? "open" : w.breaker_open === 0.5 ? "half-open"
      : w.breaker_open === 0 ? "closed" : "-";
    const mb = w.memory_bytes === undefined || w.memory_bytes === null ? null : w.memory_bytes / 1048576;
    return `<tr data-worker="${esc(w.worker)}" data-pool="${esc(w.pool)}">${cell("pool", w.pool, "text")}`
      + `${cell("worker", w.worker, "text")}${cell("in_flight", num(w.in_flight, 0))}`
      + `${cell("memory", num(mb, 1))}${cell("breaker", breaker, breaker === "open" ? "breaker-open" : "")}`
      + `${cell("seen", clock(w.t))}</tr>`;
  }).join("") || `<tr><td colspan="6" class="empty">no worker health yet</td></tr>`;
}

function programId(name) {
  return name.replace(/[^A-Za-z0-9_-]/g, "_");
}

function renderPrograms(state) {
  const holder = document.getElementById("programs");
  const names = Object.keys(state.programs);
  if (!names.length) {
    holder.innerHTML = `<p class="empty">no routing tables yet</p>`;
    charts.forEach((known, id) => { if (id.startsWith("chart-weights-")) { known.plot.destroy(); charts.delete(id); } });
    return;
  }
  holder.querySelector(".empty")?.remove();
  holder.querySelectorAll(".program").forEach((div) => {
    if (!names.includes(div.dataset.program)) {
      const id = `chart-weights-${programId(div.dataset.program)}`;
      charts.get(id)?.plot.destroy();
      charts.delete(id);
      div.remove();
    }
  });
  names.forEach((name) => renderProgram(holder, name, state.programs[name]));
}

function renderProgram(holder, name, program) {
  const id = programId(name);
  let div = holder.querySelector(`.program[data-program="${CSS.escape(name)}"]`);
  if (!div) {
    div = document.createElement("div");
    div.className = "program";
    div.dataset.program = name;
    div.innerHTML = `<h3>${esc(name)} <small class="current"></small></h3>
      <div class="charts"><table class="weights"><thead><tr><th>variant</th><th>pool</th><th>model</th>
        <th>weight</th><th>share</th></tr></thead><tbody></tbody></table>
      <div class="chart" id="chart-weights-${id}" data-chart="weights" data-title="traffic share per variant (%)"></div></div>
      <table class="variants"><thead><tr><th>variant (last window)</th><th>pool</th><th>req/s</th>
        <th>p95 ms</th><th>errors</th></tr></thead><tbody></tbody></table>
      <table class="changes"><thead><tr><th>version</th><th>published</th><th>objective</th>
        <th class="text">why it changed</th></tr></thead><tbody></tbody></table>`;
    holder.appendChild(div);
  }
  const tables = program.tables;
  const current = tables.length ? tables[tables.length - 1] : null;
  div.querySelector(".current").textContent = current ? `version ${current.version}` : "";
  div.querySelector(".weights tbody").innerHTML = (current ? current.variants : []).map((v) =>
    `<tr data-variant="${esc(v.name)}">${cell("name", v.name, "text")}${cell("pool", v.pool, "text")}`
    + `${cell("model", v.model ?? "-", "text")}${cell("weight", num(v.weight, 3))}${cell("share", pct(v.share))}</tr>`,
  ).join("") || `<tr><td colspan="5" class="empty">no routing table: the router's static default</td></tr>`;
  div.querySelector('[data-chart="weights"]').hidden = !tables.length;
  div.querySelector(".variants tbody").innerHTML = program.series.map((s) =>
    `<tr data-variant="${esc(s.variant)}">${cell("variant", s.variant, "text")}${cell("pool", s.pool, "text")}`
    + `${cell("rate", num(s.rate, 2))}${cell("p95", num(s.p95, 0))}${cell("errors", pct(s.errors))}</tr>`,
  ).join("") || `<tr><td colspan="5" class="empty">no executions in the history</td></tr>`;
  div.querySelector(".changes tbody").innerHTML = tables.slice().reverse().map((t) =>
    `<tr data-version="${t.version}">${cell("version", t.version)}${cell("published", clock(t.t))}`
    + `${cell("objective", t.objective)}${cell("reason", t.reason, "reason")}</tr>`,
  ).join("");
  const variants = [...new Set(tables.flatMap((t) => t.variants.map((v) => v.name)))];
  const columns = variants.map((name) => tables.map((t) => {
    const v = t.variants.find((x) => x.name === name);
    return v ? 100 * v.share : 0;
  }));
  chart(`chart-weights-${id}`, variants, tables.map((t) => t.t), columns,
    { stepped: true, scales: { y: { range: [0, 100] } } });
}

function renderDlq(state) {
  const dlq = state.dlq;
  document.getElementById("dlq-total").textContent = `${dlq.total}${dlq.capped ? "+" : ""}`;
  document.getElementById("dlq-span").textContent = `${Math.round(state.history_s / 60)} min`;
  document.querySelector("#dlq-table tbody").innerHTML = dlq.by.map((d) =>
    `<tr data-component="${esc(d.component)}" data-stage="${esc(d.stage)}" data-error-class="${esc(d.error_class)}">`
    + `${cell("component", d.component, "text")}${cell("stage", d.stage, "text")}`
    + `${cell("error_class", d.error_class, "text")}${cell("count", d.count)}</tr>`,
  ).join("") || `<tr><td colspan="4" class="empty">no dead letters</td></tr>`;
  document.querySelector("#dlq-recent tbody").innerHTML = dlq.recent.map((d) =>
    `<tr>${cell("failed_at", clock(d.t), "text")}${cell("component", d.component, "text")}`
    + `${cell("stage", d.stage, "text")}${cell("error_class", d.error_class, "text")}`
    + `${cell("message", d.message, "message")}${cell("request_id", d.request_id ?? "-", "text")}</tr>`,
  ).join("");
  chart("chart-dlq", ["dead letters"], dlq.per_minute.map((p) => p[0]), [dlq.per_minute.map((p) => p[1])]);
}

function renderGauges(state) {
  document.getElementById("gauges-empty").hidden = state.gauges.length > 0;
  document.querySelector("#gauge-table tbody").innerHTML = state.gauges.map((g) => {
    const labels = Object.entries(g.labels).map(([k, v]) => `${k}=${v}`).join(", ");
    return `<tr data-gauge="${esc(g.name)}">${cell("name", g.name, "text")}${cell("labels", labels, "text")}`
      + `${cell("value", g.value ?? "-")}${cell("window", clock(g.t))}</tr>`;
  }).join("");
}

function latest(state) {
  const times = Object.values(state.pools).flatMap((points) => points.map((p) => p.t));
  Object.values(state.programs).forEach((p) => p.tables.forEach((t) => times.push(t.t)));
  return Math.max(state.now, ...times);
}

function render(state) {
  span.to = latest(state) / 1000;
  span.from = span.to - state.history_s;
  renderPools(state);
  renderWorkers(state);
  renderPrograms(state);
  renderDlq(state);
  renderGauges(state);
  document.getElementById("updated").textContent = state.problem
    ? `cannot read the topics: ${state.problem}` : `updated ${clock(state.now)}`;
  const status = document.getElementById("status");
  status.dataset.state = state.problem ? "problem" : "live";
  status.textContent = state.problem ? "no data" : "live";
  document.body.dataset.version = String(state.version);
}

function connect() {
  const status = document.getElementById("status");
  const events = new EventSource("/api/events");
  events.addEventListener("state", (event) => render(JSON.parse(event.data)));
  events.onopen = () => { status.dataset.state = "live"; status.textContent = "live"; };
  events.onerror = () => { status.dataset.state = "reconnecting"; status.textContent = "reconnecting"; };
}

connect();
