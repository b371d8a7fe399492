// The Xietong console: a partner's view and the operator's view over the gateway's APIs.
// Rules this file keeps: the key lives in this closure only (never a URL, never storage); every
// string that came from the network reaches the page as text (textContent, never innerHTML);
// charts are drawn by uPlot (vendored), the page only hands it arrays.
"use strict";

(() => {
  const INSIGHT_TYPES = [
    "statistics", "correlation", "cluster_assignment", "prediction",
    "model_drift", "text_insight", "text_summary",
  ];
  const NOTICES = new Set(["grant_revoked", "access_revoked", "gap", "end"]);
  const MAX_POINTS = 1000; // per metric: a long session keeps the newest
  const MAX_FEED = 200; // rows of the live table
  const OP_HISTORY = 150; // operator snapshots kept (5 minutes at 2 s)

  let secret = null; // the key or token: this closure only
  const state = {

    role: null,
    me: null,
    stats: new Map(), // metric -> Map(window seconds -> {mean, revision})
    bench: new Map(), // metric -> Map(window seconds -> quantiles)
    charts: new Map(), // name -> {plot, names}
    dirty: new Set(),
    lastEventId: null,
    received: 0,
    abort: new AbortController(),
    cluster: null,
    op: [],
  };
  window.xietongConsole = state; // for the browser tests: counts and chart data, never the key

  const $ = (id) => document.getElementById(id);

  // An element with text children only: strings become text nodes, so markup stays text.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    const abs = Math.abs(value);
    if (abs >= 1e6 || (abs > 0 && abs < 1e-3)) return value.toExponential(2);
    return value.toLocaleString("en", { maximumFractionDigits: abs >= 100 ? 0 : 3 });
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${secret}` };
    if (options.body) headers["Content-Type"] = "application/json";
    let answer;
    try {
      answer = await fetch(path, { ...options, headers, cache: "no-store", signal: state.abort.signal });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "The gateway cannot be reached. Is the platform running?");
    }
    let body = null;
    try { body = await answer.json(); } catch { body = null; }
    if (!answer.ok) {
      throw new ApiError(answer.status, (body && body.error) || `HTTP ${answer.status}`);
    }
    return body;
  }

  // ------------------------------------------------------------------ charts (uPlot)

  function chartWidth(container) {
    return Math.max(280, Math.floor(container.getBoundingClientRect().width || 480) - 8);
  }

  // Draw (or redraw) a chart of named series over one x axis; a new set of names makes a new chart.
  function drawChart(name, container, xs, series, options = {}) {
    const names = series.map((s) => s.label).join("\u0000");
    let entry = state.charts.get(name);
    const data = [xs, ...series.map((s) => s.values)];
    if (!entry || entry.names !== names || !container.contains(entry.plot.root)) {
      if (entry) entry.plot.destroy();
      const palette = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0969da", "#57606a"];
      const opts = {
        width: chartWidth(container),
        height: options.height || 180,
        scales: { x: { time: options.time !== false } },
        axes: [{}, { size: 60 }],
        series: [
          {},
          ...series.map((s, i) => ({
            label: s.label,
            stroke: s.stroke || palette[i % palette.length],
            width: s.width || 1.5,
            dash: s.dash,
            fill: s.fill,
            spanGaps: true,
            points: { show: false },
          })),
        ],
        bands: options.bands || [],
        legend: { live: false },
      };
      container.replaceChildren();
      entry = { plot: new uPlot(opts, data, container), names };
      state.charts.set(name, entry);
    } else {
      entry.plot.setData(data);
    }
    return entry.plot;
  }

  function quantileKeys(quantiles) {
    return Object.keys(quantiles)
      .filter((k) => /^p\d+$/.test(k))
      .sort((a, b) => Number(a.slice(1)) - Number(b.slice(1)));
  }

  function statsCard(metric) {
    const id = `stat-${[...metric].map((c) => c.charCodeAt(0).toString(16)).join("")}`;
    let card = document.getElementById(id);
    if (!card) {
      card = el("figure", { id, class: "card", dataset: { metric } },
        el("figcaption", {}, metric), el("div", { class: "chart" }));
      const cards = [...$("stats").children];
      const after = cards.find((c) => c.dataset.metric > metric);
      $("stats").insertBefore(card, after || null);
    }
    return card;
  }

  function drawMetric(metric) {
    const own = state.stats.get(metric) || new Map();
    const bench = state.bench.get(metric) || new Map();
    const xs = [...new Set([...own.keys(), ...bench.keys()])].sort((a, b) => a - b);
    let keys = [];
    for (const q of bench.values()) { keys = quantileKeys(q); if (keys.length) break; }
    const low = keys[0];
    const high = keys[keys.length - 1];
    const series = [];
    const bands = [];
    if (keys.length) {
      series.push({ label: `industry ${low}`, values: xs.map((x) => bench.get(x)?.[low] ?? null), stroke: "#9aa6b2", width: 1 });
      series.push({ label: `industry ${high}`, values: xs.map((x) => bench.get(x)?.[high] ?? null), stroke: "#9aa6b2", width: 1 });
      bands.push({ series: [2, 1], fill: "rgba(120,140,160,0.22)" });
      if (keys.includes("p50")) {
        series.push({ label: "industry median", values: xs.map((x) => bench.get(x)?.p50 ?? null), stroke: "#57606a", dash: [5, 4], width: 1 });
      }
    }
    series.push({ label: "us (mean)", values: xs.map((x) => own.get(x)?.mean ?? null), stroke: "#1f6feb", width: 2 });
    const card = statsCard(metric);
    drawChart(`stat:${metric}`, card.querySelector(".chart"), xs, series, { bands });
    card.dataset.points = String(own.size);
    card.dataset.bandPoints = String(keys.length ? bench.size : 0);
  }

  let frameScheduled = false;
  function scheduleDraw() {
    if (frameScheduled) return;
    frameScheduled = true;
    requestAnimationFrame(() => {
      frameScheduled = false;
      for (const metric of state.dirty) drawMetric(metric);
      state.dirty.clear();
    });
  }

  // ------------------------------------------------------------------ insights

  function windowOf(insight) {
    const start = insight.provenance && insight.provenance.window_start;
    return Math.floor(Date.parse(start || insight.provenance.produced_at) / 1000);
  }

  function keepBounded(map) {
    while (map.size > MAX_POINTS) {
      let oldest = Infinity;
      for (const k of map.keys()) if (k < oldest) oldest = k;
      map.delete(oldest);
    }
  }

  function takeStatistics(insight) {
    if (!state.me || insight.tenant !== state.me.tenant) return false;
    const x = windowOf(insight);
    let series = state.stats.get(insight.metric);
    if (!series) state.stats.set(insight.metric, (series = new Map()));
    const seen = series.get(x);
    if (seen && seen.revision > (insight.revision || 0)) return false;
    series.set(x, { mean: insight.mean, revision: insight.revision || 0 });
    keepBounded(series);
    state.dirty.add(insight.metric);
    return true;
  }

  function ourBenchmark(insight) {
    const me = state.me;
    if (!me) return false;
    return insight.industry === me.industry;
  }

  function takeBenchmark(insight) {
    if (!ourBenchmark(insight)) return false;
    const x = windowOf(insight);
    let series = state.bench.get(insight.metric);
    if (!series) state.bench.set(insight.metric, (series = new Map()));
    series.set(x, insight.quantiles || {});
    keepBounded(series);
    if (state.stats.has(insight.metric)) state.dirty.add(insight.metric);
    return true;
  }

  function summary(insight) {
    switch (insight.type) {
      case "statistics":
        return `${insight.metric}: mean ${fmt(insight.mean)} over ${insight.count} records`;
      case "benchmark":
        return `${insight.industry}/${insight.region} ${insight.metric}: median ${fmt((insight.quantiles || {}).p50)}, ${insight.firms} firms`;
      case "correlation":
        return `correlation of ${(insight.metrics || []).join(" × ")}`;
      case "cluster_assignment":
        return `cluster ${insight.cluster} of ${insight.k} (model ${insight.model_version})`;
      case "prediction": {
        const out = insight.value !== null && insight.value !== undefined ? fmt(insight.value) : insight.label;
        const p = insight.probability !== null && insight.probability !== undefined ? ` (p ${fmt(insight.probability)})` : "";
        return `${insight.target} = ${out}${p} — model ${insight.model_name} v${insight.model_version}`;
      }
      case "model_drift":
        return `${insight.model_name} v${insight.model_version}: drifted ${(insight.drifted || []).join(", ") || "nothing"}`;
      case "text_insight": {
        const label = insight.label ? `${insight.label}${insight.label_probability != null ? ` (${fmt(insight.label_probability)})` : ""}` : "unlabelled";
        const mood = insight.sentiment != null ? `, sentiment ${fmt(insight.sentiment)}` : "";
        return `${insight.kind || "text"}: ${label}${mood}; key terms: ${(insight.key_terms || []).join(", ")}`;
      }
      case "text_summary": {
        const mix = Object.entries(insight.class_mix || {})
          .map(([task, classes]) => `${task}: ${Object.entries(classes).map(([c, n]) => `${c} ${n}`).join(", ")}`)
          .join("; ");
        const terms = (insight.top_terms || []).map((t) => t.term).join(", ");
        return `${insight.documents} texts; class mix ${mix || "–"}; top terms: ${terms}`;
      }
      default:
        return insight.type;
    }
  }

  function insightRow(insight) {
    const produced = insight.provenance ? insight.provenance.produced_at : "";
    return el("tr", { dataset: { insightId: insight.insight_id, owner: insight.tenant, type: insight.type } },
      el("td", {}, produced ? new Date(produced).toLocaleTimeString() : ""),
      el("td", {}, insight.type),
      el("td", {}, insight.tenant),
      el("td", { class: "what" }, summary(insight)));
  }

  function addToFeed(insight, atTop = true) {
    const body = $("feed").tBodies[0];
    const row = insightRow(insight);
    if (atTop) body.prepend(row); else body.append(row);
    while (body.rows.length > MAX_FEED) body.deleteRow(-1);
  }

  function takeCluster(insight) {
    if (!state.me || insight.tenant !== state.me.tenant) return;
    if (state.cluster && Date.parse(state.cluster.provenance.produced_at) > Date.parse(insight.provenance.produced_at)) return;
    state.cluster = insight;
    const features = insight.features || [];
    const rows = (insight.profiles || []).map((profile, i) =>
      el("tr", { class: i === insight.cluster ? "ours" : "" },
        el("td", {}, i === insight.cluster ? `${i} (us)` : String(i)),
        el("td", {}, String((insight.cluster_sizes || [])[i] ?? "")),
        ...features.map((f) => el("td", {}, fmt(profile[f])))));
    $("cluster").replaceChildren(
      el("p", {}, `We are in cluster ${insight.cluster} of ${insight.k}`,
        insight.silhouette != null ? ` (silhouette ${fmt(insight.silhouette)})` : "",
        `; model ${insight.model_version}. What the firms of each cluster look like (profile means):`),
      el("table", { id: "cluster-table" },
        el("thead", {}, el("tr", {}, el("th", {}, "cluster"), el("th", {}, "firms"), ...features.map((f) => el("th", {}, f)))),
        el("tbody", {}, ...rows)));
  }

  function take(insight, live) {
    if (insight.type === "statistics") takeStatistics(insight);
    else if (insight.type === "benchmark") takeBenchmark(insight);
    else if (insight.type === "cluster_assignment") takeCluster(insight);
    if (live) {
      state.received += 1;
      $("feed").dataset.received = String(state.received);
      addToFeed(insight);
    }
    scheduleDraw();
  }

  async function listInsights(params) {
    const query = new URLSearchParams({ limit: "1000", ...params });
    return (await api(`/v1/insights?${query}`)).insights;
  }

  async function loadStatistics() {
    const me = state.me.tenant;
    const first = await listInsights({ type: "statistics", owner: me });
    const metrics = [...new Set([...state.me.statistics_metrics, ...first.map((i) => i.metric)])].sort();
    // A capped answer may hold only the newest of each metric: then each metric on its own.
    const [own, bench] = await Promise.all([
      first.length < 1000 ? [first] : Promise.all(
        metrics.map((metric) => listInsights({ type: "statistics", owner: me, metric }))),
      Promise.all(metrics.map((metric) => listInsights({ type: "benchmark", owner: "network", metric }))),
    ]);
    for (const insight of own.flat()) takeStatistics(insight);
    for (const insight of bench.flat()) takeBenchmark(insight);
    if (!metrics.length) $("stats").replaceChildren(el("p", { class: "hint" }, "No statistics of ours yet."));
    for (const metric of metrics) drawMetric(metric);
    state.dirty.clear();
    $("stats").dataset.ready = "true";
  }

  async function loadFeed() {
    const [latest, cluster] = await Promise.all([
      listInsights({ limit: "100" }),
      listInsights({ type: "cluster_assignment", owner: state.me.tenant, limit: "1" }),
    ]);
    for (const insight of cluster) takeCluster(insight);
    for (const insight of latest) addToFeed(insight, false);
    // the stream resumes after the newest one listed
    if (latest.length) state.lastEventId = latest[0].insight_id;
    $("feed").dataset.ready = "true";
  }

  // ------------------------------------------------------------------ the live stream

  function notice(text) {
    const line = el("span", {}, text);
    $("notices").prepend(line);
    while ($("notices").childNodes.length > 5) $("notices").lastChild.remove();
  }

  function setLive(text, kind) {
    $("live").textContent = text;
    $("live").dataset.state = kind;
  }

  function handleFrame(frame) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of frame.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "id") id = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return true;
    let body;
    try { body = JSON.parse(data.join("\n")); } catch { return true; }
    if (NOTICES.has(event)) {
      if (event === "grant_revoked") {
        notice(`Agreement ${body.grant_id} of ${body.owner} ended (${body.status}).`);
        loadShares().catch(() => {});
      } else if (event === "access_revoked") {
        notice("Our key was revoked: the stream stopped.");
        return false;
      } else if (event === "gap") {
        notice(body.missed ? `${body.missed} insights were missed while away.` : "Some insights may have been missed while away.");
      }
      return true;
    }
    if (id) state.lastEventId = id;
    take(body, true);
    return true;
  }

  async function streamLoop() {
    let backoff = 1000;
    const signal = state.abort.signal;
    while (!signal.aborted) {
      try {
        const headers = { Authorization: `Bearer ${secret}`, Accept: "text/event-stream" };
        if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
        const answer = await fetch("/v1/insights/stream", { headers, signal, cache: "no-store" });
        if (answer.status === 401) {
          setLive("key no longer accepted", "off");
          return;
        }
        if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
        setLive("live", "on");
        backoff = 1000;
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        let going = true;
        while (going) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while (going && (end = buffer.indexOf("\n\n")) >= 0) {
            going = handleFrame(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }
        if (!going) { reader.cancel().catch(() => {}); setLive("stopped", "off"); return; }
      } catch (error) {
        if (signal.aborted) return;
      }
      setLive("reconnecting…", "retry");
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  // ------------------------------------------------------------------ sharing

  function grantFromForm() {
    const types = [...document.querySelectorAll("#share-types input:checked")].map((i) => i.value);
    const body = { grantee: $("grantee").value.trim(), insight_types: types, purpose: $("purpose").value };
    if ($("expires").value) body.expires_at = new Date($("expires").value).toISOString();
    return body;
  }

  // The last preview's token and the form it was asked for: granting that same form sends the
  // token, so the grant is the one previewed (its text pseudonyms are the ones shown).
  let previewed = null;

  async function preview() {
    $("share-error").textContent = "";
    try {
      const proposal = JSON.stringify(grantFromForm());
      const answer = await api("/v1/shares/preview?limit=1000", { method: "POST", body: proposal });
      previewed = { proposal, token: answer.preview };
      $("preview-count").textContent = String(answer.count);
      $("preview").querySelector("tbody").replaceChildren(...answer.insights.map(insightRow));
      $("preview").hidden = false;
      $("preview").dataset.count = String(answer.count);
    } catch (error) {
      $("share-error").textContent = error.message;
    }
  }

  async function grant(event) {
    event.preventDefault();
    $("share-error").textContent = "";
    try {
      const proposal = grantFromForm();
      if (previewed && previewed.proposal === JSON.stringify(proposal)) proposal.preview = previewed.token;
      await api("/v1/shares", { method: "POST", body: JSON.stringify(proposal) });
      previewed = null;
      notice(`Granted ${$("grantee").value.trim()}.`);
      await loadShares();
    } catch (error) {
      $("share-error").textContent = error.message;
    }
  }

  async function revoke(grantId) {
    try {
      await api(`/v1/shares/${encodeURIComponent(grantId)}`, { method: "DELETE" });
      notice(`Revoked ${grantId}.`);
      await loadShares();
    } catch (error) {
      $("share-error").textContent = error.message;
    }
  }

  async function loadShares() {
    const [shares, audit] = await Promise.all([api("/v1/shares"), api("/v1/shares/audit")]);
    $("granted").tBodies[0].replaceChildren(...shares.granted.map((g) =>
      el("tr", { dataset: { grantId: g.grant_id, status: g.status } },
        el("td", {}, g.grantee), el("td", {}, g.insight_types.join(", ")), el("td", {}, g.purpose),
        el("td", {}, g.status),
        el("td", {}, g.status === "active"
          ? el("button", { type: "button", class: "revoke", onclick: () => revoke(g.grant_id) }, "Revoke")
          : ""))));
    $("received").tBodies[0].replaceChildren(...shares.received.map((g) =>
      el("tr", { dataset: { grantId: g.grant_id, status: g.status } },
        el("td", {}, g.owner), el("td", {}, g.insight_types.join(", ")), el("td", {}, g.purpose),
        el("td", {}, g.status))));
    $("audit").tBodies[0].replaceChildren(...audit.history.slice().reverse().map((h) =>
      el("tr", {}, el("td", {}, new Date(h.at).toLocaleString()), el("td", {}, h.action),
        el("td", {}, h.owner), el("td", {}, h.grantee), el("td", {}, h.insight_types.join(", ")))));
  }

  // ------------------------------------------------------------------ publishing health

  async function loadPublishing() {
    const report = await api("/v1/console/publishing?minutes=60");
    const xs = report.minutes.map((m) => m.minute);
    drawChart("publishing", $("publishing-chart"), xs, [
      { label: "accepted", values: report.minutes.map((m) => m.accepted), stroke: "#1a7f37" },
      { label: "refused", values: report.minutes.map((m) => m.refused), stroke: "#d1242f" },
    ]);
    $("publishing-chart").dataset.accepted = String(report.accepted);
    $("publishing-chart").dataset.refused = String(report.refused);
    $("reasons").tBodies[0].replaceChildren(...report.reasons.map((r) =>
      el("tr", {}, el("td", {}, r.field || "(whole record)"), el("td", {}, r.reason), el("td", {}, String(r.count)))));
  }

  // ------------------------------------------------------------------ operator view

  function topSeries(history, pick, count = 8) {
    const totals = new Map();
    for (const point of history) for (const [name, v] of point) totals.set(name, (totals.get(name) || 0) + v);
    return [...totals.entries()].filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]).slice(0, count).map(([n]) => n);
  }

  function deadLetterCounts(services) {
    const counts = new Map();
    for (const service of services) {
      for (const s of service.metrics || []) {
        if (!/dead_letters|records_refused/.test(s.name)) continue;
        const label = `${service.service}: ${s.labels.reason || s.name.replace(/^xietong_|_total$/g, "")}`;
        counts.set(label, (counts.get(label) || 0) + s.value);
      }
    }
    return counts;
  }

  function drawOperator() {
    const snaps = state.op;
    if (snaps.length < 1) return;
    const rates = [];
    const dead = [];
    for (let i = 1; i < snaps.length; i++) {
      const a = snaps[i - 1];
      const b = snaps[i];
      const dt = Math.max(0.001, b.at - a.at);
      rates.push(new Map(Object.entries(b.topics).map(([t, end]) => [t, Math.max(0, (end - (a.topics[t] ?? end)) / dt)])));
      const da = deadLetterCounts(a.services);
      dead.push(new Map([...deadLetterCounts(b.services)].map(([k, v]) => [k, Math.max(0, v - (da.get(k) ?? v))])));
    }
    const xs = snaps.slice(1).map((s) => s.at);
    const topics = topSeries(rates);
    drawChart("op-rates", $("op-rates"), xs, topics.map((t) => ({ label: t, values: rates.map((r) => r.get(t) ?? 0) })));
    $("op-rates").dataset.topics = String(topics.length);
    const groups = [...new Set(snaps.flatMap((s) => Object.keys(s.lag)))].sort().slice(0, 8);
    drawChart("op-lag", $("op-lag"), snaps.map((s) => s.at), groups.map((g) => ({ label: g, values: snaps.map((s) => s.lag[g]?.total ?? null) })));
    const reasons = topSeries(dead);
    drawChart("op-dead", $("op-dead"), xs, reasons.map((r) => ({ label: r, values: dead.map((d) => d.get(r) ?? 0) })));
    const last = snaps[snaps.length - 1];
    $("op-lag-table").tBodies[0].replaceChildren(...Object.entries(last.lag).map(([group, lag]) =>
      el("tr", { dataset: { group } }, el("td", {}, group), el("td", {}, String(lag.total)),
        el("td", {}, Object.entries(lag.topics).map(([t, n]) => `${t} ${n}`).join(", ")))));
    $("op-services").tBodies[0].replaceChildren(...last.services.map((s) =>
      el("tr", { class: s.ready ? "ok" : "bad", dataset: { service: s.service } },
        el("td", {}, s.service), el("td", {}, s.ready ? "ready" : "not ready"),
        el("td", {}, s.reason ?? ""), el("td", {}, String((s.metrics || []).length)))));
    const keys = new Map();
    for (const k of last.keys) {
      if (!keys.has(k.tenant)) keys.set(k.tenant, []);
      keys.get(k.tenant).push(`${k.key_id} (${k.status})`);
    }
    $("op-tenants").tBodies[0].replaceChildren(...last.tenants.map((t) =>
      el("tr", { dataset: { tenant: t.tenant } }, el("td", {}, t.tenant), el("td", {}, t.name), el("td", {}, t.kind),
        el("td", {}, t.industry), el("td", {}, t.region), el("td", {}, t.active ? "yes" : "no"),
        el("td", {}, (keys.get(t.tenant) || []).join(", ")))));
    $("operator").dataset.snapshots = String(snaps.length);
  }

  async function operatorLoop() {
    while (!state.abort.signal.aborted) {
      try {
        const snap = await api("/v1/operator/overview");
        state.op.push(snap);
        if (state.op.length > OP_HISTORY) state.op.shift();
        setLive("live", "on");
        drawOperator();
      } catch (error) {
        if (state.abort.signal.aborted) return;
        setLive(`cannot read: ${error.message}`, "retry");
      }
      await sleep(2000);
    }
  }

  // ------------------------------------------------------------------ sign in / out

  function signinError(text) {
    $("signin-error").textContent = text;
  }

  async function signIn(event) {
    event.preventDefault();
    document.body.dataset.signinAt = String(performance.now());
    signinError("");
    secret = $("key").value.trim();
    state.role = document.querySelector("input[name=role]:checked").value;
    $("key").value = "";
    $("signin-button").disabled = true;
    try {
      if (state.role === "operator") {
        const first = await api("/v1/operator/overview");
        state.op.push(first);
        $("who").textContent = "operator";
        show("operator");
        operatorLoop();
        return;
      }
      state.me = await api("/v1/console/me");
      $("who").textContent = `${state.me.name} (${state.me.tenant}, ${state.me.industry}/${state.me.region})`;
      document.body.dataset.tenant = state.me.tenant;
      show("partner");
      await Promise.all([loadStatistics(), loadFeed()]);
      document.body.dataset.painted = String(performance.now());
      streamLoop();
      await Promise.all([loadShares(), loadPublishing()]);
      setInterval(() => loadPublishing().catch(() => {}), 15000);
    } catch (error) {
      if (error.name === "AbortError") return;
      secret = null;
      show("signin");
      if (error.status === 401) {
        signinError(state.role === "operator"
          ? "This operator token was not accepted."
          : "This API key was not accepted: it is unknown or has been revoked. Check the key (xt_…) and try again.");
      } else if (error.status === 404 && state.role === "operator") {
        signinError("The operator view is not enabled on this gateway (XIETONG_OPERATOR_TOKEN is not set).");
      } else if (error.status === 503) {
        signinError("The gateway cannot check keys right now; try again in a few seconds.");
      } else {
        signinError(error.message);
      }
    } finally {
      $("signin-button").disabled = false;
    }
  }

  function show(view) {
    for (const id of ["signin", "partner", "operator"]) $(id).hidden = id !== view;
    $("signout").hidden = view === "signin";
    document.body.dataset.view = view;
  }

  function signOut() {
    state.abort.abort();
    secret = null;
    location.reload(); // drops every piece of data this tab held
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const type of INSIGHT_TYPES) {
      $("share-types").append(el("label", {}, el("input", { type: "checkbox", value: type }), ` ${type}`));
    }
    $("signin-form").addEventListener("submit", signIn);
    $("share-form").addEventListener("submit", grant);
    $("preview-button").addEventListener("click", preview);
    $("signout").addEventListener("click", signOut);
    window.addEventListener("resize", () => {
      for (const [, entry] of state.charts) {
        const width = chartWidth(entry.plot.root.parentElement);
        entry.plot.setSize({ width, height: entry.plot.height });
      }
    });
    document.body.dataset.view = "signin";
  });
})();
