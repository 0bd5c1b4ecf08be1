// cfcd serve: the page. Plain JavaScript over the JSON API of the same server; no build step,
// nothing loaded from elsewhere. The URL hash holds the view and the query, so every search and
// every benchmark page can be reloaded and shared.
"use strict";

const PAGE = 40;
const KS = [50, 100, 200, 500, 1000];
const SETUP_LABEL = { easy: "Easy", medium: "Medium", hard: "Hard", classic: "Classic", public: "Public", private: "Private", all: "All" };
const state = { health: null, bench: null, compare: null, searches: new Map(), lastSearch: null };

// ------------------------------------------------------------------ small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const encId = (id) => id.split("/").map(encodeURIComponent).join("/");
const thumbUrl = (id, size = 256) => `/api/thumbs/${encId(id)}?size=${size}`;
const imageUrl = (id) => `/api/images/${encId(id)}`;
const fmt = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    const error = new Error(`${detail} (HTTP ${response.status})`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function banner(message, kind) {
  const el = document.getElementById("banner");
  if (!message) { el.hidden = true; el.textContent = ""; return; }
  el.className = "banner" + (kind ? " " + kind : "");
  el.textContent = message;
  el.hidden = false;
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = (path || "search").split("/").map(decodeURIComponent);
  return { view: parts[0] || "search", arg: parts.slice(1).join("/") || null, params: new URLSearchParams(query || "") };
}

function go(view, arg, params) {
  const qs = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== "")).toString() : "";
  location.hash = `#/${view}${arg ? "/" + encId(arg) : ""}${qs ? "?" + qs : ""}`;
}

function apColour(ap) {
  if (ap === null || ap === undefined) return "#c3cad6";
  const t = Math.max(0, Math.min(1, ap / 100));
  return `hsl(${Math.round(t * 125)}, 60%, 42%)`;
}

function apBar(ap) {
  return h("span", { class: "apbar", "aria-hidden": "true" },
    h("span", { style: { width: `${ap === null ? 0 : Math.max(2, ap)}%`, background: apColour(ap) } }));
}

// ------------------------------------------------------------------ result cards

function resultCard(item, { cls = null, onPick = null, maxScore = 1 } = {}) {
  const classes = ["card"];
  if (cls) classes.push("cls", cls);
  const pick = () => (onPick ? onPick(item) : go("search", null, { id: item.id }));
  const ranked = item.score !== null && item.score !== undefined;
  const score = ranked ? Math.max(0, Math.min(1, item.score / (maxScore || 1))) : 0;
  const tip = ranked ? `${item.id}\nrank ${item.rank}, score ${fmt(item.score, 4)}${cls ? "\n" + cls : ""}` : item.id;
  return h("div", { class: classes.join(" "), tabindex: "0", role: "button", "data-id": item.id,
                    title: `${tip}\nclick: search with this image`,
                    onclick: pick, onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pick(); } } },
    h("div", { class: "thumb" }, h("img", { src: thumbUrl(item.id), alt: item.id, loading: "lazy", decoding: "async" })),
    item.rank ? h("span", { class: "rank" }, `#${item.rank}`) : null,
    cls ? h("span", { class: `tag ${cls}` }, cls === "negative" ? "neg" : cls) : null,
    h("div", { class: "info" },
      h("span", { class: "id" }, item.id),
      ranked ? h("div", { class: "line" }, h("span", {}, "score"), h("span", { class: "mono" }, fmt(item.score, 4))) : null,
      ranked ? h("div", { class: "scorebar" }, h("span", { style: { width: `${Math.round(score * 100)}%` } })) : null));
}

// A grid that shows `items` PAGE at a time and loads the next page when its end scrolls into view.
function pagedGrid(items, makeCard, { page = PAGE } = {}) {
  const grid = h("div", { class: "grid" });
  const more = h("button", { class: "btn", type: "button" }, "Show more");
  const foot = h("div", { class: "more" }, more);
  let shown = 0;
  function showMore() {
    const next = items.slice(shown, shown + page);
    for (const item of next) grid.append(makeCard(item));
    shown += next.length;
    foot.hidden = shown >= items.length;
    more.textContent = `Show more (${items.length - shown} left)`;
  }
  more.addEventListener("click", showMore);
  showMore();
  if ("IntersectionObserver" in window) {
    const io = new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting) && shown < items.length) showMore(); },
      { rootMargin: "400px" });
    io.observe(foot);
  }
  return h("div", {}, grid, foot);
}

// ------------------------------------------------------------------ search view

function searchKey(q) { return JSON.stringify([q.id || null, q.upload || null, q.box || null, q.k]); }

async function runSearch(q) {
  const key = searchKey(q);
  if (state.searches.has(key)) return state.searches.get(key);
  const params = new URLSearchParams({ k: q.k });
  if (q.id) params.set("id", q.id); else params.set("upload", q.upload);
  if (q.box) params.set("box", q.box);
  const result = await api(`/api/search?${params}`);
  state.searches.set(key, result);
  return result;
}

async function uploadSearch(file, k) {
  const form = new FormData();
  form.append("image", file, file.name || "upload");
  form.append("k", String(k));
  const result = await api("/api/search", { method: "POST", body: form });
  state.searches.set(searchKey({ upload: result.query.upload, box: null, k }), result);
  return result;
}

function dropZone(k) {
  const input = h("input", { type: "file", accept: "image/*", hidden: true, id: "file-input" });
  const zone = h("div", { class: "drop", id: "dropzone" },
    h("strong", {}, "Search by photo"),
    h("div", {}, "Drop a photo here, or ",
      h("button", { class: "btn primary", type: "button", id: "choose", onclick: () => input.click() }, "Choose a photo")),
    h("div", { class: "hint" }, "or pick one from ", h("a", { href: "#/browse" }, "the collection"),
      `. Drag on the query to search a region only.`),
    input);
  async function handle(file) {
    if (!file) return;
    const limits = state.health && state.health.limits;
    if (limits && file.size > limits.max_upload_bytes) {
      banner(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB is over the server's upload limit of ${(limits.max_upload_bytes / 1048576).toFixed(0)} MB`);
      return;
    }
    banner(null);
    zone.classList.add("busy");
    try {
      const result = await uploadSearch(file, k);
      go("search", null, { upload: result.query.upload, k });
    } catch (e) { banner(`${file.name}: ${e.message}`); }
    finally { zone.classList.remove("busy"); }
  }
  input.addEventListener("change", () => handle(input.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); handle(e.dataTransfer.files[0]); });
  return zone;
}

// The query image; dragging on it draws a box (in original-image pixels) and calls onBox.
function queryImage(src, box, onBox) {
  const img = h("img", { src, alt: "query image", draggable: "false" });
  const sel = h("div", { class: "boxsel", hidden: true });
  const wrap = h("div", { class: "query-view", title: "drag to search a region of the image" }, img, sel);
  const natural = () => [img.naturalWidth || 1, img.naturalHeight || 1];
  function frame() {  // the displayed image rectangle inside the element (object-fit: contain)
    const r = img.getBoundingClientRect();
    const [nw, nh] = natural();
    const s = Math.min(r.width / nw, r.height / nh);
    const w = nw * s, hgt = nh * s;
    return { left: r.left + (r.width - w) / 2, top: r.top + (r.height - hgt) / 2, w, h: hgt, s, ox: (r.width - w) / 2, oy: (r.height - hgt) / 2 };
  }
  function draw(b) {
    if (!b) { sel.hidden = true; return; }
    const f = frame();
    Object.assign(sel.style, { left: `${f.ox + b[0] * f.s}px`, top: `${f.oy + b[1] * f.s}px`,
      width: `${(b[2] - b[0]) * f.s}px`, height: `${(b[3] - b[1]) * f.s}px` });
    sel.hidden = false;
  }
  img.addEventListener("load", () => draw(box));
  window.addEventListener("resize", () => draw(box));
  let start = null;
  const toImage = (e) => {
    const f = frame();
    const [nw, nh] = natural();
    return [Math.max(0, Math.min(nw, (e.clientX - f.left) / f.s)), Math.max(0, Math.min(nh, (e.clientY - f.top) / f.s))];
  };
  wrap.addEventListener("pointerdown", (e) => { start = toImage(e); wrap.setPointerCapture(e.pointerId); });
  wrap.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = toImage(e);
    draw([Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])]);
  });
  wrap.addEventListener("pointerup", (e) => {
    if (!start) return;
    const p = toImage(e);
    const b = [Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])];
    start = null;
    if (b[2] - b[0] < 8 || b[3] - b[1] < 8) { draw(box); return; }
    onBox(b.map((v) => Math.round(v)));
  });
  return wrap;
}

async function viewSearch(main, params) {
  const k = Number(params.get("k")) || 100;
  const id = params.get("id"), upload = params.get("upload"), box = params.get("box");
  const side = h("div", { class: "side" });
  const content = h("section", { class: "results", "aria-label": "results" });
  main.append(h("div", { class: "layout" }, side, content));
  side.append(dropZone(k));
  if (!id && !upload) {
    content.append(h("div", { class: "panel empty" },
      h("h2", {}, "Find the images of a scene"),
      h("p", {}, "Upload a photo or pick one of the collection; the index returns its nearest images, best first. ",
        "Click a result to search with it."),
      state.health && state.health.benchmark ? h("p", {}, "This index has a benchmark: ", h("a", { href: "#/benchmark" }, "see where the model fails"), ".") : null));
    return;
  }
  const q = { id, upload, box, k };
  const src = id ? imageUrl(id) : `/api/uploads/${encodeURIComponent(upload)}`;
  const boxArr = box ? box.split(",").map(Number) : null;
  const setParams = (changes) => go("search", null, Object.assign({ id, upload, box, k }, changes));
  const kSelect = h("select", { "aria-label": "results to fetch", onchange: (e) => setParams({ k: e.target.value }) },
    KS.map((v) => h("option", { value: v, selected: v === k }, `top ${v}`)));
  side.append(h("div", { class: "panel" },
    h("div", { class: "section-head" }, h("h3", {}, "Query"), h("span", { class: "spacer" }),
      box ? h("button", { class: "btn", type: "button", onclick: () => setParams({ box: null }) }, "Whole image") : null),
    queryImage(src, boxArr, (b) => setParams({ box: b.join(",") })),
    h("div", { class: "query-meta" }, id ? `collection image ${id}` : "uploaded photo",
      box ? ` · region ${box}` : " · whole image (drag to select a region)"),
    h("div", { class: "row", style: { marginTop: ".6rem" } }, h("label", { class: "inline" }, "Show", kSelect))));
  content.append(h("div", { class: "empty" }, "Searching…"));
  let result;
  try { result = await runSearch(q); }
  catch (e) { content.replaceChildren(h("div", { class: "panel empty" }, e.message)); return; }
  content.replaceChildren();
  const t = result.timings_ms || {};
  const d = result.descriptor || {};
  const scales = d.scales ? d.scales.scales.join(", ") : "";
  content.append(h("div", { class: "section-head" },
    h("h2", {}, `Top ${result.results.length} of ${result.count}`),
    h("span", { class: "muted" }, result.query.descriptor_source === "stored"
      ? `indexed descriptor, searched in ${fmt(t.search, 1)} ms`
      : `described in ${fmt(t.describe, 0)} ms, searched in ${fmt(t.search, 1)} ms`),
    h("span", { class: "spacer" }),
    h("span", { class: "muted mono hide-narrow", title: "the query is described like the database" },
      `${d.model} · scales ${scales}${d.max_size ? " · max " + d.max_size : ""} · ${d.dim}-D`)));
  const ds = result.query.downscaled;
  if (ds) {
    content.append(h("div", { class: "muted", id: "downscaled" },
      `The photo (${ds.from[0]}×${ds.from[1]}) was described at ${ds.to[0]}×${ds.to[1]}, `
      + `the largest query size this index takes (${d.max_size ? "its extraction size" : "--max-query-size"}).`));
  }
  const top = result.results.length ? result.results[0].score : 1;
  content.append(result.results.length
    ? pagedGrid(result.results, (item) => resultCard(item, { maxScore: top }))
    : h("div", { class: "empty" }, "No results."));
}

// ------------------------------------------------------------------ browse view

async function viewBrowse(main, params) {
  const filter = params.get("q") || "";
  const input = h("input", { type: "search", placeholder: "filter ids…", value: filter, "aria-label": "filter image ids" });
  let timer = null;
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => go("browse", null, { q: input.value }), 300); });
  const count = h("span", { class: "muted" });
  const grid = h("div", { class: "grid" });
  const more = h("button", { class: "btn", type: "button" }, "Show more");
  const foot = h("div", { class: "more" }, more);
  main.append(h("div", { class: "section-head" }, h("h2", {}, "Collection"), count, h("span", { class: "spacer" }), input),
    h("p", { class: "muted" }, "Click an image to search with it."), grid, foot);
  let offset = 0, total = 0;
  async function load() {
    const page = await api(`/api/images?${new URLSearchParams({ offset, limit: 60, q: filter })}`);
    total = page.total;
    count.textContent = `${total} image${total === 1 ? "" : "s"}`;
    page.ids.forEach((id) => grid.append(resultCard({ id, rank: null, score: null }, {})));
    offset += page.ids.length;
    foot.hidden = offset >= total;
  }
  more.addEventListener("click", load);
  await load();
}

// ------------------------------------------------------------------ benchmark view

function metricsTable(metrics, kappas, setups, other) {
  // the benchmark's own metrics, primary first (revisitop: mAP, mP@k; GLDv2: mAP@100, mPrecision@100)
  const names = Object.keys(metrics[setups[0]] || {});
  const head = h("tr", {}, h("th", {}, "setup"), names.map((n) => h("th", {}, n)));
  const rows = setups.map((s) => {
    const m = metrics[s];
    const cells = names.map((n) => m[n]);
    return h("tr", {}, h("td", {}, SETUP_LABEL[s] || s), cells.map((v, i) => {
      const td = h("td", { class: i === 0 ? "big" : "" }, pct(v));
      if (other) {
        const o = other[s][names[i]];
        if (v != null && o != null) {
          const dlt = v - o;
          td.append(h("span", { class: `delta ${dlt > 0.005 ? "up" : dlt < -0.005 ? "down" : "same"}` }, ` (${dlt >= 0 ? "+" : ""}${dlt.toFixed(2)})`));
        }
      }
      return td;
    }));
  });
  return h("table", { class: "data metrics" }, h("thead", {}, head), h("tbody", {}, rows));
}

function setupSwitch(setups, current, onPick) {
  return h("div", { class: "seg", role: "group", "aria-label": "protocol" },
    setups.map((s) => h("button", { type: "button", class: s === current ? "on" : "", "aria-pressed": String(s === current), onclick: () => onPick(s) }, SETUP_LABEL[s] || s)));
}

async function loadBench() {
  if (!state.bench) state.bench = await api("/api/benchmark");
  return state.bench;
}

function sortRows(rows, key, dir, valueOf) {
  const sign = dir === "desc" ? -1 : 1;
  return rows.slice().sort((a, b) => {
    const va = valueOf(a, key), vb = valueOf(b, key);
    if (va === vb) return a.index - b.index;
    if (va === null || va === undefined) return 1;
    if (vb === null || vb === undefined) return -1;
    return (va < vb ? -1 : 1) * sign;
  });
}

async function viewBenchmark(main, params) {
  const bench = await loadBench();
  const setup = params.get("setup") || (bench.setups.includes("medium") ? "medium" : bench.setups[0]);
  const sort = params.get("sort") || `ap_${setup}`;
  const dir = params.get("dir") || (sort === "id" ? "asc" : "asc");
  const nav = (changes) => go("benchmark", null, Object.assign({ setup, sort, dir }, changes));
  main.append(h("div", { class: "section-head" }, h("h2", {}, `Benchmark: ${bench.dataset}`),
    h("span", { class: "muted" }, `${bench.num_queries} queries, ${bench.num_database} database images, index directory: ${bench.name}`)));
  main.append(h("div", { class: "panel", style: { marginBottom: "1rem" } },
    metricsTable(bench.metrics, bench.kappas, bench.setups),
    h("p", { class: "muted", style: { margin: ".5rem 0 0", fontSize: "12.5px" } },
      "revisitop protocol, values in percent: the numbers of cfcd evaluate on the same descriptors.")));
  const valueOf = (row, key) => (key === "id" ? row.id : key.startsWith("ap_") ? row.AP[key.slice(3)] : key === "pos" ? row.positives[setup] : null);
  const rows = sortRows(bench.queries, sort, dir, valueOf);
  const header = (label, key) => {
    const on = sort === key;
    return h("th", { class: "sortable", "aria-sort": on ? (dir === "asc" ? "ascending" : "descending") : "none",
                     onclick: () => nav({ sort: key, dir: on && dir === "asc" ? "desc" : "asc" }) },
      label, h("span", { class: "arrow" }, on ? (dir === "asc" ? "↑" : "↓") : ""));
  };
  const table = h("table", { class: "data", id: "query-table" },
    h("thead", {}, h("tr", {}, header("query", "id"), bench.setups.map((s) => header(`${bench.metric || "AP"} ${SETUP_LABEL[s] || s}`, `ap_${s}`)),
      header(`positives (${SETUP_LABEL[setup] || setup})`, "pos"))),
    h("tbody", {}, rows.map((row) => h("tr", { class: "click", "data-query": row.id,
        onclick: () => go("benchmark", row.id, { setup }) },
      h("td", { class: "qid" }, h("img", { src: `/api/benchmark/${encodeURIComponent(row.id)}/thumb?size=128`, alt: "", loading: "lazy" }),
        h("a", { href: `#/benchmark/${encId(row.id)}?setup=${setup}` }, row.id)),
      bench.setups.map((s) => h("td", { class: "apcell" }, pct(row.AP[s]), apBar(row.AP[s]))),
      h("td", {}, row.positives[setup])))));
  main.append(h("div", { class: "panel" },
    h("div", { class: "section-head" }, h("h3", {}, "Queries"),
      h("span", { class: "muted" }, sort.startsWith("ap_") && dir === "asc" ? "worst first" : ""), h("span", { class: "spacer" }),
      setupSwitch(bench.setups, setup, (s) => nav({ setup: s, sort: sort.startsWith("ap_") ? `ap_${s}` : sort }))),
    h("div", { style: { overflowX: "auto" } }, table)));
}

function prPlot(series) {
  const W = 280, H = 200, L = 34, B = 26, T = 10, R = 10;
  const x = (r) => L + r * (W - L - R), y = (p) => T + (1 - p) * (H - T - B);
  const el = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "prplot", role: "img", "aria-label": "precision-recall curve" });
  for (let i = 0; i <= 4; i++) {
    el.append(svg("line", { class: "gridl", x1: x(0), x2: x(1), y1: y(i / 4), y2: y(i / 4) }));
    el.append(svg("text", { x: L - 4, y: y(i / 4) + 3, "text-anchor": "end" }, (i / 4).toFixed(2)));
    el.append(svg("text", { x: x(i / 4), y: H - B + 14, "text-anchor": "middle" }, (i / 4).toFixed(2)));
  }
  el.append(svg("line", { class: "axis", x1: x(0), x2: x(1), y1: y(0), y2: y(0) }));
  el.append(svg("line", { class: "axis", x1: x(0), x2: x(0), y1: y(0), y2: y(1) }));
  el.append(svg("text", { x: x(0.5), y: H - 2, "text-anchor": "middle" }, "recall"));
  el.append(svg("text", { x: 10, y: y(0.5), transform: `rotate(-90 10 ${y(0.5)})`, "text-anchor": "middle" }, "precision"));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    let d = `M ${x(0)} ${y(s.points[0].precision)}`;
    for (const p of s.points) d += ` L ${x(p.recall)} ${y(p.precision)}`;
    el.append(svg("path", { class: `curve${i ? " b" : ""}`, d }));
    for (const p of s.points) el.append(svg("circle", { cx: x(p.recall), cy: y(p.precision), r: 2.5, fill: i ? "var(--hard)" : "var(--accent)" }));
  });
  return el;
}

const LEGEND = () => h("div", { class: "legend", "aria-label": "legend" },
  h("span", { class: "easy" }, "easy"), h("span", { class: "hard" }, "hard"),
  h("span", { class: "junk" }, "junk (ignored)"), h("span", { class: "negative" }, "negative"));

function classCard(item) { return resultCard(item, { cls: item.class }); }

async function viewBenchmarkQuery(main, query, params) {
  const bench = await loadBench();
  const setup = params.get("setup") || (bench.setups.includes("medium") ? "medium" : bench.setups[0]);
  const k = Number(params.get("k")) || 100;
  const detail = await api(`/api/benchmark/${encodeURIComponent(query)}?${new URLSearchParams({ setup, k })}`);
  const order = sortRows(bench.queries, `ap_${setup}`, "asc", (r, key) => r.AP[key.slice(3)]);
  const at = order.findIndex((r) => r.id === query);
  const prev = at > 0 ? order[at - 1].id : null, next = at >= 0 && at < order.length - 1 ? order[at + 1].id : null;
  const side = h("div", { class: "side" });
  const content = h("section", {});
  main.append(h("div", { class: "section-head" },
    h("a", { href: `#/benchmark?setup=${setup}` }, "← all queries"),
    h("h2", {}, query), h("span", { class: "muted" }, `${at + 1} of ${order.length} by ${SETUP_LABEL[setup]} AP, worst first`),
    h("span", { class: "spacer" }),
    h("div", { class: "pager" },
      h("button", { class: "btn", type: "button", disabled: !prev, onclick: () => go("benchmark", prev, { setup }) }, "← worse"),
      h("button", { class: "btn", type: "button", disabled: !next, onclick: () => go("benchmark", next, { setup }) }, "better →"))),
    h("div", { class: "qdetail" }, side, content));
  side.append(h("div", { class: "panel" },
    h("h3", {}, detail.query.bbx ? "Query (cropped to its box)" : "Query"),
    h("div", { class: "qimg" }, h("img", { src: `/api/benchmark/${encodeURIComponent(query)}/thumb?size=512`, alt: `query ${query}` })),
    h("div", { class: "row", style: { marginTop: ".6rem" } },
      h("a", { class: "btn", href: `#/search?${new URLSearchParams({ id: query, box: (detail.query.bbx || []).map((v) => Math.round(v * 10) / 10).join(",") })}` }, "Search with this query"))));
  side.append(h("div", { class: "panel" },
    h("div", { class: "section-head" }, h("h3", {}, "Average precision"), h("span", { class: "spacer" }),
      setupSwitch(bench.setups, setup, (s) => go("benchmark", query, { setup: s, k }))),
    h("dl", { class: "kv" }, bench.setups.map((s) => [h("dt", {}, SETUP_LABEL[s] || s),
      h("dd", {}, pct(detail.AP[s]), apBar(detail.AP[s]), ` · ${detail.metrics[s].positives} positive${detail.metrics[s].positives === 1 ? "" : "s"}`)])),
    h("h3", { style: { marginTop: ".75rem" } }, `Precision-recall (${SETUP_LABEL[setup]})`),
    prPlot([{ points: detail.pr }])));
  const missed = detail.missed;
  content.append(h("div", { class: "section-head" }, h("h2", {}, `Top ${detail.ranked.length}`),
    h("span", { class: "muted" }, `${detail.positives} positives for ${SETUP_LABEL[setup]}; ${missed.length} not in the top ${detail.k}`),
    h("span", { class: "spacer" }), LEGEND()));
  content.append(pagedGrid(detail.ranked, classCard));
  content.append(h("div", { class: "section-head", style: { marginTop: "1.5rem" } },
    h("h2", {}, "Missed positives"), h("span", { class: "muted" }, missed.length ? `ranked below ${detail.k}` : `none: every positive is in the top ${detail.k}`)));
  if (missed.length) content.append(pagedGrid(missed, classCard));
}

// ------------------------------------------------------------------ compare view

async function loadCompare() {
  if (!state.compare) state.compare = await api("/api/compare");
  return state.compare;
}

// The served index is the model, --compare its baseline: every change shown is model − baseline.
async function viewCompare(main, params) {
  const cmp = await loadCompare();
  const setup = params.get("setup") || (cmp.setups.includes("medium") ? "medium" : cmp.setups[0]);
  const dir = params.get("dir") || "asc";
  const nav = (changes) => go("compare", null, Object.assign({ setup, dir }, changes));
  main.append(h("div", { class: "section-head" }, h("h2", {}, `Compare on ${cmp.dataset}`),
    h("span", { class: "muted" }, `model: ${cmp.model.name} (${cmp.model.model}) · baseline: ${cmp.baseline.name} (${cmp.baseline.model})`)));
  main.append(h("div", { class: "cards2" },
    h("div", { class: "panel" }, h("h3", {}, `Baseline: ${cmp.baseline.name}`), metricsTable(cmp.baseline.metrics, cmp.kappas, cmp.setups)),
    h("div", { class: "panel" }, h("h3", {}, `Model: ${cmp.model.name}`, h("span", { class: "muted" }, " (change from the baseline in brackets)")),
      metricsTable(cmp.model.metrics, cmp.kappas, cmp.setups, cmp.baseline.metrics))));
  const rows = sortRows(cmp.queries, "diff", dir, (r) => r.diff[setup]);
  const better = rows.filter((r) => r.diff[setup] > 0.005).length, worse = rows.filter((r) => r.diff[setup] < -0.005).length;
  const table = h("table", { class: "data", id: "compare-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "query"), h("th", {}, `${cmp.metric || "AP"} baseline`), h("th", {}, `${cmp.metric || "AP"} model`),
      h("th", { class: "sortable", onclick: () => nav({ dir: dir === "asc" ? "desc" : "asc" }) }, "model − baseline",
        h("span", { class: "arrow" }, dir === "asc" ? "↑" : "↓")))),
    h("tbody", {}, rows.map((r) => {
      const dlt = r.diff[setup];
      const cls = dlt === null ? "same" : dlt > 0.005 ? "up" : dlt < -0.005 ? "down" : "same";
      const word = cls === "up" ? "better" : cls === "down" ? "worse" : "same";
      return h("tr", { class: "click", "data-query": r.id, onclick: () => go("compare", r.id, { setup }) },
        h("td", { class: "qid" }, h("img", { src: `/api/benchmark/${encodeURIComponent(r.id)}/thumb?size=128`, alt: "", loading: "lazy" }),
          h("a", { href: `#/compare/${encId(r.id)}?setup=${setup}` }, r.id)),
        h("td", {}, pct(r.AP.baseline[setup]), apBar(r.AP.baseline[setup])),
        h("td", {}, pct(r.AP.model[setup]), apBar(r.AP.model[setup])),
        h("td", { class: `delta ${cls}` }, dlt === null ? "–" : `${dlt >= 0 ? "+" : ""}${dlt.toFixed(2)} ${word}`));
    })));
  main.append(h("div", { class: "panel" },
    h("div", { class: "section-head" }, h("h3", {}, `Queries by ${cmp.metric || "AP"} change from the baseline to the model`),
      h("span", { class: "muted", id: "compare-summary" }, `${better} queries better than the baseline, ${worse} worse, ${rows.length - better - worse} unchanged`),
      h("span", { class: "spacer" }), setupSwitch(cmp.setups, setup, (s) => nav({ setup: s }))),
    h("div", { style: { overflowX: "auto" } }, table)));
}

async function viewCompareQuery(main, query, params) {
  const cmp = await loadCompare();
  const setup = params.get("setup") || (cmp.setups.includes("medium") ? "medium" : cmp.setups[0]);
  const k = Number(params.get("k")) || 50;
  const qs = (side) => new URLSearchParams({ setup, k, side });
  // side "a" is the served index (the model), side "b" the --compare index (the baseline)
  const [model, baseline] = await Promise.all([api(`/api/benchmark/${encodeURIComponent(query)}?${qs("a")}`),
                                               api(`/api/benchmark/${encodeURIComponent(query)}?${qs("b")}`)]);
  main.append(h("div", { class: "section-head" }, h("a", { href: `#/compare?setup=${setup}` }, "← all queries"),
    h("h2", {}, query), h("span", { class: "spacer" }), setupSwitch(cmp.setups, setup, (s) => go("compare", query, { setup: s, k })), LEGEND()));
  const side = h("div", { class: "side" },
    h("div", { class: "panel" }, h("h3", {}, model.query.bbx ? "Query (cropped to its box)" : "Query"),
      h("div", { class: "qimg" }, h("img", { src: `/api/benchmark/${encodeURIComponent(query)}/thumb?size=512`, alt: `query ${query}` }))),
    h("div", { class: "panel" }, h("h3", {}, `Precision-recall (${SETUP_LABEL[setup]})`),
      prPlot([{ points: model.pr }, { points: baseline.pr }]),
      h("p", { class: "muted", style: { fontSize: "12.5px", margin: 0 } }, "solid: model, dashed: baseline")));
  const column = (label, d) => h("div", { class: "panel" },
    h("div", { class: "section-head" }, h("h3", {}, label),
      h("span", { class: "muted" }, `AP ${pct(d.AP[setup])} · ${d.missed.length} positives below ${d.k}`)),
    pagedGrid(d.ranked, classCard, { page: 20 }));
  main.append(h("div", { class: "qdetail" }, side,
    h("div", { class: "side-by-side" }, column(`Model: ${cmp.model.name}`, model), column(`Baseline: ${cmp.baseline.name}`, baseline))));
}

// ------------------------------------------------------------------ router

async function render() {
  const { view, arg, params } = parseHash();
  const main = document.getElementById("main");
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === view);
  banner(null);
  main.replaceChildren();
  main.dataset.view = view;
  try {
    if (view === "browse") await viewBrowse(main, params);
    else if (view === "benchmark" && arg) await viewBenchmarkQuery(main, arg, params);
    else if (view === "benchmark") await viewBenchmark(main, params);
    else if (view === "compare" && arg) await viewCompareQuery(main, arg, params);
    else if (view === "compare") await viewCompare(main, params);
    else await viewSearch(main, params);
  } catch (e) {
    main.append(h("div", { class: "panel empty" }, e.message));
  }
  main.dataset.ready = "1";
}

async function start() {
  try {
    state.health = await api("/api/health");
    const s = state.health;
    document.getElementById("status").textContent =
      `${s.name} · ${s.model} · ${s.index_type} · ${s.count.toLocaleString()} × ${s.dim} · cfcd ${s.version}`;
    document.querySelector('#tabs a[data-view="benchmark"]').hidden = !s.benchmark;
    document.querySelector('#tabs a[data-view="compare"]').hidden = !s.compare;
    document.title = `cfcd · ${s.name}`;
  } catch (e) {
    document.getElementById("status").textContent = "server not reachable";
    banner(`The server did not answer: ${e.message}`);
  }
  window.addEventListener("hashchange", render);
  // Drop a photo anywhere on the search page.
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const zone = document.getElementById("dropzone");
    if (zone && e.target && !zone.contains(e.target) && e.dataTransfer.files.length) {
      zone.dispatchEvent(new DragEvent("drop", { dataTransfer: e.dataTransfer, bubbles: false }));
    }
  });
  await render();
}

start();
