/* DicomProxy status page.
 *
 * Plain browser JavaScript, no build step. Reads the gateway's own API (same origin, so the
 * browser sends the same credentials it used for this page): /dicomproxy/health,
 * /dicomproxy/tasks, /dicomproxy/ui/status.json (scripts, C-ECHO to the PACS),
 * /dicomproxy/notifications (JSON, then the SSE stream). Uploads go through the TUS endpoint with tus-js-client (window.tus),
 * served from the package next to this file. For admins: a script's source with its error line
 * marked (/dicomproxy/ui/scripts/source), `dicomproxy check` (POST /dicomproxy/ui/check) and the
 * latest audit events (/dicomproxy/ui/audit). The graphs are graphs.js; the spool and the task
 * queue are panels.js.
 *
 * Everything from the server is put into the page with textContent, never as HTML.
 */
(function () {
  "use strict";

  var cfg = document.body.dataset;
  var refreshMs = parseInt(cfg.refreshMs || "5000", 10);

  // ------------------------------------------------------------------ helpers
  function $(id) { return document.getElementById(id); }

  function el(tag, props) {
    var node = document.createElement(tag);
    var children = Array.prototype.slice.call(arguments, 2);
    Object.keys(props || {}).forEach(function (k) {
      if (k === "className") node.className = props[k];
      else if (k === "text") node.textContent = props[k];
      else node.setAttribute(k, props[k]);
    });
    children.forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function badge(text, cls) { return el("span", { className: "badge " + (cls || text), text: text }); }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) {
          var err = new Error("GET " + url + ": " + r.status + " " + r.statusText);
          err.status = r.status;
          throw err;
        }
        return r.json();
      });
  }

  function fmtTime(value) {
    if (value === null || value === undefined || value === "") return "";
    var d = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
    return isNaN(d.getTime()) ? String(value) : d.toLocaleTimeString();
  }

  function scalar(v) {
    if (v === null || v === undefined) return "";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  // A link from a notification is followed only if it is a path here or an http(s) URL.
  function safeHref(link) {
    if (typeof link !== "string" || !link) return null;
    if (/^\/(?!\/)/.test(link) || /^https?:\/\//i.test(link)) return link;
    return null;
  }

  // ------------------------------------------------------------------ health
  function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }

  // Health entries are the objects that carry an "ok" flag (upstream, dicom, tus, mail, ...).
  function components(health) {
    var out = {};
    Object.keys(health).forEach(function (k) { if (isObj(health[k]) && "ok" in health[k]) out[k] = health[k]; });
    return out;
  }

  function stateOf(ok) { return ok === true ? "ok" : ok === false ? "bad" : "unknown"; }

  // reachable: true/false/null (not probed yet); detail: where; latency in ms; error text
  function reachability(reachable, detail, latency, error) {
    var node = el("span", {});
    var state = stateOf(reachable);
    node.appendChild(badge(state === "ok" ? "reachable" : state === "bad" ? "unreachable" : "not checked yet", state));
    if (detail) node.appendChild(el("span", { className: "muted", text: " " + detail }));
    if (reachable && typeof latency === "number") node.appendChild(el("span", { className: "muted", text: " (" + latency + " ms)" }));
    if (!reachable && error) node.appendChild(el("div", { className: "muted", text: scalar(error) }));
    return node;
  }

  // One panel per named upstream (health.upstreams: Upstreams / servers.json); hidden without any.
  function renderUpstreams(ups) {
    var section = $("upstreams");
    var servers = isObj(ups) && isObj(ups.servers) ? ups.servers : {};
    var names = Object.keys(servers);
    if (names.length < 2 && !(isObj(ups) && isObj(ups.groups) && Object.keys(ups.groups).length)) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    var box = $("upstream-panels");
    clear(box);
    var ejected = 0;
    names.sort().forEach(function (name) {
      var s = servers[name];
      if (s.state === "ejected") ejected++;
      var facts = el("dl", { className: "facts" });
      [["URL", s.url], ["DICOM", s.dicom], ["in flight", s.inFlight], ["requests", s.requests],
       ["errors", s.errors], ["check latency", typeof s.latencyMs === "number" ? s.latencyMs + " ms" : null],
       ["last error", s.lastError]].forEach(function (f) {
        if (f[1] === null || f[1] === undefined || f[1] === "") return;
        facts.appendChild(el("dt", { text: f[0] }));
        facts.appendChild(el("dd", { text: scalar(f[1]) }));
      });
      box.appendChild(el("div", { className: "upstream " + s.state, "data-upstream": name },
        el("h3", {}, el("span", { text: name }), badge(s.state, s.state === "healthy" ? "ok" : "bad")), facts));
    });
    $("upstreams-summary").textContent = names.length + " servers" + (ejected ? ", " + ejected + " ejected" : "") +
      (ups.reloads ? ", servers.json reloaded " + ups.reloads + "x" : "");
    var groups = isObj(ups.groups) ? ups.groups : {};
    $("upstreams-groups").textContent = Object.keys(groups).sort().map(function (g) {
      return g + " (" + groups[g].mode + (groups[g].federated ? ", federated" : "") + "): " +
        groups[g].members.join(", ");
    }).join("; ") + (ups.reloadError ? "  Last servers.json error: " + ups.reloadError : "");
  }

  function renderHealth(health) {
    var overall = health.status || "unknown";
    var o = $("overall");
    o.textContent = overall;
    o.className = "badge " + (overall === "ok" ? "ok" : overall === "unknown" ? "unknown" : "bad");

    renderUpstreams(health.upstreams);
    var up = isObj(health.upstream) ? health.upstream : {};
    clear($("upstream-http"));
    $("upstream-http").appendChild(reachability(up.reachable, up.url, up.latencyMs, up.error));

    var dicom = isObj(health.dicom) ? health.dicom : null;
    var spool = $("spool-depth");
    if (!dicom) spool.textContent = "no DICOM side";
    else if (dicom.enabled === false) spool.textContent = "DICOM side off (Dicom:Port 0)";
    else if (dicom.servedBy) {  // Server:Workers: this page's connection reached another worker
      var w = isObj(health.workers) ? health.workers : {};
      spool.textContent = "the spool is " + dicom.servedBy + "'s (this page is served by worker " +
        scalar(w.index) + "; reload to reach another)";
    } else {
      var depth = typeof dicom.spoolDepth === "number" ? dicom.spoolDepth : 0;
      spool.textContent = depth + (depth === 1 ? " instance" : " instances") + " waiting to be forwarded" +
        (dicom.failed ? ", " + dicom.failed + " failed for good" : "") +
        (dicom.retrying ? " (retrying: " + scalar(dicom.lastForwardError) + ")" : "");
    }

    var comps = components(health);
    var box = $("health-components");
    clear(box);
    Object.keys(comps).sort().forEach(function (name) {
      var entry = comps[name];
      var dl = el("dl", {});
      Object.keys(entry).forEach(function (k) {
        if (k === "ok" || entry[k] === null || entry[k] === "") return;
        dl.appendChild(el("dt", { text: k }));
        dl.appendChild(el("dd", { text: scalar(entry[k]) }));
      });
      var state = stateOf(entry.ok);
      box.appendChild(el("div", { className: "component", "data-name": name },
        el("strong", { text: name + " " }), badge(state === "bad" ? "degraded" : state, state), dl));
    });
  }

  function renderDicomUpstream(status, health) {
    var node = $("upstream-dicom");
    clear(node);
    var dicom = isObj(health) && isObj(health.dicom) ? health.dicom : null;
    if (dicom && dicom.enabled === false) { node.appendChild(badge("DICOM side off", "unknown")); return; }
    var echo = isObj(status) ? status.dicomUpstream : null;
    if (!isObj(echo)) {
      node.appendChild(badge("not reported", "unknown"));
      return;
    }
    node.appendChild(reachability(echo.ok, "C-ECHO " + (echo.target || ""), echo.latencyMs, echo.error));
  }

  // ------------------------------------------------------------------ scripts
  function basename(path) { return String(path || "?").split(/[\\/]/).pop(); }

  function renderScripts(status) {
    var s = isObj(status.scripts) ? status.scripts : {};
    var list = Array.isArray(s.scripts) ? s.scripts : [];
    var body = $("scripts-body");
    clear(body);
    if (!list.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: "3", className: "muted", text: s.error || "no scripts" })));
    }
    list.forEach(function (e) {
      // A failed edit keeps the previous version running: say both.
      var state = el("span", {});
      if (e.loaded === true) state.appendChild(badge(e.error ? "previous version running" : "loaded", "ok"));
      else if (e.present === false) state.appendChild(badge("no file", "unknown"));
      else if (e.loaded === null || e.loaded === undefined) state.appendChild(badge("present", "unknown"));
      else if (!e.error) state.appendChild(badge("not loaded", "unknown"));
      if (e.error) state.appendChild(badge(e.loaded ? "reload failed" : "failed to load", "bad"));
      var cbs = Array.isArray(e.callbacks) ? e.callbacks : [];
      var cbCell = el("td", { className: "callbacks" });
      if (!cbs.length) cbCell.appendChild(el("span", { className: "muted", text: e.kind === "background" ? "entry named per task" : "none" }));
      cbs.forEach(function (c) { cbCell.appendChild(el("code", { text: c })); });
      var nameCell = el("td", {}, el("code", { text: basename(e.script) }), el("span", { className: "muted", text: " " + (e.kind || "") }));
      if (e.present !== false) nameCell.appendChild(sourceButton(basename(e.script), "source"));
      if (e.location) nameCell.appendChild(el("div", { className: "location", text: e.location.file + ":" + e.location.line }));
      if (e.lastReload) nameCell.appendChild(el("div", { className: "muted", text: "last reload " + fmtTime(e.lastReload) }));
      if (e.error && e.error !== s.lastError) nameCell.appendChild(el("div", { className: "muted", text: scalar(e.error) }));
      body.appendChild(el("tr", { "data-script": basename(e.script) }, nameCell, el("td", {}, state), cbCell));
    });
    var err = s.lastError || null;
    $("reload-error").hidden = !err;
    $("reload-error-text").textContent = err ? String(err) : "";
    // a new error: show where it points, once (the operator may then look at another file)
    var failing = list.filter(function (e) { return e.error && e.location; })[0];
    if (err && failing && err !== shownError) {
      shownError = err;
      showSource(failing.location.file);
    }
    if (!err) shownError = null;
  }

  // ------------------------------------------------------------------ script source, check (admin)
  var shownError = null;

  function sourceButton(name, text) {
    var b = el("button", { type: "button", className: "linkish", "data-source": name, text: text });
    b.addEventListener("click", function () { showSource(name); });
    return el("span", {}, " ", b);
  }

  function showSource(name) {
    var view = $("source-view");
    getJSON(cfg.sourceUrl + "?script=" + encodeURIComponent(name)).then(function (answer) {
      view.hidden = false;
      view.dataset.script = answer.script;
      $("source-title").textContent = answer.script + (answer.truncated ? " (first MB)" : "");
      var loc = answer.location && answer.location.file === answer.script ? answer.location.line : 0;
      $("source-error").textContent = answer.error ? String(answer.error) : "loaded without error";
      var code = $("source-code");
      clear(code);
      answer.source.split("\n").forEach(function (text, i) {
        var line = el("span", { className: "line" + (i + 1 === loc ? " error-line" : ""), "data-line": String(i + 1),
                                text: text || " " });
        code.appendChild(line);
      });
      var marked = code.querySelector(".error-line");
      if (marked) code.scrollTop = Math.max(0, marked.offsetTop - code.clientHeight / 2);
    }).catch(function (e) {
      view.hidden = false;
      $("source-title").textContent = name;
      $("source-error").textContent = e.status === 403 ? "the source is shown to admins only" : e.message;
      clear($("source-code"));
    });
  }

  function runCheck() {
    var stateNode = $("check-state");
    var list = $("check-results");
    stateNode.textContent = "checking\u2026";
    fetch(cfg.checkUrl, { method: "POST", credentials: "same-origin", cache: "no-store",
                          headers: { Accept: "application/json", "Content-Type": "application/json" }, body: "{}" })
      .then(function (r) {
        if (r.status === 403) throw new Error("check is for admins only");
        if (!r.ok) throw new Error("POST " + cfg.checkUrl + ": " + r.status);
        return r.json();
      })
      .then(function (answer) {
        clear(list);
        stateNode.textContent = answer.ok ? "all scripts load" : "errors found";
        stateNode.className = answer.ok ? "ok" : "bad";
        answer.results.forEach(function (r) {
          var li = el("li", { "data-script": r.name, className: r.ok ? "ok" : "bad" },
            badge(r.ok ? "ok" : "error", r.ok ? "ok" : "bad"), el("code", { text: r.name }));
          if (r.error) li.appendChild(el("div", { className: "muted", text: r.error }));
          if (r.location) li.appendChild(sourceButton(r.location.file, "show " + r.location.file + ":" + r.location.line));
          list.appendChild(li);
        });
        if (!answer.results.length) list.appendChild(el("li", { className: "muted", text: "no .lua scripts" }));
      })
      .catch(function (e) { stateNode.textContent = e.message; stateNode.className = "bad"; });
  }

  // ------------------------------------------------------------------ audit and security (admin)
  function who(ev) {
    var p = (ev.participants || []).filter(function (x) { return x.requestor; })[0] || (ev.participants || [])[0];
    return p ? p.userId + (p.address ? " @ " + p.address : "") : "";
  }

  function what(ev) {
    if (ev.description) return ev.description;
    var o = (ev.objects || [])[0];
    return o ? (o.name || o.id || "") : "";
  }

  function isSecurity(ev) {
    return ev.outcome !== 0 && (ev.event === "User Authentication" || ev.event === "Security Alert");
  }

  function renderAudit(answer, error) {
    var stateNode = $("audit-state");
    var sec = $("security-body");
    var all = $("audit-body");
    clear(sec);
    clear(all);
    if (error) {
      stateNode.textContent = error.status === 403 ? "admins only" : error.message;
      return;
    }
    if (!answer.enabled) {
      stateNode.textContent = "the audit trail is off (Audit:Enabled)";
      sec.appendChild(el("tr", {}, el("td", { colspan: "4", className: "muted", text: "no audit trail" })));
      return;
    }
    stateNode.textContent = answer.events.length + " latest";
    var bad = answer.events.filter(isSecurity);
    if (!bad.length) sec.appendChild(el("tr", {}, el("td", { colspan: "4", className: "muted", text: "none" })));
    bad.forEach(function (ev) {
      sec.appendChild(el("tr", { "data-event": ev.event },
        el("td", { text: fmtTime(ev.time) }), el("td", {}, badge(ev.event, "bad")),
        el("td", { text: who(ev) }), el("td", { text: what(ev) })));
    });
    answer.events.forEach(function (ev) {
      all.appendChild(el("tr", { "data-event": ev.event },
        el("td", { text: fmtTime(ev.time) }), el("td", { text: ev.event + (ev.action ? " (" + ev.action + ")" : "") }),
        el("td", {}, badge(ev.outcome === 0 ? "success" : "failure", ev.outcome === 0 ? "ok" : "bad")),
        el("td", { text: who(ev) }), el("td", { text: what(ev) })));
    });
  }

  // ------------------------------------------------------------------ tasks, spool: panels.js

  // ------------------------------------------------------------------ polling
  var timer = null;
  var inFlight = false;

  // Poll every refreshMs; a live notification (an import, a failed task) refreshes at once.
  function refreshSoon(delay) {
    if (timer) clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  function refresh() {
    timer = null;
    if (inFlight) { refreshSoon(250); return; }
    inFlight = true;
    var jobs = [getJSON(cfg.healthUrl), getJSON(cfg.statusUrl), getJSON(cfg.auditUrl + "?limit=50")];
    Promise.allSettled(jobs).then(function (r) {
      var health = r[0].status === "fulfilled" ? r[0].value : null;
      var status = r[1].status === "fulfilled" ? r[1].value : null;
      if (health) renderHealth(health);
      if (status) renderScripts(status);
      if (health || status) renderDicomUpstream(status, health);
      renderAudit(r[2].value, r[2].status === "rejected" ? r[2].reason : null);
      if (window.dicomproxyPanels) window.dicomproxyPanels.refresh(status && status.you);
      var failed = r.slice(0, 2).filter(function (x) { return x.status === "rejected"; });
      $("updated").textContent = failed.length
        ? "update failed: " + failed[0].reason.message
        : "updated " + new Date().toLocaleTimeString();
    }).finally(function () {
      inFlight = false;
      if (!timer) refreshSoon(refreshMs);
    });
  }

  // ------------------------------------------------------------------ notifications
  var seen = {};
  var lastId = 0;
  var uploadsById = {};

  function addNotification(n, live) {
    if (seen[n.id]) return;
    seen[n.id] = true;
    lastId = Math.max(lastId, n.id);
    var title = el("div", { className: "title" }, n.title, el("span", { className: "kind", text: n.kind }));
    var li = el("li", { className: "level-" + (n.level || "info") + (live ? " new" : ""), "data-id": String(n.id),
      "data-kind": n.kind }, el("time", { datetime: n.time, text: fmtTime(n.time) }), title);
    if (n.body) li.appendChild(el("div", { className: "body", text: n.body }));
    var href = safeHref(n.link);
    if (href) li.appendChild(el("div", { className: "link" }, el("a", { href: href, text: n.link })));
    else if (n.link) li.appendChild(el("div", { className: "link muted", text: n.link }));
    var list = $("feed-list");
    // newest first; keep the order by id even if the initial load and the stream interleave
    var before = null;
    for (var i = 0; i < list.children.length; i++) {
      if (parseInt(list.children[i].dataset.id, 10) < n.id) { before = list.children[i]; break; }
    }
    list.insertBefore(li, before);
    while (list.children.length > 200) list.removeChild(list.lastChild);
    $("feed-empty").hidden = true;
    matchUpload(n);
    if (live) refreshSoon(300);
  }

  function connectFeed() {
    var state = $("feed-state");
    getJSON(cfg.notificationsUrl + "?limit=100").then(function (items) {
      items.slice().reverse().forEach(function (n) { addNotification(n, false); });
    }).catch(function () { /* the stream below still works */ }).finally(function () {
      if (!window.EventSource) { state.textContent = "no live updates"; return; }
      var url = cfg.streamUrl + (lastId ? "?after=" + lastId : "");
      var es = new EventSource(url, { withCredentials: true });
      es.addEventListener("open", function () { state.textContent = "live"; state.className = "badge ok"; });
      es.addEventListener("error", function () { state.textContent = "reconnecting"; state.className = "badge unknown"; });
      es.addEventListener("notification", function (ev) {
        try { addNotification(JSON.parse(ev.data), true); } catch (e) { /* ignore a malformed event */ }
      });
    });
  }

  // ------------------------------------------------------------------ uploads
  function containsValue(obj, wanted, depth) {
    if (depth > 3 || obj === null || obj === undefined) return false;
    if (typeof obj === "string") return wanted.some(function (w) { return w && (obj === w || obj.endsWith("/" + w)); });
    if (typeof obj === "object") {
      for (var k in obj) if (containsValue(obj[k], wanted, depth + 1)) return true;
    }
    return false;
  }

  // An "upload.imported" / "import.failed" notification for one of our uploads updates its row.
  function matchUpload(n) {
    if (n.kind !== "upload.imported" && n.kind !== "import.failed") return;
    Object.keys(uploadsById).forEach(function (id) {
      var u = uploadsById[id];
      if (u.done) return;
      if (containsValue(n.data, [id, u.url], 0) || containsValue([n.title, n.body], [id], 0)) {
        u.done = true;
        var ok = n.kind === "upload.imported";
        u.row.classList.add(ok ? "imported" : "failed");
        u.state.textContent = (ok ? "imported: " : "import failed: ") + n.title + (n.body ? " \u2014 " + n.body : "");
      }
    });
  }

  function startUpload(file) {
    var bar = el("progress", { max: "100", value: "0" });
    var percent = el("span", { className: "percent", text: "0%" });
    var state = el("div", { className: "state", text: "starting\u2026" });
    var row = el("li", { "data-name": file.name }, el("span", { className: "name", title: file.name, text: file.name }),
      bar, percent, state);
    $("uploads").appendChild(row);
    if (!window.tus || !window.tus.isSupported) {
      row.classList.add("failed");
      state.textContent = "this browser cannot upload with TUS";
      return;
    }
    var type = file.type || (/\.zip$/i.test(file.name) ? "application/zip" : "application/dicom");
    var upload = new window.tus.Upload(file, {
      endpoint: cfg.tusEndpoint,
      metadata: { filename: file.name, filetype: type },
      retryDelays: [0, 1000, 3000, 5000],
      removeFingerprintOnSuccess: true,
      onProgress: function (sent, total) {
        var p = total ? Math.floor((sent / total) * 100) : 0;
        bar.value = p;
        percent.textContent = p + "%";
        state.textContent = "uploading\u2026";
      },
      onSuccess: function () {
        bar.value = 100;
        percent.textContent = "100%";
        var id = upload.url ? upload.url.replace(/\/+$/, "").split("/").pop() : "";
        var entry = uploadsById[id];
        if (!entry || !entry.done) state.textContent = "uploaded; importing\u2026";
        row.classList.add("uploaded");
      },
      onError: function (err) {
        row.classList.add("failed");
        state.textContent = "upload failed: " + (err && err.message ? err.message : err);
      },
      onUploadUrlAvailable: function () {
        var id = upload.url.replace(/\/+$/, "").split("/").pop();
        row.dataset.uploadId = id;
        uploadsById[id] = { row: row, state: state, url: upload.url, done: false };
      },
    });
    upload.findPreviousUploads().then(function (previous) {
      if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
      upload.start();
    });
  }

  function setupUpload() {
    var input = $("upload-input");
    var zone = $("dropzone");
    input.addEventListener("change", function () {
      Array.prototype.forEach.call(input.files, startUpload);
      input.value = "";
    });
    ["dragenter", "dragover"].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (e) {
      Array.prototype.forEach.call(e.dataTransfer.files, startUpload);
    });
  }

  setupUpload();
  $("check-run").addEventListener("click", runCheck);
  connectFeed();
  refresh();
})();
