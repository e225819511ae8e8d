// sdxld review: keys move files through the server's POST /api/{approve,reject,undo,retry}.
"use strict";

const PAGE = 100;
const POLL_MS = 2000;
const csrf = document.querySelector('meta[name="csrf"]').content;
const $ = (id) => document.getElementById(id);

const state = {
  view: "triage",
  order: "newest",
  offset: 0,
  total: 0,
  items: [],          // the page shown: [{name, ...}]
  focus: 0,           // index into items
  selected: new Set(),
  anchor: null,       // last clicked index, for shift-click ranges
  single: false,      // the single-image view is open
  shown: null,        // the name of the image it shows
  signature: null,
};

// --- talking to the server ------------------------------------------------------------------

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function post(verb, names) {
  const response = await fetch(`/api/${verb}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify({ names: names || [] }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function errorText(response) {
  const text = await response.text();
  try { return JSON.parse(text).error || text; } catch { return text; }
}

function say(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 2500);
}

const url = (kind, pile, name) => `/${kind}/${pile}/${encodeURIComponent(name)}`;

// --- triage ---------------------------------------------------------------------------------

function filters() {
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE, order: state.order, facets: "1" });
  const character = $("filter-character").value, style = $("filter-style").value, text = $("filter-text").value.trim();
  if (character) params.set("character", character);
  if (style) params.set("style", style);
  if (text) params.set("q", text);
  return params;
}

async function loadTriage(keepName) {
  const data = await getJSON(`/api/pile/stage1?${filters()}`);
  if (data.items.length === 0 && state.offset > 0 && data.total > 0) {
    state.offset = Math.max(0, Math.floor((data.total - 1) / PAGE) * PAGE);
    return loadTriage(keepName);
  }
  state.total = data.total;
  state.items = data.items;
  fillSelect("filter-character", data.loras.character);
  fillSelect("filter-style", data.loras.style);
  const kept = keepName ? state.items.findIndex((item) => item.name === keepName) : -1;
  state.focus = kept >= 0 ? kept : Math.min(state.focus, Math.max(0, state.items.length - 1));
  const names = new Set(state.items.map((item) => item.name));
  state.selected = new Set([...state.selected].filter((name) => names.has(name)));
  renderGrid();
  if (state.single) showSingle();
}

function fillSelect(id, names) {
  const select = $(id), current = select.value;
  const wanted = ["", ...names];
  if ([...select.options].map((o) => o.value).join("\n") === wanted.join("\n")) return;
  select.replaceChildren(...wanted.map((name) => new Option(name || "any", name)));
  select.value = wanted.includes(current) ? current : "";
}

function renderGrid() {
  const grid = $("grid");
  const tiles = state.items.map((item, index) => {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.name = item.name;
    tile.dataset.index = index;
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = item.name;
    image.src = url("thumb", "stage1", item.name);
    const caption = document.createElement("figcaption");
    caption.textContent = item.name;
    tile.append(image, caption);
    return tile;
  });
  grid.replaceChildren(...tiles);
  $("empty").hidden = state.items.length > 0;
  const last = Math.min(state.offset + state.items.length, state.total);
  $("page-info").textContent = state.total ? `${state.offset + 1}–${last} of ${state.total}` : "0 of 0";
  $("prev-page").disabled = state.offset === 0;
  $("next-page").disabled = last >= state.total;
  $("order").textContent = state.order === "newest" ? "Newest first" : "Oldest first";
  markTiles();
}

function markTiles() {
  for (const tile of $("grid").children) {
    const index = Number(tile.dataset.index);
    tile.classList.toggle("focused", index === state.focus);
    tile.classList.toggle("selected", state.selected.has(tile.dataset.name));
  }
  const focused = $("grid").children[state.focus];
  if (focused && !state.single) focused.scrollIntoView({ block: "nearest" });
}

function columns() {
  const tiles = $("grid").children;
  if (tiles.length < 2) return 1;
  const top = tiles[0].offsetTop;
  let n = 0;
  while (n < tiles.length && tiles[n].offsetTop === top) n++;
  return Math.max(1, n);
}

async function move(delta) {
  const target = state.focus + delta;
  if (target < 0 && state.offset > 0) {
    state.offset = Math.max(0, state.offset - PAGE);
    state.focus = PAGE - 1;
    return loadTriage();
  }
  if (target >= state.items.length && state.offset + state.items.length < state.total) {
    state.offset += PAGE;
    state.focus = 0;
    return loadTriage();
  }
  state.focus = Math.max(0, Math.min(state.items.length - 1, target));
  markTiles();
  if (state.single) showSingle();
}

function chosenNames() {
  if (state.selected.size) return [...state.selected];
  const item = state.items[state.focus];
  return item ? [item.name] : [];
}

async function act(verb) {
  const names = chosenNames();
  if (!names.length) return;
  try {
    const result = await post(verb, names);
    const label = { approve: "approved", reject: "rejected" }[verb];
    say(`${label}: ${result.names.join(", ")} (U to undo)`);
    state.selected.clear();
    await loadTriage();
  } catch (error) {
    say(error.message, true);
    await loadTriage();
  }
}

async function undo() {
  try {
    const result = await post("undo");
    say(`undone: ${result.verb} of ${result.names.join(", ")}`);
    await refresh(result.names[0]);
  } catch (error) {
    say(error.message, true);
  }
}

async function showSingle() {
  const item = state.items[state.focus];
  if (!item) { closeSingle(); return; }
  // Every poll calls this: the same image keeps its panel, and the text the user selected in it.
  if (state.single && state.shown === item.name) return;
  state.shown = item.name;
  state.single = true;
  $("single").hidden = false;
  $("single-image").src = url("image", "stage1", item.name);
  const panel = $("record");
  panel.replaceChildren(field("file", item.name));
  try {
    const { record } = await getJSON(url("api/record", "stage1", item.name));
    // By name: a poll that redrew the grid meanwhile made new items for the same images, and the
    // panel would then stay empty (every later poll keeps the panel of the image shown).
    if (state.shown !== item.name) return;
    if (!record) { panel.append(field("record", "none found")); return; }
    const loras = record.loras.map((u) => `${u.kind} ${u.name} @ ${u.strength}${u.via === "tag" ? " (tag)" : ""}`).join("\n") || "none";
    panel.append(field("prompt", record.prompt), field("negative", record.negative), field("LoRAs", loras),
      field("seed", record.seed), field("sampler", `${record.sampler}, ${record.steps} steps, CFG ${record.cfg}`),
      field("size", record.size));
  } catch (error) {
    panel.append(field("record", error.message));
  }
}

function field(title, value) {
  const part = document.createElement("div");
  const heading = document.createElement("h3");
  heading.textContent = title;
  const text = document.createElement("p");
  text.textContent = String(value);
  text.className = "field-" + title.toLowerCase();
  part.append(heading, text);
  return part;
}

function closeSingle() {
  state.single = false;
  state.shown = null;
  $("single").hidden = true;
  $("single").querySelector(".stage").classList.remove("zoom");
  markTiles();
}

$("grid").addEventListener("click", (event) => {
  const tile = event.target.closest(".tile");
  if (!tile) return;
  const index = Number(tile.dataset.index);
  const name = tile.dataset.name;
  if (event.shiftKey && state.anchor !== null) {
    const [low, high] = [Math.min(state.anchor, index), Math.max(state.anchor, index)];
    for (let i = low; i <= high; i++) state.selected.add(state.items[i].name);
  } else if (event.ctrlKey || event.metaKey) {
    if (state.selected.has(name)) state.selected.delete(name); else state.selected.add(name);
    state.anchor = index;
  } else {
    state.selected.clear();
    state.anchor = index;
  }
  state.focus = index;
  markTiles();
});
$("grid").addEventListener("dblclick", (event) => { if (event.target.closest(".tile")) showSingle(); });
$("single").addEventListener("click", (event) => { if (event.target.id !== "single-image") closeSingle(); });
$("order").addEventListener("click", () => { state.order = state.order === "newest" ? "oldest" : "newest"; state.offset = 0; state.focus = 0; loadTriage(); });
$("prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); state.focus = 0; loadTriage(); });
$("next-page").addEventListener("click", () => { state.offset += PAGE; state.focus = 0; loadTriage(); });
for (const id of ["filter-character", "filter-style"]) $(id).addEventListener("change", () => { state.offset = 0; state.focus = 0; loadTriage(); });
$("filter-text").addEventListener("input", () => { clearTimeout(state.typing); state.typing = setTimeout(() => { state.offset = 0; state.focus = 0; loadTriage(); }, 300); });

// --- queue ------------------------------------------------------------------------------------

async function loadQueue() {
  const [approved, processing, done, failed, status] = await Promise.all(
    ["approved", "processing", "done", "failed"].map((pile) => getJSON(`/api/pile/${pile}?limit=200`)).concat(getJSON("/api/status")));
  fillList("approved", approved, (item) => item.name);
  const jobs = status.daemons.filter((d) => d.current && d.current.file).map((d) => d.current);
  fillList("processing", processing, (item) => {
    const job = jobs.find((current) => current.file === item.shown);
    return job ? `${item.shown} — ${job.phase || ""} ${job.step ? `step ${job.step}/${job.total}` : ""}` : item.shown;
  });
  fillList("done", done, (item) => item.name);
  fillList("failed", failed, (item, li) => {
    const pre = document.createElement("pre");
    pre.className = "error-text";
    pre.textContent = item.error || "(no error report)";
    const retry = document.createElement("button");
    retry.textContent = "Retry";
    retry.addEventListener("click", async () => {
      try { await post("retry", [item.name]); say(`${item.name} is back in inbox/approved/ (U to undo)`); } catch (error) { say(error.message, true); }
      refresh();
    });
    li.append(pre, retry);
    return item.name;
  });
}

function fillList(pile, data, label) {
  $(`n-${pile}`).textContent = data.total;
  $(`list-${pile}`).replaceChildren(...data.items.map((item) => {
    const li = document.createElement("li");
    li.dataset.name = item.name;
    const text = label(item, li);
    li.prepend(document.createTextNode(text));
    return li;
  }));
}

// --- finals -----------------------------------------------------------------------------------

async function loadFinals() {
  const data = await getJSON("/api/pile/final?limit=200");
  const grid = $("final-grid");
  grid.replaceChildren(...data.items.map((item) => {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.name = item.name;
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = item.name;
    image.src = url("thumb", "final", item.name);
    const caption = document.createElement("figcaption");
    caption.textContent = item.before ? item.name : `${item.name} (stage-1 image not found)`;
    tile.append(image, caption);
    tile.addEventListener("click", () => openCompare(item));
    return tile;
  }));
  $("finals-empty").hidden = data.items.length > 0;
}

function openCompare(item) {
  $("compare").hidden = false;
  $("compare-name").textContent = item.name;
  const after = $("compare-after"), before = $("compare-before");
  after.src = url("image", "final", item.name);
  before.src = item.before ? url("image", item.before[0], item.before[1]) : "";
  after.onload = () => { before.style.width = `${after.clientWidth}px`; before.style.height = `${after.clientHeight}px`; };
  clip();
}

function clip() {
  const value = Number($("compare-slider").value);
  $("compare-before-clip").style.clipPath = `inset(0 ${100 - value}% 0 0)`;
}
$("compare-slider").addEventListener("input", clip);
$("compare-close").addEventListener("click", () => { $("compare").hidden = true; });

// --- taste ------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const ROW = 22, LABEL = 260, BAR = 360, NUMBERS = 200;

function svg(tag, attributes, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

const percent = (value) => (value === null ? "–" : `${Math.round(value * 100)}%`);

function tasteChart(group) {
  const chart = svg("svg", { width: LABEL + BAR + NUMBERS, height: ROW * group.arms.length + 6, role: "img",
                             "aria-label": `approval rate per ${group.title}` });
  chart.append(svg("line", { class: "axis", x1: LABEL, x2: LABEL, y1: 0, y2: ROW * group.arms.length }));
  group.arms.forEach((arm, row) => {
    const y = row * ROW, judged = arm.approved + arm.rejected;
    const name = arm.arm.length > 38 ? `${arm.arm.slice(0, 37)}…` : arm.arm;
    const label = svg("text", { class: "label", x: LABEL - 8, y: y + 15, "text-anchor": "end" }, name);
    label.append(svg("title", {}, arm.arm));
    chart.append(label);
    if (judged) {
      chart.append(svg("rect", { class: "bar", x: LABEL, y: y + 4, height: ROW - 8, width: Math.max(1, arm.rate * BAR) }));
      chart.append(svg("line", { class: "interval", x1: LABEL + arm.low * BAR, x2: LABEL + arm.high * BAR, y1: y + ROW / 2, y2: y + ROW / 2 }));
    } else {
      chart.append(svg("rect", { class: "untried", x: LABEL, y: y + 9, height: 4, width: BAR }));
    }
    const numbers = judged ? `${percent(arm.rate)} · ${arm.approved} of ${judged}` : "nothing judged yet";
    chart.append(svg("text", { class: "numbers", x: LABEL + BAR + 8, y: y + 15 },
                     arm.waiting ? `${numbers} · ${arm.waiting} waiting` : numbers));
  });
  return chart;
}

async function loadTaste() {
  const by = $("taste-by").value;
  const data = await getJSON(`/api/taste${by ? `?by=${by}` : ""}`);
  const totals = data.totals, judged = totals.approved + totals.rejected;
  $("taste-summary").textContent = `${totals.approved} approved, ${totals.rejected} rejected, ${totals.waiting} waiting` +
    (judged ? ` · approval rate ${percent(totals.rate)}` : "") + (data.since ? ` · since ${data.since}` : "") +
    ` · learning: ${data.learning || "off"}`;
  $("taste-tables").replaceChildren(...data.groups.map((group) => {
    const section = document.createElement("div");
    section.className = "taste-group";
    section.dataset.group = group.group;
    section.append(Object.assign(document.createElement("h2"), { textContent: group.title }), tasteChart(group));
    return section;
  }));
}
$("taste-by").addEventListener("change", () => refresh());

// --- views, keys, polling ---------------------------------------------------------------------

async function refresh(keepName) {
  try {
    if (state.view === "triage") await loadTriage(keepName || (state.items[state.focus] || {}).name);
    else if (state.view === "queue") await loadQueue();
    else if (state.view === "taste") await loadTaste();
    else await loadFinals();
  } catch (error) {
    say(error.message, true);
  }
}

function show(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== view;
  refresh();
}
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
$("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
$("help").addEventListener("click", () => { $("help").hidden = true; });

document.addEventListener("keydown", (event) => {
  if (event.target.matches("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "?") { $("help").hidden = !$("help").hidden; return; }
  if (key === "Escape") { $("help").hidden = true; $("compare").hidden = true; if (state.single) closeSingle(); return; }
  if (key === "u" || key === "U") { event.preventDefault(); undo(); return; }
  if (state.view !== "triage") return;
  const handled = {
    a: () => act("approve"), A: () => act("approve"),
    x: () => act("reject"), X: () => act("reject"),
    ArrowLeft: () => move(-1), ArrowRight: () => move(1),
    ArrowUp: () => move(state.single ? -1 : -columns()), ArrowDown: () => move(state.single ? 1 : columns()),
    Enter: () => (state.single ? closeSingle() : showSingle()),
    z: () => state.single && $("single").querySelector(".stage").classList.toggle("zoom"),
    Z: () => state.single && $("single").querySelector(".stage").classList.toggle("zoom"),
  }[key];
  if (handled) { event.preventDefault(); handled(); }
});

async function poll() {
  try {
    const status = await getJSON("/api/status");
    const lines = status.daemons.length ? status.daemons : [{ line: "no daemon running on this root" }];
    if (status.summary) lines.unshift({ line: status.summary });
    $("daemons").replaceChildren(...lines.map((d) => {
      const li = document.createElement("li");
      li.textContent = d.pid ? `pid ${d.pid} on ${d.host}: ${d.line}` : d.line;
      return li;
    }));
    $("count-stage1").textContent = status.counts.stage1;
    $("count-queue").textContent = status.counts.approved + status.counts.processing;
    $("count-final").textContent = status.counts.final;
    if (state.signature !== null && status.signature !== state.signature) await refresh();
    state.signature = status.signature;
  } catch (error) {
    $("daemons").replaceChildren(Object.assign(document.createElement("li"), { textContent: `review server unreachable: ${error.message}` }));
  }
  setTimeout(poll, POLL_MS);
}

show("triage");
poll();
