/* glomscan review page: the slide (Deep Zoom tiles) with its glomeruli, corrections and their
 * export as QuPath-compatible GeoJSON. Data: the page's <script id="glomscan-data">. Loads
 * nothing but image tiles (works from file://). Outline coordinates are level-0 pixels of the
 * input slide; the pyramid is at the analysis resolution (level 0 / data.downsample).
 * Candidates the verifier rejected (rejected_by "verifier") start rejected and uncounted; left
 * so they are no reviewer's change, restored they count in their class ("restored"). */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("glomscan-data").textContent);
  var ds = data.downsample || 1;
  var SVGNS = "http://www.w3.org/2000/svg";
  var STORE = "glomscan-review:" + data.path + ":" + data.model_sha256;

  // -- %GS and its 95 % Wilson interval: the same arithmetic as glomscan.report.wilson_interval
  // and glomscan.pipeline.sclerosis_summary (Python's round() to 2 decimals, ties to even).
  function wilson(k, n, z) {
    if (n <= 0) { return null; }
    var p = k / n;
    var denom = 1 + z * z / n;
    var centre = (p + z * z / (2 * n)) / denom;
    var half = z / denom * Math.sqrt(p * (1 - p) / n + z * z / (4 * n * n));
    return [Math.max(0.0, centre - half), Math.min(1.0, centre + half)];
  }
  function round2(x) {
    var exact = x.toFixed(20);  // the double's exact decimal digits (it is a tie only if they end in 5000...)
    if (/\.\d\d50*$/.test(exact)) {
      var down = Math.floor(x * 100), up = down + 1;
      return (down % 2 === 0 ? down : up) / 100;
    }
    return Number(x.toFixed(2));
  }
  function sclerosisSummary(nNormal, nSclerosed) {
    var n = nNormal + nSclerosed;
    if (n === 0) { return {percent: null, low: null, high: null}; }
    var ci = wilson(nSclerosed, n, data.z);
    return {percent: round2(100.0 * nSclerosed / n), low: round2(100.0 * ci[0]), high: round2(100.0 * ci[1])};
  }
  window.glomscanSclerosisSummary = sclerosisSummary;  // for tests: the page's own formula

  // -- state -------------------------------------------------------------------------------
  var items = data.glomeruli.map(function (g) {
    var byVerifier = g.rejected_by === "verifier";  // a candidate the verifier rejected: analysed = its candidate class
    return {key: "g" + g.id, kind: "detected", id: g.id, analysed: g["class"], cls: g["class"], rejected: byVerifier,
            verifier: byVerifier, ring: g.ring, m: g.measurements, featureId: g.feature_id};
  });
  var addedCount = 0;
  var selected = null;
  var tool = "select";
  var newClass = "normal";
  var draft = [];  // outline being drawn (level-0 points)

  function byKey(key) { for (var i = 0; i < items.length; i++) { if (items[i].key === key) { return items[i]; } } return null; }
  function counted(it) { return !it.rejected; }
  function counts() {
    var c = {normal: 0, sclerosed: 0, changed: 0, rejected: 0, added: 0, restored: 0, byVerifier: 0};
    items.forEach(function (it) {
      var r = review(it);
      if (r === "added") { c.added += 1; } else if (r === "false detection") { c.rejected += 1; }
      else if (r === "class changed") { c.changed += 1; } else if (r === "restored") { c.restored += 1; }
      else if (r === "rejected by verifier") { c.byVerifier += 1; }
      if (counted(it)) { c[it.cls] += 1; }
    });
    return c;
  }
  // what the reviewer did to an item; "unchanged" and "rejected by verifier" (a candidate the
  // verifier rejected, left so) are the analysis' own and no change (not stored, not in the changes line)
  function review(it) {
    if (it.kind === "added") { return "added"; }
    if (it.verifier) { return it.rejected ? "rejected by verifier" : "restored"; }
    if (it.rejected) { return "false detection"; }
    return it.cls !== it.analysed ? "class changed" : "unchanged";
  }
  function isChange(it) { var r = review(it); return r !== "unchanged" && r !== "rejected by verifier"; }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(items.filter(isChange)
        .map(function (it) { return {key: it.key, kind: it.kind, cls: it.cls, rejected: it.rejected, ring: it.kind === "added" ? it.ring : undefined, point: it.point}; })));
    } catch (e) { /* storage unavailable: corrections live until the page is closed */ }
  }
  function restore() {
    var saved;
    try { saved = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (e) { saved = []; }
    saved.forEach(function (s) {
      if (s.kind === "added") {
        addedCount += 1;
        items.push({key: "a" + addedCount, kind: "added", id: "new " + addedCount, cls: s.cls, rejected: false, ring: s.ring || null, point: s.point || null, m: {}});
      } else {
        var it = byKey(s.key);
        if (it) { it.cls = s.cls; it.rejected = s.rejected; }
      }
    });
    return saved.length;
  }

  // -- panel -------------------------------------------------------------------------------
  var panel = document.getElementById("panel");
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function rgb(c) { return "rgb(" + c.join(",") + ")"; }
  function fmt(v, digits) { return v === null || v === undefined ? "–" : (digits === undefined ? String(v) : Number(v).toFixed(digits)); }
  function pct(s) { return s.percent === null ? "–" : s.percent + " %"; }
  function ci(s) { return s.low === null ? "–" : s.low + "–" + s.high + " %"; }

  panel.appendChild(el("h1", {}, data.slide));
  panel.appendChild(el("div", {"class": "meta"}, "model " + data.model_id + "; analysed at " +
    (data.analysis_mpp ? data.analysis_mpp + " µm/px" : "level 0 / " + ds) + ". Research tool, not a medical device."));
  panel.appendChild(el("h2", {}, "Counts"));
  var countTable = el("table", {"class": "counts", id: "counts"});
  panel.appendChild(countTable);
  var changes = el("div", {"class": "meta", id: "changes"});
  panel.appendChild(changes);

  panel.appendChild(el("h2", {}, "Review"));
  var tools = el("div", {id: "tools"});
  [["select", "Select"], ["point", "Add point"], ["outline", "Draw outline"]].forEach(function (t) {
    var b = el("button", {type: "button", "data-tool": t[0]}, t[1]);
    b.addEventListener("click", function () { setTool(t[0]); });
    tools.appendChild(b);
  });
  var classSelect = el("select", {id: "new-class", "aria-label": "class of added glomeruli"});
  ["normal", "sclerosed"].forEach(function (c) { classSelect.appendChild(el("option", {value: c}, "new: " + c)); });
  classSelect.addEventListener("change", function () { newClass = classSelect.value; });
  tools.appendChild(classSelect);
  var finish = el("button", {type: "button", id: "finish-outline"}, "Finish outline");
  finish.addEventListener("click", finishOutline);
  tools.appendChild(finish);
  panel.appendChild(tools);
  panel.appendChild(el("div", {"class": "meta", id: "hint"}));

  var details = el("div", {id: "details"});
  panel.appendChild(details);

  panel.appendChild(el("h2", {}, "Glomeruli (sclerosed first)"));
  var nav = el("div", {});
  var prev = el("button", {type: "button", id: "prev"}, "◀ previous");
  var next = el("button", {type: "button", id: "next"}, "next ▶");
  prev.addEventListener("click", function () { step(-1); });
  next.addEventListener("click", function () { step(1); });
  nav.appendChild(prev); nav.appendChild(next);
  panel.appendChild(nav);
  var list = el("ol", {id: "list"});
  panel.appendChild(list);

  panel.appendChild(el("h2", {}, "Corrections"));
  var exportButton = el("button", {type: "button", id: "export"}, "Download corrections (GeoJSON)");
  exportButton.addEventListener("click", exportCorrections);
  panel.appendChild(exportButton);
  panel.appendChild(el("div", {"class": "meta"}, "Saves " + data.stem + ".geojson: every glomerulus with its reviewed " +
    "class, false detections (and candidates the verifier rejected, unless restored) as \"Not glomerulus\", " +
    "added ones as points or outlines (level-0 pixels). " +
    "Opens in QuPath (File > Import objects); put it in a folder for glomscan prepare --annotations " +
    "or glomscan evaluate results --truth. Keys: n/p next/previous, 1 normal, 2 sclerosed, x false " +
    "detection (on a candidate the verifier rejected: restore it / reject it again), u undo, Esc select tool."));

  function order() {  // sclerosed, normal, candidates the verifier rejected, added
    var detected = items.filter(function (it) { return it.kind === "detected"; });
    function rank(it) { return it.verifier ? 2 : (it.analysed === "sclerosed" ? 0 : 1); }
    detected.sort(function (a, b) { return rank(a) - rank(b) || a.id - b.id; });
    return detected.concat(items.filter(function (it) { return it.kind === "added"; }));
  }

  function renderCounts() {
    var c = counts();
    var before = {percent: data.analysed.percent, low: data.analysed.ci95_low, high: data.analysed.ci95_high};
    var after = sclerosisSummary(c.normal, c.sclerosed);
    countTable.innerHTML = "";
    var head = el("tr", {});
    ["", "analysed", "reviewed"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
    countTable.appendChild(head);
    var nA = (data.analysed.n_normal || 0) + (data.analysed.n_sclerosed || 0);
    [["glomeruli", nA, c.normal + c.sclerosed, "n"], ["normal", data.analysed.n_normal, c.normal, "normal"],
     ["sclerosed", data.analysed.n_sclerosed, c.sclerosed, "sclerosed"], ["sclerosed %", pct(before), pct(after), "percent"],
     ["95 % CI", ci(before), ci(after), "ci"]].forEach(function (r) {
      var tr = el("tr", {});
      tr.appendChild(el("td", {}, r[0]));
      tr.appendChild(el("td", {}, fmt(r[1])));
      var td = el("td", {id: "reviewed-" + r[3]}, fmt(r[2]));
      if (String(r[1]) !== String(r[2])) { td.className = "changed"; }
      tr.appendChild(td);
      countTable.appendChild(tr);
    });
    var nVerifier = items.filter(function (it) { return it.verifier; }).length;
    changes.textContent = c.changed + " class change(s), " + c.rejected + " false detection(s), " +
      (nVerifier ? c.restored + " restored, " : "") + c.added + " added" +
      (nVerifier ? "; " + c.byVerifier + " of " + nVerifier + " candidate(s) rejected by the verifier, not counted" : "");
    document.body.setAttribute("data-reviewed-percent", after.percent === null ? "" : String(after.percent));
    document.body.setAttribute("data-reviewed-ci", after.low === null ? "" : after.low + "," + after.high);
    document.body.setAttribute("data-reviewed-counts", c.normal + "," + c.sclerosed);
  }

  function renderList() {
    list.innerHTML = "";
    order().forEach(function (it) {
      var li = el("li", {"data-key": it.key});
      if (it === selected) { li.className = "selected"; }
      if (it.rejected) { li.className += " rejected"; }
      if (it.verifier) { li.className += " verifier"; }
      var sw = el("span", {"class": "swatch"});
      sw.style.background = rgb(data.colours[it.rejected ? "rejected" : it.cls]);
      li.appendChild(sw);
      var p = it.m.class_probability, label = (it.kind === "added" ? it.id : "#" + it.id) + " ";
      if (review(it) === "rejected by verifier") {
        label += "rejected by verifier (would be " + it.cls + ")";
      } else {
        label += (it.rejected ? "not a glomerulus" : it.cls) + (p !== undefined ? " (p " + Number(p).toFixed(2) + ")" : "") +
          (isChange(it) ? " · " + review(it) : "");
      }
      li.appendChild(el("span", {"class": "label"}, label));
      li.addEventListener("click", function () { select(it, true); });
      list.appendChild(li);
    });
  }

  function renderDetails() {
    details.innerHTML = "";
    if (!selected) { details.appendChild(el("div", {"class": "meta"}, "Nothing selected: click an outline, or step through the list with n and p.")); return; }
    var it = selected;
    details.appendChild(el("h2", {}, it.kind === "added" ? "Added glomerulus (" + it.id + ")" :
      (it.verifier ? "Candidate #" + it.id + " (rejected by the verifier)" : "Glomerulus #" + it.id)));
    var dl = el("dl", {});
    function row(k, v) { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", {}, v)); }
    if (it.kind === "detected") {
      row("analysed as", it.verifier ? "not a glomerulus (verifier); would be " + it.analysed : it.analysed);
      row("probability", fmt(it.m.class_probability, 3));
      row("p normal / sclerosed", fmt(it.m.p_normal, 3) + " / " + fmt(it.m.p_sclerosed, 3));
      if (it.m.verifier_p_not_glomerulus !== undefined || it.m.verifier_p_normal !== undefined || it.m.verifier_p_sclerosed !== undefined) {
        row("verifier: not a glomerulus p", fmt(it.m.verifier_p_not_glomerulus, 3));
        row("verifier: p normal / sclerosed", fmt(it.m.verifier_p_normal, 3) + " / " + fmt(it.m.verifier_p_sclerosed, 3));
      }
      row("area", it.m.area_um2 !== undefined ? fmt(it.m.area_um2, 0) + " µm²" : fmt(it.m.area_px) + " px");
      row("diameter", it.m.equivalent_diameter_um !== undefined ? fmt(it.m.equivalent_diameter_um, 1) + " µm" : fmt(it.m.equivalent_diameter_px, 1) + " px");
      row("centre (level 0)", fmt(it.m.centroid_x, 0) + ", " + fmt(it.m.centroid_y, 0));
    } else {
      row("marked as", it.point ? "point" : "outline");
    }
    row("reviewed", (it.rejected ? "not a glomerulus" : it.cls) + " (" + review(it) + ")");
    details.appendChild(dl);
    var actions = el("div", {id: "actions"});
    function act(label, id, fn) {
      var b = el("button", {type: "button", id: id}, label);
      b.addEventListener("click", fn);
      actions.appendChild(b);
    }
    act("normal", "set-normal", function () { setClass("normal"); });
    act("sclerosed", "set-sclerosed", function () { setClass("sclerosed"); });
    if (it.kind === "detected") {
      act(it.rejected ? "is a glomerulus" : "not a glomerulus", "reject", toggleRejected);
      act("undo", "undo", undo);
    } else {
      act("remove", "remove", removeAdded);
    }
    details.appendChild(actions);
  }

  function renderAll() { renderCounts(); renderList(); renderDetails(); draw(); }

  // -- actions -----------------------------------------------------------------------------
  function changed() { save(); renderAll(); }
  function setClass(c) { if (selected) { selected.cls = c; selected.rejected = false; changed(); } }
  function toggleRejected() { if (selected && selected.kind === "detected") { selected.rejected = !selected.rejected; changed(); } }
  function undo() { if (selected && selected.kind === "detected") { selected.cls = selected.analysed; selected.rejected = selected.verifier; changed(); } }
  function removeAdded() {
    if (selected && selected.kind === "added") { items.splice(items.indexOf(selected), 1); selected = null; changed(); }
  }
  function select(it, pan) {
    selected = it;
    renderList(); renderDetails(); draw();
    var li = list.querySelector('li[data-key="' + it.key + '"]');
    if (li && li.scrollIntoView) { li.scrollIntoView({block: "nearest"}); }
    if (pan && viewer.world.getItemCount()) {
      var b = bounds(it), pad = Math.max(b[2] - b[0], b[3] - b[1]) * 1.5 + 100 * ds;
      var r = viewer.viewport.imageToViewportRectangle((b[0] - pad) / ds, (b[1] - pad) / ds,
        (b[2] - b[0] + 2 * pad) / ds, (b[3] - b[1] + 2 * pad) / ds);
      viewer.viewport.fitBounds(r);
    }
  }
  function step(d) {
    var o = order();
    if (!o.length) { return; }
    var i = selected ? o.indexOf(selected) : -1;
    select(o[(i + d + o.length) % o.length], true);
  }
  function setTool(t) {
    if (tool === "outline" && t !== "outline") { draft = []; }
    tool = t;
    document.getElementById("osd").className = "tool-" + t;
    tools.querySelectorAll("button[data-tool]").forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-tool") === t); });
    finish.disabled = t !== "outline";
    document.getElementById("hint").textContent = {
      select: "Click a glomerulus to see its measurements and correct it.",
      point: "Click the centre of a missed glomerulus (class: the 'new' choice).",
      outline: "Click along the border of a missed glomerulus; double-click, Enter or 'Finish outline' closes it."
    }[t];
    draw();
  }
  function addItem(it) {
    addedCount += 1;
    it.key = "a" + addedCount; it.kind = "added"; it.id = "new " + addedCount; it.cls = newClass; it.rejected = false; it.m = {};
    items.push(it);
    selected = it;
    changed();
  }
  function finishOutline() {
    if (draft.length >= 3) { var ring = draft.slice(); ring.push(ring[0]); draft = []; addItem({ring: ring, point: null}); }
    else { draft = []; draw(); }
  }

  // -- geometry ----------------------------------------------------------------------------
  function bounds(it) {
    if (it.point) { var r = 40 * ds; return [it.point[0] - r, it.point[1] - r, it.point[0] + r, it.point[1] + r]; }
    if (!it._b) {
      var b = [Infinity, Infinity, -Infinity, -Infinity];
      it.ring.forEach(function (p) { b[0] = Math.min(b[0], p[0]); b[1] = Math.min(b[1], p[1]); b[2] = Math.max(b[2], p[0]); b[3] = Math.max(b[3], p[1]); });
      it._b = b;
    }
    return it._b;
  }
  function inside(ring, x, y) {
    var c = false;
    for (var i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      var xi = ring[i][0], yi = ring[i][1], xj = ring[j][0], yj = ring[j][1];
      if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) { c = !c; }
    }
    return c;
  }
  function hit(x, y) {
    var best = null, bestArea = Infinity;
    items.forEach(function (it) {
      var b = bounds(it);
      if (x < b[0] || x > b[2] || y < b[1] || y > b[3]) { return; }
      if (it.point || inside(it.ring, x, y)) {
        var a = (b[2] - b[0]) * (b[3] - b[1]);
        if (a < bestArea) { best = it; bestArea = a; }
      }
    });
    return best;
  }

  // -- viewer and overlay ------------------------------------------------------------------
  var viewer = OpenSeadragon({
    id: "osd",
    tileSources: {Image: {xmlns: "http://schemas.microsoft.com/deepzoom/2008", Url: data.tiles.url,
      Format: data.tiles.format, Overlap: String(data.tiles.overlap), TileSize: String(data.tiles.size),
      Size: {Width: String(data.width), Height: String(data.height)}}},
    drawer: "canvas",  // WebGL refuses file:// tiles (cross-origin textures); the 2D canvas draws them
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: "BOTTOM_LEFT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    gestureSettingsMouse: {clickToZoom: false, dblClickToZoom: false},
    gestureSettingsTouch: {clickToZoom: false, dblClickToZoom: false}
  });
  window.glomscanViewer = viewer;
  var svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("class", "overlay");
  var layer = document.createElementNS(SVGNS, "g");
  svg.appendChild(layer);
  viewer.canvas.appendChild(svg);

  var tilesLoaded = 0, tilesFailed = 0;
  viewer.addHandler("tile-loaded", function () { tilesLoaded += 1; document.body.setAttribute("data-tiles-loaded", String(tilesLoaded)); });
  viewer.addHandler("tile-load-failed", function () { tilesFailed += 1; document.body.setAttribute("data-tiles-failed", String(tilesFailed)); });
  viewer.addHandler("open-failed", function (e) { document.body.setAttribute("data-open-failed", String(e.message)); });
  viewer.addHandler("open", function () { document.body.setAttribute("data-opened", "1"); place(); });
  viewer.addHandler("update-viewport", place);
  viewer.addHandler("resize", place);
  viewer.addHandler("canvas-click", function (e) {
    if (!e.quick) { return; }
    e.preventDefaultAction = true;
    var p = viewer.viewport.viewerElementToImageCoordinates(e.position);
    var x = p.x * ds, y = p.y * ds;
    if (tool === "select") { var it = hit(x, y); if (it) { select(it, false); } }
    else if (tool === "point") { addItem({point: [Math.round(x * 10) / 10, Math.round(y * 10) / 10], ring: null}); }
    else { draft.push([Math.round(x * 10) / 10, Math.round(y * 10) / 10]); draw(); }
  });
  viewer.addHandler("canvas-double-click", function (e) { if (tool === "outline") { e.preventDefaultAction = true; finishOutline(); } });

  function place() {
    if (!viewer.world.getItemCount()) { return; }
    var vp = viewer.viewport, s = 1000;
    var o = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var ax = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(s, 0));
    var ay = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, s));
    var k = s * ds;  // level-0 px -> element px
    layer.setAttribute("transform", "matrix(" + [(ax.x - o.x) / k, (ax.y - o.y) / k, (ay.x - o.x) / k, (ay.y - o.y) / k, o.x, o.y].join(",") + ")");
  }

  function shape(it) {
    var colour = rgb(data.colours[it.rejected ? "rejected" : it.cls]), node;
    if (it.point) {
      node = document.createElementNS(SVGNS, "circle");
      node.setAttribute("cx", it.point[0]); node.setAttribute("cy", it.point[1]); node.setAttribute("r", 25 * ds);
    } else {
      node = document.createElementNS(SVGNS, "polygon");
      node.setAttribute("points", it.ring.map(function (p) { return p[0] + "," + p[1]; }).join(" "));
    }
    node.setAttribute("fill", colour);
    node.setAttribute("fill-opacity", it.rejected ? "0" : "0.12");
    node.setAttribute("stroke", colour);
    node.setAttribute("data-key", it.key);
    node.setAttribute("class", "glomerulus " + (it.rejected ? "rejected" : it.cls) + (it.verifier ? " verifier" : "") +
      (it === selected ? " selected" : ""));
    return node;
  }
  function draw() {
    while (layer.firstChild) { layer.removeChild(layer.firstChild); }
    items.forEach(function (it) { if (it !== selected) { layer.appendChild(shape(it)); } });
    if (selected) { layer.appendChild(shape(selected)); }
    if (draft.length) {
      var line = document.createElementNS(SVGNS, "polyline");
      line.setAttribute("points", draft.map(function (p) { return p[0] + "," + p[1]; }).join(" "));
      line.setAttribute("fill", "none"); line.setAttribute("stroke", "#ffd400");
      layer.appendChild(line);
    }
    document.body.setAttribute("data-outlines", String(layer.querySelectorAll(".glomerulus").length));
    place();
  }

  // -- export ------------------------------------------------------------------------------
  function feature(it) {
    var cls = it.rejected ? "rejected" : it.cls;
    var props = {
      objectType: "annotation",
      name: it.kind === "added" ? "added glomerulus " + it.id.replace("new ", "") :
        (it.verifier && it.rejected ? "rejected candidate " : "glomerulus ") + it.id,
      classification: {name: data.class_names[cls], color: data.colours[cls]},
      isLocked: false,
      glomscan: {review: review(it), reviewed_class: it.rejected ? null : it.cls}
    };
    if (it.kind === "detected") {
      props.glomscan.id = it.id;
      props.glomscan.analysed_class = it.verifier ? null : it.analysed;  // the analysis did not count a rejected candidate
      if (it.verifier) { props.glomscan.candidate_class = it.analysed; props.glomscan.rejected_by = "verifier"; }
      props.measurements = it.m;
    }
    var f = {type: "Feature", geometry: it.point ? {type: "Point", coordinates: it.point} : {type: "Polygon", coordinates: [it.ring]},
             properties: props};
    if (it.featureId) { f.id = it.featureId; }
    return f;
  }
  function corrections() {
    return {type: "FeatureCollection", features: order().map(feature)};
  }
  window.glomscanCorrections = corrections;
  function exportCorrections() {
    var blob = new Blob([JSON.stringify(corrections(), null, 1)], {type: "application/geo+json"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = data.stem + ".geojson";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  document.addEventListener("keydown", function (e) {
    if (e.target && /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) { return; }
    var k = e.key;
    if (k === "n" || k === "ArrowDown") { step(1); }
    else if (k === "p" || k === "ArrowUp") { step(-1); }
    else if (k === "1") { setClass("normal"); }
    else if (k === "2") { setClass("sclerosed"); }
    else if (k === "x" || k === "Delete") { if (selected && selected.kind === "added") { removeAdded(); } else { toggleRejected(); } }
    else if (k === "u") { undo(); }
    else if (k === "Enter" && tool === "outline") { finishOutline(); }
    else if (k === "Escape") { setTool("select"); }
    else { return; }
    e.preventDefault();
  });

  var restored = restore();
  document.body.setAttribute("data-restored", String(restored));
  setTool("select");
  renderAll();
  document.body.setAttribute("data-ready", "1");
})();
