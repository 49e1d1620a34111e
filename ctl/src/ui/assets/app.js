// The Trellis dashboard: renders what /api/events sends (see ctl/src/ui/mod.rs).
"use strict";

(function () {
  const MAX_FACTS = 200;
  const MAX_POINTS = 90;
  const PALETTE = ["#2f6fde", "#d9822b", "#2e9e5b", "#9b51e0", "#c23b3b", "#178a95", "#8a6d1f", "#d24fa1"];
  const points = [];
  const colors = new Map();
  let lastSeq = 0;

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else if (key === "title") node.title = String(value);
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(status) {
    return el("span", { class: "badge " + status }, status);
  }

  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren(...rows);
    if (rows.length === 0) {
      tbody.append(el("tr", { class: "empty" }, el("td", {}, empty)));
      tbody.lastChild.firstChild.colSpan = columns;
    }
  }

  // A counter from a heartbeat; none once the host no longer reports the instance.
  function count(n) {
    return n === null || n === undefined ? "—" : n;
  }

  function age(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms < 1000) return ms + " ms ago";
    return (ms / 1000).toFixed(1) + " s ago";
  }

  function since(iso) {
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  }

  function colorOf(component) {
    if (!colors.has(component)) colors.set(component, PALETTE[colors.size % PALETTE.length]);
    return colors.get(component);
  }

  function renderSnapshot(s) {
    $("#lattice").textContent = s.lattice;
    let instances = 0;
    for (const c of s.components) instances += c.instances.filter((i) => i.status === "running").length;
    const up = s.hosts.filter((h) => h.status === "up").length;
    $("#summary").replaceChildren(
      el("span", {}, up + "/" + s.hosts.length + " hosts up"),
      el("span", {}, instances + " instances running"),
      el("span", {}, s.providers.length + " providers"),
      el("span", { class: s.failures_last_hour > 0 ? "warn" : "" }, s.failures_last_hour + " failures in the last hour"),
      el("span", {}, "facts to seq " + s.as_of + (s.lag > 0 ? " (controller " + s.lag + " behind)" : "")),
    );

    fill($("#hosts tbody"), s.hosts.map((h) => {
      const share = h.max_instances > 0 ? h.instances / h.max_instances : 0;
      const bar = el("span", { class: "bar" }, el("span", {}));
      bar.firstChild.style.width = Math.min(100, Math.round(share * 100)) + "%";
      const labels = Object.entries(h.labels).map(([k, v]) => k + "=" + v).join(" ");
      return el("tr", { "data-host": h.host_id, "data-status": h.status },
        el("td", { class: "id" }, h.host_id),
        el("td", {}, badge(h.status)),
        el("td", {}, bar, " " + h.instances + " / " + h.max_instances),
        el("td", {}, h.in_flight),
        el("td", {}, age(h.heartbeat_age_ms)),
        el("td", {}, labels),
        el("td", {}, h.version));
    }), "no hosts", 7);

    const list = $("#components");
    list.replaceChildren(...s.components.map((c) => {
      const rows = c.instances.map((i) =>
        el("tr", { "data-instance": i.instance_id, "data-status": i.status, "data-component": c.name },
          el("td", { class: "id" }, i.instance_id),
          el("td", {}, i.version || "—"),
          el("td", {}, i.host_id),
          el("td", {}, badge(i.status), " ", el("span", { class: "muted" }, since(i.status_since))),
          el("td", {}, i.restarts),
          el("td", {}, count(i.calls)),
          el("td", { class: i.errors > 0 ? "warn" : "" }, count(i.errors)),
          el("td", {}, count(i.in_flight)),
          el("td", { class: "reason", title: i.last_reason || "" }, i.last_reason || "")));
      const table = el("table", {},
        el("thead", {}, el("tr", {}, ...["Instance", "Version", "Host", "Status", "Restarts", "Calls", "Errors", "In flight", "Last reason"].map((t) => el("th", {}, t)))),
        el("tbody", {}));
      fill(table.tBodies[0], rows, "no instances", 9);
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colorOf(c.name);
      return el("div", { class: "component", "data-component": c.name },
        el("h3", {}, swatch, c.name, " ", el("span", { class: "muted" }, c.versions.length ? "versions " + c.versions.join(", ") : "")),
        table);
    }));
    if (s.components.length === 0) list.append(el("p", { class: "empty" }, "no components pushed"));

    fill($("#providers tbody"), s.providers.map((p) =>
      el("tr", { "data-provider": p.provider_id, "data-status": p.status },
        el("td", {}, p.name),
        el("td", { class: "id" }, p.provider_id),
        el("td", {}, p.capabilities.join(", ")),
        el("td", {}, (p.place || "—") + (p.embedded ? " (embedded)" : "")),
        el("td", {}, badge(p.status)),
        el("td", {}, p.restarts))), "no providers", 6);

    fill($("#assignments tbody"), s.assignments.map((a) =>
      el("tr", { "data-assignment": a.assignment_id },
        el("td", {}, a.target),
        el("td", {}, a.capability),
        el("td", {}, a.provider),
        el("td", {}, Object.entries(a.config).map(([k, v]) => k + "=" + v).join(" ")),
        el("td", { class: "id" }, a.assignment_id))), "no assignments", 5);

    fill($("#rollouts tbody"), s.rollouts.map((r) =>
      el("tr", { "data-rollout": r.rollout_id, "data-status": r.status },
        el("td", {}, r.component),
        el("td", {}, r.to),
        el("td", {}, r.strategy),
        el("td", {}, badge(r.status)),
        el("td", {}, r.weight === undefined || r.weight === null ? "—" : r.weight + "%"),
        el("td", { class: "id" }, r.rollout_id))), "none in progress", 6);
  }

  function addFact(f) {
    if (f.seq <= lastSeq) return;
    lastSeq = f.seq;
    const feed = $("#feed");
    const kind = f.type.split(".").pop();
    const item = el("li", { "data-type": f.type, "data-seq": f.seq, class: kind },
      el("span", { class: "seq" }, "#" + f.seq),
      el("time", {}, f.time.replace("T", " ").replace(/\.\d+/, "")),
      el("span", { class: "type" }, f.type),
      el("span", { class: "subject" }, f.subject),
      el("span", { class: "summary" }, f.summary));
    feed.prepend(item);
    while (feed.children.length > MAX_FACTS) feed.lastChild.remove();
  }

  function addPoint(p) {
    // A reconnected stream sends the kept points again.
    if (points.length && p.t <= points[points.length - 1].t) return;
    points.push(p);
    while (points.length > MAX_POINTS) points.shift();
    drawChart();
  }

  function drawChart() {
    const canvas = $("#chart");
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 30;
    ctx.clearRect(0, 0, w, h);
    const names = new Set();
    let max = 1;
    for (const p of points) {
      for (const [name, r] of Object.entries(p.components)) {
        names.add(name);
        max = Math.max(max, r.calls, r.errors);
      }
    }
    ctx.strokeStyle = "#ccc";
    ctx.fillStyle = "#666";
    ctx.font = "11px sans-serif";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(pad, 5);
    ctx.lineTo(pad, h - pad + 5);
    ctx.lineTo(w - 5, h - pad + 5);
    ctx.stroke();
    ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 12);
    ctx.fillText("0", 2, h - pad + 5);
    const x = (i) => pad + ((w - pad - 10) * i) / Math.max(1, MAX_POINTS - 1);
    const y = (v) => h - pad + 5 - ((h - pad) * v) / max;
    const legend = $("#legend");
    const items = [];
    for (const name of [...names].sort()) {
      const color = colorOf(name);
      for (const key of ["calls", "errors"]) {
        ctx.strokeStyle = color;
        ctx.lineWidth = key === "calls" ? 2 : 1;
        ctx.setLineDash(key === "calls" ? [] : [4, 3]);
        ctx.beginPath();
        const offset = MAX_POINTS - points.length;
        points.forEach((p, i) => {
          const r = p.components[name];
          const v = r ? r[key] : 0;
          if (i === 0) ctx.moveTo(x(offset + i), y(v));
          else ctx.lineTo(x(offset + i), y(v));
        });
        ctx.stroke();
      }
      ctx.setLineDash([]);
      const last = points.length ? points[points.length - 1].components[name] : null;
      const calls = last ? last.calls : 0;
      const errors = last ? last.errors : 0;
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = color;
      items.push(el("li", { "data-component": name, "data-calls": calls.toFixed(2), "data-errors": errors.toFixed(2) },
        swatch, name + ": " + calls.toFixed(1) + "/s, errors " + errors.toFixed(1) + "/s"));
    }
    legend.replaceChildren(...items);
    if (items.length === 0) legend.append(el("li", { class: "empty" }, "no invocations yet"));
  }

  function connect() {
    const conn = $("#conn");
    const source = new EventSource("/api/events");
    source.onopen = () => {
      conn.dataset.state = "live";
      conn.textContent = "live";
    };
    source.onerror = () => {
      conn.dataset.state = "reconnecting";
      conn.textContent = "reconnecting…";
    };
    source.addEventListener("snapshot", (e) => {
      renderSnapshot(JSON.parse(e.data));
      $("#problem").hidden = true;
    });
    source.addEventListener("problem", (e) => {
      const box = $("#problem");
      box.textContent = JSON.parse(e.data).message;
      box.hidden = false;
    });
    source.addEventListener("fact", (e) => addFact(JSON.parse(e.data)));
    source.addEventListener("metrics", (e) => addPoint(JSON.parse(e.data)));
  }

  drawChart();
  connect();
})();
