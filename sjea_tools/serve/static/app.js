// The page of `sjea serve`: plain JS on the JSON API (docs/serve.md); no build step, no CDN.
// Text from the server (file names) goes in through textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, last: null, node: null, memberOffset: 0, names: null, browseOffset: 0, dups: null };
const BROWSE_PAGE = 60;
const DUP_PAGE = 50; // groups drawn at a time: a large store can have thousands

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function thumb(id, size = 128) {
  const img = el("img");
  img.src = `/api/items/${id}/thumbnail?size=${size}`;
  img.alt = `item ${id}`;
  img.loading = "lazy";
  return img;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function showNotes(notes) {
  const box = $("notes");
  box.textContent = (notes || []).map((n) => "note: " + n).join("\n");
  box.hidden = !(notes && notes.length);
}

// One place that calls the API: JSON or one error message, whatever went wrong.
async function api(url, options) {
  let resp;
  try {
    resp = await fetch(url, options);
  } catch (e) {
    throw new Error("the server cannot be reached (is `sjea serve` still running?)");
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
  return body;
}

function options() {
  const p = new URLSearchParams();
  p.set("k", $("k").value || "10");
  const mode = $("mode").value;
  const levels = state.info ? state.info.levels.length : 2;
  if (levels > 1 || mode === "per-level") p.set("mode", levels > 1 ? mode : "per-level");
  if ($("level").value.trim() && mode === "per-level") p.set("level", $("level").value.trim());
  if ($("order").value.trim() && mode !== "per-level") p.set("order", $("order").value.trim());
  if (mode !== "per-level") {
    p.set("probes", $("probes").value || "1");
    p.set("within", $("within").value);
    if (Number($("margin").value) > 0) p.set("margin", $("margin").value);
  }
  if ($("min-score").value.trim()) p.set("min_score", $("min-score").value.trim());
  return p;
}

async function searchFile(file) {
  if (!file) return;
  state.last = { file };
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  for (const [key, value] of options()) form.append(key, value);
  await run(() => api("/api/search/image", { method: "POST", body: form }), URL.createObjectURL(file));
}

async function searchId(id, push = true) {
  state.last = { id };
  if (push) history.pushState({ id }, "", `/?id=${id}`);
  showView("search");
  await run(() => api(`/api/search?id=${encodeURIComponent(id)}&${options()}`), `/api/items/${id}/thumbnail?size=256`);
}

async function run(call, queryImage) {
  showError("");
  $("results").setAttribute("aria-busy", "true");
  try {
    const res = await call();
    render(res, queryImage);
  } catch (e) {
    showError(e.message);
  } finally {
    $("results").removeAttribute("aria-busy");
  }
}

function render(res, queryImage) {
  showNotes(res.notes);
  const r = res.results[0];
  $("query").hidden = false;
  $("query-thumb").src = queryImage;
  $("query-label").textContent = queryName(r, res.root);
  $("query-original").hidden = r.query_id === null || r.query_id === undefined;
  $("query-original").onclick = () => openViewer(r.query_id);
  const treeLevels = res.order || (state.info && state.info.tree_levels) || res.levels;
  $("query-cluster").textContent = r.cluster_path
    ? "cluster path " + r.cluster_path.map((c, i) => `L${treeLevels[i] ?? i}:${c}`).join(" › ") : "";
  const box = $("results");
  box.replaceChildren();
  for (const [lv, hits] of Object.entries(r.per_level || {})) {
    box.append(column(`Level ${lv}`, "", hits, r.query_id, false, res.levels));
  }
  if (r.hierarchical) {
    const gate = r.gate ? `, gate: cluster ${r.gate.clusters.join("+")} (${r.gate.rows} rows)` : "";
    box.append(column("Hierarchical", `${(res.order || []).join(" → ")}${gate}, by ${res.within}`, r.hierarchical,
                      r.query_id, true, res.levels, treeLevels));
  }
  box.dataset.query = r.query;
}

// A stored query is shown by its file (relative to the store's image root), with its id.
function queryName(r, root) {
  if (r.query_id === null || r.query_id === undefined || !r.query_file) return r.query;
  const prefix = root ? root.replace(/\/+$/, "") + "/" : "";
  const rel = prefix && r.query_file.startsWith(prefix) ? r.query_file.slice(prefix.length) : r.query_file;
  return `${rel}  (id:${r.query_id})`;
}

function column(title, sub, hits, queryId, hierarchical, levels, treeLevels) {
  const col = el("div", "column");
  col.dataset.kind = hierarchical ? "hierarchical" : title;
  const h = el("h2", "", title + " ");
  if (sub) h.append(el("span", "sub", sub));
  col.append(h);
  if (!hits.length) col.append(el("div", "muted", "no hits (min score?)"));
  for (const hit of hits) col.append(hitRow(hit, queryId, hierarchical, levels, treeLevels));
  return col;
}

function hitRow(hit, queryId, hierarchical, levels, treeLevels) {
  const row = el("div", "hit" + (queryId === hit.id ? " same" : ""));
  row.dataset.id = hit.id;
  row.dataset.path = hit.path;
  row.dataset.rank = hit.rank;
  row.title = `search from item ${hit.id}`;
  row.append(el("span", "rank", String(hit.rank)), thumb(hit.id));
  const meta = el("div", "meta");
  meta.append(el("div", "score", hit.score.toFixed(4)), el("div", "path", hit.path));
  if (hierarchical && hit.scores) {
    meta.append(el("div", "scores", levels.map((lv) => `L${lv} ${hit.scores[lv].toFixed(3)}`).join("  ")));
  }
  if (hit.group) {
    meta.append(el("div", "scores", "cluster " + hit.group.map((c, i) => `L${treeLevels[i] ?? i}:${c}`).join(" › ")));
  }
  const full = el("button", "link", "full size");
  full.type = "button";
  full.title = "the original photo, full size";
  full.addEventListener("click", (e) => { e.stopPropagation(); openViewer(hit.id, hit.path); });
  meta.append(full);
  row.append(meta);
  row.addEventListener("click", () => searchId(hit.id));
  return row;
}

// --- cluster tree ---------------------------------------------------------------------------------

// "cat (12 of 14)": the folder most of the cluster's rows come from.
function clusterName(depth, id) {
  const n = state.names && state.names.depths[depth] && state.names.depths[depth][id];
  return n ? `${n.name} (${n.count} of ${n.size})` : `cluster ${id}`;
}

async function openClusters() {
  showView("clusters");
  showError("");
  try {
    if (!state.names) state.names = await api("/api/clusters/names");
    const tree = await api("/api/clusters");
    state.node = null;
    $("crumbs").replaceChildren(el("span", "", `Level-${tree.levels[0]} clusters (${tree.clusters.length})`));
    renderClusters(tree.clusters);
    $("members").replaceChildren();
    $("members-title").hidden = true;
    $("more-members").hidden = true;
  } catch (e) {
    showError(e.message);
  }
}

function renderClusters(nodes) {
  const box = $("clusters");
  box.replaceChildren();
  for (const n of nodes) {
    const card = el("div", "cluster");
    card.dataset.depth = n.depth;
    card.dataset.node = n.id;
    const thumbs = el("div", "thumbs");
    for (const id of n.examples.slice(0, 3)) thumbs.append(thumb(id, 64));
    card.dataset.name = clusterName(n.depth, n.id);
    card.append(thumbs, el("div", "title", card.dataset.name),
                el("div", "muted", `L${n.level} cluster ${n.id}` + (n.children ? `, ${n.children} sub-clusters` : "")),
                el("div", "muted", `${n.size} items`));
    card.addEventListener("click", () => openNode(n.depth, n.id));
    box.append(card);
  }
}

async function openNode(depth, node) {
  showError("");
  try {
    const n = await api(`/api/clusters/${depth}/${node}?limit=60`);
    state.node = n;
    state.memberOffset = n.members.length;
    const crumbs = $("crumbs");
    const top = el("a", "", "all clusters");
    top.addEventListener("click", openClusters);
    crumbs.replaceChildren(top);
    n.path.forEach((id, d) => {
      crumbs.append(" › ");
      const lv = state.info && state.info.tree_levels ? state.info.tree_levels[d] : d;
      const a = el("a", "", `L${lv} ${clusterName(d, id)}`);
      a.addEventListener("click", () => openNode(d, id));
      crumbs.append(a);
    });
    renderClusters(n.sub_clusters);
    $("members-title").hidden = false;
    $("members-title").textContent = `Members (${n.total})`;
    $("members").replaceChildren();
    addMembers(n.members);
    $("more-members").hidden = state.memberOffset >= n.total;
  } catch (e) {
    showError(e.message);
  }
}

function addMembers(ids) {
  for (const id of ids) {
    const m = el("div", "member");
    m.dataset.id = id;
    m.title = `search from item ${id}`;
    m.append(thumb(id, 64));
    m.addEventListener("click", () => searchId(id));
    $("members").append(m);
  }
}

async function moreMembers() {
  const n = state.node;
  try {
    const page = await api(`/api/clusters/${n.depth}/${n.id}?offset=${state.memberOffset}&limit=60`);
    addMembers(page.members);
    state.memberOffset += page.members.length;
    $("more-members").hidden = state.memberOffset >= page.total;
  } catch (e) {
    showError(e.message);
  }
}

// --- full-size view and browsing every row ----------------------------------------------------------

async function openViewer(id, name) {
  const dialog = $("viewer");
  const url = `/api/items/${id}/original`;
  dialog.dataset.id = id;
  $("viewer-size").textContent = "";
  $("viewer-img").onload = (e) => { $("viewer-size").textContent = `${e.target.naturalWidth} × ${e.target.naturalHeight} px`; };
  $("viewer-img").src = url;
  $("viewer-link").href = url;
  $("viewer-name").textContent = name || `item ${id}`;
  if (!dialog.open) dialog.showModal();
  if (!name) {
    try {
      $("viewer-name").textContent = (await api(`/api/items/${id}`)).path;
    } catch (e) { /* the id is already shown */ }
  }
}

async function openBrowse(offset = state.browseOffset) {
  showView("browse");
  showError("");
  try {
    const page = await api(`/api/items?offset=${offset}&limit=${BROWSE_PAGE}`);
    state.browseOffset = page.offset;
    const box = $("browse");
    box.replaceChildren();
    for (const item of page.items) {
      const tile = el("div", "member tile");
      tile.dataset.id = item.id;
      tile.dataset.path = item.path;
      tile.title = `${item.path}: click for full size`;
      tile.append(thumb(item.id, 128), el("div", "name", item.path));
      tile.addEventListener("click", () => openViewer(item.id, item.path));
      box.append(tile);
    }
    const last = page.offset + page.items.length;
    $("browse-range").textContent = `${page.offset + 1}–${last} of ${page.total.toLocaleString()}`;
    $("browse-prev").disabled = page.offset === 0;
    $("browse-next").disabled = last >= page.total;
  } catch (e) {
    showError(e.message);
  }
}

// --- near-duplicate groups (read-only: the page never deletes a file) ------------------------------

function dupParams() {
  const p = new URLSearchParams();
  p.set("level", $("dup-level").value.trim() || "0");
  if ($("dup-threshold").value.trim()) p.set("threshold", $("dup-threshold").value.trim());
  return p;
}

async function openDuplicates() {
  showView("duplicates");
  showError("");
  const params = dupParams();
  $("dup-groups").replaceChildren();
  $("dup-more").hidden = true;
  $("dup-csv").hidden = true;
  $("dup-summary").textContent = "comparing every pair of rows… (about a minute for 50,000 rows)";
  $("dup-groups").setAttribute("aria-busy", "true");
  try {
    const res = await api(`/api/duplicates?${params}`);
    state.dups = { res, shown: 0 };
    $("dup-rule").textContent = res.keep_rule;
    const pixels = res.pixel_threshold === null ? "" : `, pixels confirmed at ${res.pixel_threshold}`;
    const where = `at threshold ${res.threshold} (cosine, level ${res.level}${pixels})`;
    $("dup-summary").textContent = res.groups.length
      ? `${res.groups.length.toLocaleString()} group(s) ${where}: ${res.to_remove.toLocaleString()} file(s) to ` +
        `review among ${res.rows.toLocaleString()} rows.`
      : `No duplicates ${where} among ${res.rows.toLocaleString()} rows; a lower threshold finds looser copies.`;
    params.set("format", "csv");
    $("dup-csv").href = `/api/duplicates?${params}`;
    $("dup-csv").hidden = !res.groups.length;
    moreGroups();
  } catch (e) {
    $("dup-summary").textContent = "";
    showError(e.message);
  } finally {
    $("dup-groups").removeAttribute("aria-busy");
  }
}

function moreGroups() {
  const { res, shown } = state.dups;
  for (const g of res.groups.slice(shown, shown + DUP_PAGE)) $("dup-groups").append(dupGroup(g));
  state.dups.shown = Math.min(res.groups.length, shown + DUP_PAGE);
  $("dup-more").hidden = state.dups.shown >= res.groups.length;
}

function dupGroup(g) {
  const row = el("div", "dup-group");
  row.dataset.group = g.group;
  row.append(el("div", "dup-title", `group ${g.group}: ${g.size} files`));
  const tiles = el("div", "members");
  for (const m of g.members) {
    const keep = m.action === "keep";
    const tile = el("div", "member tile " + (keep ? "keep" : "remove"));
    tile.dataset.id = m.id;
    tile.dataset.path = m.path;
    tile.dataset.action = m.action;
    tile.title = `${m.path}: click for full size`;
    tile.append(thumb(m.id, 128), el("div", "name", m.path),
                el("div", "action", keep ? "keep" : `remove? (cosine ${m.score})`));
    tile.addEventListener("click", () => openViewer(m.id, m.path));
    tiles.append(tile);
  }
  row.append(tiles);
  return row;
}

function showView(name) {
  for (const v of ["search", "clusters", "browse", "duplicates"]) {
    $(`${v}-view`).hidden = name !== v;
    $(`tab-${v}`).classList.toggle("active", name === v);
  }
}

// Options that do not apply to the chosen mode are greyed out (their help says which mode they belong to).
function syncMode() {
  const mode = $("mode").value;
  for (const label of document.querySelectorAll(".options .hier")) {
    label.classList.toggle("off", mode === "per-level");
  }
  for (const label of document.querySelectorAll(".options .per-level")) {
    label.classList.toggle("off", mode !== "per-level");
  }
}

// --- wiring ---------------------------------------------------------------------------------------

async function start() {
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  $("search-id").addEventListener("click", () => $("query-id").value !== "" && searchId($("query-id").value));
  $("again").addEventListener("click", () => state.last &&
    (state.last.file ? searchFile(state.last.file) : searchId(state.last.id, false)));
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-clusters").addEventListener("click", openClusters);
  $("more-members").addEventListener("click", moreMembers);
  $("tab-browse").addEventListener("click", () => openBrowse());
  $("browse-prev").addEventListener("click", () => openBrowse(Math.max(0, state.browseOffset - BROWSE_PAGE)));
  $("browse-next").addEventListener("click", () => openBrowse(state.browseOffset + BROWSE_PAGE));
  $("tab-duplicates").addEventListener("click", openDuplicates);
  $("dup-find").addEventListener("click", openDuplicates);
  $("dup-more").addEventListener("click", moreGroups);
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) $("viewer").close(); });
  $("viewer-search").addEventListener("click", () => { $("viewer").close(); searchId($("viewer").dataset.id); });
  $("mode").addEventListener("change", syncMode);
  window.addEventListener("popstate", () => {
    const id = new URLSearchParams(location.search).get("id");
    if (id !== null) searchId(id, false);
  });
  try {
    const info = await api("/api/info");
    state.info = info;
    $("store-info").textContent = `${info.store.split("/").pop()}: ${info.n.toLocaleString()} rows, levels ` +
      `${info.levels.join(", ")}, ${Object.values(info.index_kinds).join("/")} index` +
      (info.image_search ? "" : " (image search unavailable: " + info.image_search_error + ")");
    // The same default as `sjea search` (the server says which).
    $("mode").value = info.levels.length < 2 ? "per-level" : (info.default_mode || "per-level");
    syncMode();
    $("tab-clusters").disabled = !info.cluster_tree;
    if (!info.cluster_tree) $("tab-clusters").title = info.cluster_note || "no cluster tree";
  } catch (e) {
    showError(e.message);
  }
  const id = new URLSearchParams(location.search).get("id");
  if (id !== null) searchId(id, false);
}

start();
