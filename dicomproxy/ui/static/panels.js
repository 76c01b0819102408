/* DicomProxy status page: the spool panel and the task panel.
 *
 * Spool (admins: /dicomproxy/spool is the admin role's, a viewer's page says so and has no
 * buttons): what waits per destination and per study (the 50 oldest studies), and the failed
 * folder grouped by study, SPOOL_PAGE groups a page (100 000 failed instances are a few thousand
 * groups, never 100 000 rows); a study opens to its instances, INSTANCE_PAGE at a time. Retry and
 * discard per instance or per study (a discard asks for a second click), each audited by the
 * gateway.
 *
 * Tasks: /dicomproxy/tasks?state= (the real states, and quarantined), the 50 latest shown; a
 * task's log (what its script printed or logged, kept by the gateway: the last 200 lines / 32 KB)
 * opens under its row; a failed task can be re-run by an admin or its owner.
 *
 * Everything from the server is put into the page with textContent, never as HTML. app.js calls
 * window.dicomproxyPanels.refresh(you) on each poll; an action refreshes at once.
 */
(function () {
  "use strict";

  var cfg = document.body.dataset;
  var SPOOL_PAGE = 20;
  var INSTANCE_PAGE = 20;
  var TASKS_SHOWN = 50;

  function $(id) { return document.getElementById(id); }

  function el(tag, props) {
    var node = document.createElement(tag);
    Object.keys(props || {}).forEach(function (k) {
      if (k === "className") node.className = props[k];
      else if (k === "text") node.textContent = props[k];
      else node.setAttribute(k, props[k]);
    });
    Array.prototype.slice.call(arguments, 2).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function badge(text, cls) { return el("span", { className: "badge " + (cls || text), text: text }); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function call(method, url) {
    return fetch(url, { method: method, headers: { Accept: "application/json" }, cache: "no-store",
                        credentials: "same-origin" })
      .then(function (r) {
        var type = r.headers.get("content-type") || "";
        var body = type.indexOf("json") >= 0 ? r.json() : Promise.resolve(null);
        return body.then(function (json) {
          if (!r.ok) {
            var err = new Error((json && json.error) || method + " " + url + ": " + r.status);
            err.status = r.status;
            throw err;
          }
          return json;
        });
      });
  }

  function bytes(n) {
    if (typeof n !== "number") return "";
    var units = ["B", "KB", "MB", "GB", "TB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function age(seconds) {
    if (typeof seconds !== "number") return "";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  function when(value) {
    if (value === null || value === undefined || value === "") return "";
    var d = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
    return isNaN(d.getTime()) ? String(value) : d.toLocaleString();
  }

  function hex(status) { return typeof status === "number" ? "0x" + ("0000" + status.toString(16).toUpperCase()).slice(-4) : ""; }

  var you = { admin: false, user: null };

  // A button that runs `action` (a promise); a `danger` one asks for a second click first.
  function actionButton(text, name, action, danger) {
    var b = el("button", { type: "button", className: danger ? "danger" : "", "data-action": name, text: text });
    b.addEventListener("click", function () {
      if (danger && !b.classList.contains("confirm")) {
        b.classList.add("confirm");
        b.textContent = "confirm: " + text;
        return;
      }
      b.disabled = true;
      action().then(function () { refreshSoon(); })
        .catch(function (e) { b.disabled = false; note(b, e.message, true); });
    });
    return b;
  }

  function note(near, text, bad) {
    var n = el("div", { className: "action-state " + (bad ? "bad" : "ok"), text: text });
    near.parentNode.appendChild(n);
  }

  // ------------------------------------------------------------------ spool
  var spool = { offset: 0, open: {}, total: 0 };

  function renderSpoolError(e) {
    $("spool-state").textContent = e.status === 403 ? "admins only (the spool holds patient data)"
      : e.status === 404 ? "no DICOM spool (the DICOM side is off)" : e.message;
    [["spool-destinations", 6], ["spool-failed", 6]].forEach(function (x) {
      var body = $(x[0]);
      clear(body);
      body.appendChild(el("tr", {}, el("td", { colspan: String(x[1]), className: "muted", text: "\u2013" })));
    });
    clear($("spool-studies"));
    $("spool-prev").disabled = $("spool-next").disabled = true;
  }

  function renderWaiting(answer) {
    var body = $("spool-destinations");
    clear(body);
    var studies = $("spool-studies");
    clear(studies);
    var shown = 0;
    var total = 0;
    (answer.destinations || []).forEach(function (d) {
      var state = d.reachable ? badge("reachable", "ok") : badge("unreachable", "bad");
      var waiting = (d.waiting || 0) + " waiting, " + (d.delayed || 0) + " in backoff, " + (d.sending || 0) + " sending";
      body.appendChild(el("tr", { "data-destination": d.destination || "" },
        el("td", {}, el("code", { text: d.destination || "?" }), el("span", { className: "muted", text: " " + (d.via || "") })),
        el("td", {}, state, d.retryAt ? el("div", { className: "muted", text: "next try " + when(d.retryAt) }) : null),
        el("td", { text: waiting }), el("td", { text: bytes(d.bytes) }),
        el("td", { text: d.oldestAgeSeconds ? age(d.oldestAgeSeconds) : "" }),
        el("td", { className: "result", text: d.lastError || "" })));
      total += d.studiesTotal || 0;
      (d.studies || []).forEach(function (s) {
        shown++;
        studies.appendChild(el("tr", { "data-study": s.study },
          el("td", {}, el("code", { text: s.study || "(no study)" })),
          el("td", { text: (s.patientId || "") + (s.callingAe ? " \u00b7 " + s.callingAe : "") }),
          el("td", { text: s.waiting + " / " + s.delayed + " / " + s.sending }),
          el("td", { text: bytes(s.bytes) }), el("td", { text: age(s.oldestAgeSeconds) }),
          el("td", { className: "result", text: (s.nextAttemptAt ? when(s.nextAttemptAt) + " " : "") + (s.lastError || "") })));
      });
    });
    if (!(answer.destinations || []).length) {
      body.appendChild(el("tr", {}, el("td", { colspan: "6", className: "muted", text: "no destination" })));
    }
    $("spool-waiting-count").textContent = total > shown ? shown + " of " + total + " studies" : total + " studies";
    $("spool-state").textContent = answer.depth + " waiting, " + answer.failed + " failed";
  }

  function renderFailed(page) {
    var body = $("spool-failed");
    clear(body);
    spool.total = page.studies;
    $("spool-failed-count").textContent = page.instances + " instance(s) in " + page.studies + " stud" +
      (page.studies === 1 ? "y" : "ies");
    if (!page.groups.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: "6", className: "muted", text: "none" })));
    }
    page.groups.forEach(function (g) {
      var why = el("td", { className: "result" });
      g.statuses.forEach(function (s) { why.appendChild(badge(hex(s), "bad")); });
      g.reasons.forEach(function (r) { why.appendChild(el("div", { text: r.reason + (g.reasons.length > 1 || g.instances > 1 ? " (" + r.instances + ")" : "") })); });
      if (g.otherReasons) why.appendChild(el("div", { className: "muted", text: "and " + g.otherReasons + " other reason(s)" }));
      var actions = el("td", { className: "actions" });
      var toggle = el("button", { type: "button", className: "linkish", "data-action": "instances",
                                  text: spool.open[g.study] ? "hide instances" : "instances" });
      toggle.addEventListener("click", function () {
        if (spool.open[g.study]) delete spool.open[g.study]; else spool.open[g.study] = 0;
        refreshSoon();
      });
      actions.appendChild(toggle);
      if (you.admin) {
        var q = encodeURIComponent(g.study);
        actions.appendChild(actionButton("retry study", "retry-study", function () {
          return call("POST", cfg.spoolUrl + "/failed/studies/" + q + "/retry");
        }));
        actions.appendChild(actionButton("discard study", "discard-study", function () {
          return call("DELETE", cfg.spoolUrl + "/failed/studies/" + q);
        }, true));
      }
      body.appendChild(el("tr", { "data-study": g.study, className: "failed-study" },
        el("td", {}, el("code", { text: g.study || "(no study)" })),
        el("td", { text: (g.patientId || "") + (g.callingAe ? " \u00b7 " + g.callingAe : "") }),
        el("td", { text: g.instances + " \u00b7 " + bytes(g.bytes) + " \u00b7 " + g.attempts + " attempt(s)" }),
        why,
        el("td", { text: when(g.firstFailedAt) + (g.lastFailedAt !== g.firstFailedAt ? " \u2013 " + when(g.lastFailedAt) : "") }),
        actions));
      if (spool.open[g.study] !== undefined) {
        var holder = el("td", { colspan: "6" }, el("span", { className: "muted", text: "loading\u2026" }));
        body.appendChild(el("tr", { className: "instances", "data-study": g.study }, holder));
        loadInstances(g.study, holder);
      }
    });
    var from = page.offset + 1;
    var to = page.offset + page.groups.length;
    $("spool-page").textContent = page.studies ? "studies " + from + "\u2013" + to + " of " + page.studies : "";
    $("spool-prev").disabled = page.offset <= 0;
    $("spool-next").disabled = to >= page.studies;
  }

  function loadInstances(study, holder) {
    var offset = spool.open[study] || 0;
    var url = cfg.spoolUrl + "/failed?study=" + encodeURIComponent(study) + "&offset=" + offset + "&limit=" + INSTANCE_PAGE;
    call("GET", url).then(function (answer) {
      clear(holder);
      var table = el("table", {}, el("thead", {}, el("tr", {},
        el("th", { text: "SOP Instance UID" }), el("th", { text: "Status / reason" }), el("th", { text: "Attempts" }),
        el("th", { text: "First / last error" }), el("th", { text: "Failed at" }), el("th", {}))));
      var tbody = el("tbody", {});
      answer.items.forEach(function (n) {
        var actions = el("td", { className: "actions" });
        if (you.admin) {
          var id = encodeURIComponent(n.id);
          actions.appendChild(actionButton("retry", "retry", function () {
            return call("POST", cfg.spoolUrl + "/failed/" + id + "/retry");
          }));
          actions.appendChild(actionButton("discard", "discard", function () {
            return call("DELETE", cfg.spoolUrl + "/failed/" + id);
          }, true));
        }
        tbody.appendChild(el("tr", { "data-failed-id": n.id },
          el("td", {}, el("code", { text: n.SOPInstanceUID || n.id })),
          el("td", { className: "result" }, typeof n.status === "number" ? badge(hex(n.status), "bad") : null, n.reason || ""),
          el("td", { text: String(n.attempts || 0) }),
          el("td", { className: "result", text: (n.firstError || "") + (n.lastError && n.lastError !== n.firstError ? " \u2192 " + n.lastError : "") }),
          el("td", { text: when(n.failedAt) }), actions));
      });
      table.appendChild(tbody);
      holder.appendChild(table);
      if (answer.total > INSTANCE_PAGE) {
        var pager = el("p", { className: "pager" });
        var prev = el("button", { type: "button", text: "\u2190" });
        var next = el("button", { type: "button", text: "\u2192" });
        prev.disabled = offset <= 0;
        next.disabled = offset + INSTANCE_PAGE >= answer.total;
        prev.addEventListener("click", function () { spool.open[study] = Math.max(0, offset - INSTANCE_PAGE); refreshSoon(); });
        next.addEventListener("click", function () { spool.open[study] = offset + INSTANCE_PAGE; refreshSoon(); });
        pager.appendChild(prev);
        pager.appendChild(el("span", { className: "muted", text: (offset + 1) + "\u2013" + Math.min(answer.total, offset + INSTANCE_PAGE) + " of " + answer.total }));
        pager.appendChild(next);
        holder.appendChild(pager);
      }
    }).catch(function (e) { clear(holder); holder.appendChild(el("span", { className: "bad", text: e.message })); });
  }

  function refreshSpool() {
    return Promise.all([call("GET", cfg.spoolUrl + "?limit=50"),
                        call("GET", cfg.spoolUrl + "/failed/studies?offset=" + spool.offset + "&limit=" + SPOOL_PAGE)])
      .then(function (r) {
        renderWaiting(r[0]);
        if (spool.offset && !r[1].groups.length && r[1].studies) {  // the page emptied: back one
          spool.offset = Math.max(0, spool.offset - SPOOL_PAGE);
          return refreshSpool();
        }
        renderFailed(r[1]);
      })
      .catch(renderSpoolError);
  }

  // ------------------------------------------------------------------ tasks
  var openLogs = {};

  function mayRerun(t) { return you.admin || (t.owner !== null && t.owner !== undefined && t.owner === you.user); }

  function renderLog(holder, task) {
    clear(holder);
    var lines = task.log || [];
    var pre = el("pre", { className: "task-log", "data-task-log": task.id });
    if (!lines.length) pre.appendChild(el("span", { className: "muted", text: "(the script wrote nothing)" }));
    if (task.logDropped) pre.appendChild(el("span", { className: "muted", text: "\u2026 " + task.logDropped + " earlier line(s) not kept\n" }));
    lines.forEach(function (l) {
      pre.appendChild(el("span", { className: "level-" + l.level, text: new Date(l.t * 1000).toLocaleTimeString() + " " +
        l.level.toUpperCase() + " " + l.text + "\n" }));
    });
    holder.appendChild(pre);
  }

  function renderTasks(tasks) {
    var body = $("tasks-body");
    clear(body);
    var counts = {};
    tasks.forEach(function (t) { counts[t.quarantined ? "quarantined" : t.state] = (counts[t.quarantined ? "quarantined" : t.state] || 0) + 1; });
    $("tasks-summary").textContent = Object.keys(counts).map(function (k) { return counts[k] + " " + k; }).join(", ");
    if (!tasks.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: "5", className: "muted", text: "no tasks" })));
    }
    $("tasks-state").textContent = tasks.length > TASKS_SHOWN ? "the " + TASKS_SHOWN + " latest of " + tasks.length : "";
    tasks.slice(0, TASKS_SHOWN).forEach(function (t) {
      var state = el("td", {}, badge(t.state || "?", t.state));
      if (t.quarantined) state.appendChild(badge("quarantined", "quarantined"));
      if (t.attempts > 1 || t.reruns) state.appendChild(el("div", { className: "muted", text: (t.attempts || 0) + " attempt(s)" + (t.reruns ? ", " + t.reruns + " re-run(s)" : "") }));
      var actions = el("td", { className: "actions" });
      var logButton = el("button", { type: "button", className: "linkish", "data-action": "log",
                                     text: (openLogs[t.id] ? "hide log" : "log") + " (" + (t.logLines || 0) + ")" });
      logButton.addEventListener("click", function () {
        if (openLogs[t.id]) delete openLogs[t.id]; else openLogs[t.id] = true;
        refreshSoon();
      });
      actions.appendChild(logButton);
      if (t.state === "failed" && mayRerun(t)) {
        actions.appendChild(actionButton("re-run", "rerun", function () {
          openLogs[t.id] = true;
          return call("POST", cfg.tasksUrl + "/" + encodeURIComponent(t.id) + "/rerun");
        }));
      }
      body.appendChild(el("tr", { "data-task": String(t.id), "data-state": t.state },
        el("td", {}, el("div", { text: t.title || t.kind || t.id }), el("code", { className: "muted", text: t.kind || "" })),
        state,
        el("td", { text: when(t.created) + (t.finished ? " / " + when(t.finished) : "") }),
        el("td", { className: "result" + (t.error ? " bad" : ""), "data-error": t.error ? "1" : "",
                   text: t.error ? String(t.error) : summary(t.result) }),
        actions));
      if (openLogs[t.id]) {
        var holder = el("td", { colspan: "5" }, el("span", { className: "muted", text: "loading\u2026" }));
        body.appendChild(el("tr", { className: "instances", "data-task-log-row": String(t.id) }, holder));
        call("GET", cfg.tasksUrl + "/" + encodeURIComponent(t.id)).then(function (full) { renderLog(holder, full); })
          .catch(function (e) { clear(holder); holder.appendChild(el("span", { className: "bad", text: e.message })); });
      }
    });
  }

  // A task result in one short line: scalars as key=value, lists by their length.
  function summary(v) {
    if (v === null || v === undefined) return "";
    if (typeof v !== "object") return String(v);
    if (Array.isArray(v)) return v.length + " item(s)";
    var parts = Object.keys(v).map(function (k) {
      var x = v[k];
      if (Array.isArray(x)) return x.length ? k + "=" + x.length : null;
      if (x !== null && typeof x === "object") return null;
      return k + "=" + x;
    }).filter(function (p) { return p !== null; });
    var text = parts.join(", ");
    return text.length > 160 ? text.slice(0, 159) + "\u2026" : text;
  }

  function refreshTasks() {
    var state = $("tasks-filter").value;
    return call("GET", cfg.tasksUrl + (state ? "?state=" + encodeURIComponent(state) : ""))
      .then(function (tasks) { renderTasks(tasks || []); })
      .catch(function (e) { $("tasks-state").textContent = e.message; });
  }

  // ------------------------------------------------------------------ refresh
  var soon = null;

  function refreshSoon() {
    if (soon) clearTimeout(soon);
    soon = setTimeout(function () { soon = null; refresh(you); }, 50);
  }

  function refresh(who) {
    if (who) you = who;
    stats.refreshes++;
    return Promise.all([refreshSpool(), refreshTasks()]);
  }

  var stats = { refreshes: 0 };
  $("spool-prev").addEventListener("click", function () { spool.offset = Math.max(0, spool.offset - SPOOL_PAGE); refreshSoon(); });
  $("spool-next").addEventListener("click", function () { spool.offset += SPOOL_PAGE; refreshSoon(); });
  $("tasks-filter").addEventListener("change", refreshSoon);
  window.dicomproxyPanels = { refresh: refresh, stats: stats };
})();
