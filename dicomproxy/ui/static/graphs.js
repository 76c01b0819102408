/* DicomProxy status page: the live graphs.
 *
 * Polls /dicomproxy/ui/history?since=SEQ (deltas only: one point per series per second) and
 * draws the gateway's own metrics with uPlot (vendored, MIT: uPlot.LICENSE.txt). The page
 * keeps at most MAX_POINTS points per series (the server's ring: one hour), so a day of uptime
 * costs what an hour does. A chart is made when its first series appears and made again only
 * when its set of series changes; otherwise an update is one setData per chart. A chart draws at
 * most one point per PX_PER_POINT pixel columns (the highest of the seconds it covers, so a spike
 * stays visible): measured in tests/e2e/test_ui_operator.py (headless Chromium, the shared machine
 * at load ~16), an update with the full ring (3600 points x 60 series, 8 charts) cost 181 ms when
 * every pixel column had a point, 64 ms with one per 3 columns, 1.3x one with 60 points kept.
 *
 * ?refresh=MS in the page's URL polls faster (at least every 100 ms) for a closer look.
 * window.dicomproxyGraphs says how many updates were drawn and what they cost (ms, uPlot's
 * drawing included: measured to the end of the last chart's draw hook).
 */
(function () {
  "use strict";

  var cfg = document.body.dataset;
  var MAX_POINTS = 3600;
  var PX_PER_POINT = 3;  // a drawn point every 3 pixels: 140 points for a 420-pixel chart
  var params = new URLSearchParams(window.location.search);
  var pollMs = Math.max(100, parseInt(params.get("refresh") || cfg.historyMs || "1000", 10) || 1000);

  // Each chart: the series keys it takes (a pattern over the /dicomproxy/metrics sample names),
  // the legend of one (capture group 1, or a fixed name) and a factor for its unit.
  var CHARTS = [
    { id: "requests", title: "Proxied requests / s, by status class",
      match: /^dicomproxy_proxy_requests_total\{status="([^"]*)"\}$/ },
    { id: "latency", title: "Proxy time to first byte (ms)", factor: 1000,
      match: /^dicomproxy_proxy_first_byte_seconds:(p50|p99)$/ },
    { id: "bytes", title: "Bytes / s: proxied in and out, TUS uploads",
      match: /^dicomproxy_(proxy_bytes_received|proxy_bytes_sent|tus_bytes_received)_total$/,
      names: { proxy_bytes_received: "in", proxy_bytes_sent: "out", tus_bytes_received: "TUS in" } },
    { id: "cstore", title: "C-STOREs / s",
      match: /^dicomproxy_dicom_(received|forwarded|rejected|forward_failed|store_errors)_total$/ },
    { id: "lag", title: "Forward lag: reception to PACS acceptance (s)",
      match: /^dicomproxy_dicom_forward_seconds:(p50|p99)$/ },
    { id: "spool", title: "Spool (instances)",
      match: /^dicomproxy_dicom_(spool_depth|failed_folder)$/ },
    { id: "tus", title: "TUS uploads / s",
      match: /^dicomproxy_tus_(uploads_created|uploads_finished|imports)_total$/ },
    { id: "hooks", title: "Lua hook time p99 (ms), by callback", factor: 1000,
      match: /^dicomproxy_lua_hook_seconds\{callback="([^"]*)"\}:p99$/ },
    // named upstreams (Upstreams / servers.json): shown only once they have data
    { id: "upstreams", title: "Proxied requests / s, by upstream (2xx)", optional: true,
      match: /^dicomproxy_upstream_requests_total\{status="2xx",upstream="([^"]*)"\}$/ },
    { id: "upstream-errors", title: "Proxied requests / s with no answer, by upstream", optional: true,
      match: /^dicomproxy_upstream_requests_total\{status="error",upstream="([^"]*)"\}$/ },
  ];
  var COLORS = ["#2f6fb3", "#1f8a4c", "#c0392b", "#b7791f", "#7d3c98", "#16a085", "#6b7385", "#d35400"];

  var data = { seq: 0, t: [], series: {} };
  var charts = {};
  var stats = { updates: 0, lastMs: 0, maxMs: 0, totalMs: 0, points: 0, errors: 0, drawnAt: 0 };
  window.dicomproxyGraphs = stats;

  function $(id) { return document.getElementById(id); }

  // ------------------------------------------------------------------ the data
  function merge(answer) {
    if (answer.first !== data.seq + 1) data = { seq: 0, t: [], series: {} };  // a restart, or far behind
    var n = answer.t.length;
    if (!n) return false;
    var before = data.t.length;
    Array.prototype.push.apply(data.t, answer.t);
    Object.keys(answer.series).forEach(function (key) {
      var ring = data.series[key];
      if (!ring) ring = data.series[key] = new Array(before).fill(null);
      Array.prototype.push.apply(ring, answer.series[key]);
    });
    Object.keys(data.series).forEach(function (key) {
      var ring = data.series[key];
      while (ring.length < data.t.length) ring.push(null);  // gone from the answer
    });
    var extra = data.t.length - MAX_POINTS;
    if (extra > 0) {
      data.t.splice(0, extra);
      Object.keys(data.series).forEach(function (key) { data.series[key].splice(0, extra); });
    }
    data.seq = answer.seq;
    return true;
  }

  function keysOf(chart) {
    return Object.keys(data.series).filter(function (k) { return chart.match.test(k); }).sort();
  }

  function legend(chart, key) {
    var m = chart.match.exec(key);
    if (chart.names && m && chart.names[m[1]]) return chart.names[m[1]];
    return chart.name || (m && m[1]) || key;
  }

  // ------------------------------------------------------------------ the charts
  function box(chart) {
    var node = $("chart-" + chart.id);
    if (node) return node;
    node = document.createElement("div");
    node.className = "chart";
    node.id = "chart-" + chart.id;
    node.dataset.chart = chart.id;
    var h = document.createElement("h3");
    h.textContent = chart.title;
    var empty = document.createElement("div");
    empty.className = "empty muted";
    empty.textContent = "no data yet";
    node.appendChild(h);
    node.appendChild(empty);
    $("charts").appendChild(node);
    return node;
  }

  // The chart's columns, at most `width` points: each the first second of its bucket and the
  // highest value in it (null when the bucket has none).
  function columns(chart, keys, width) {
    var f = chart.factor || 1;
    var n = data.t.length;
    var k = Math.max(1, Math.ceil(n / Math.max(50, (width || 400) / PX_PER_POINT)));
    var t = [];
    for (var i = 0; i < n; i += k) t.push(data.t[i]);
    var cols = [t];
    keys.forEach(function (key) {
      var ring = data.series[key];
      var out = new Array(t.length);
      for (var b = 0, i = 0; i < n; i += k, b++) {
        var top = null;
        for (var j = i; j < i + k && j < n; j++) if (ring[j] !== null && (top === null || ring[j] > top)) top = ring[j];
        out[b] = top === null ? null : top * f;
      }
      cols.push(out);
    });
    return cols;
  }

  function make(chart, node, keys) {
    var width = Math.max(300, node.clientWidth || 380);
    var opts = {
      width: width, height: 160,
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      series: [{}].concat(keys.map(function (k, i) {
        return { label: legend(chart, k), stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
                 points: { show: false } };
      })),
      axes: [{}, { size: 55 }],
      hooks: { draw: [function () { stats.drawnAt = performance.now(); }] },
    };
    var empty = node.querySelector(".empty");
    if (empty) empty.remove();
    return new window.uPlot(opts, columns(chart, keys, width), node);
  }

  function draw() {
    CHARTS.forEach(function (chart) {
      var keys = keysOf(chart);
      if (!keys.length && chart.optional && !$("chart-" + chart.id)) return;
      var node = box(chart);
      if (!keys.length) return;
      var drawn = charts[chart.id];
      if (drawn && drawn.keys.join("\n") === keys.join("\n")) {
        drawn.plot.setData(columns(chart, keys, drawn.plot.width));
      } else {
        if (drawn) drawn.plot.destroy();
        charts[chart.id] = { keys: keys, plot: make(chart, node, keys) };
      }
      node.dataset.series = keys.map(function (k) { return legend(chart, k); }).join(",");
      node.dataset.last = keys.map(function (k) {
        var ring = data.series[k];
        for (var i = ring.length - 1; i >= 0; i--) if (ring[i] !== null) return ring[i];
        return "";
      }).join(",");
    });
  }

  // ------------------------------------------------------------------ polling
  function poll() {
    fetch(cfg.historyUrl + "?since=" + data.seq, { headers: { Accept: "application/json" }, cache: "no-store",
                                                   credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("GET " + cfg.historyUrl + ": " + r.status);
        return r.json();
      })
      .then(function (answer) {
        var started = performance.now();
        if (!merge(answer)) return null;
        draw();
        // uPlot draws in a microtask after setData: measure once those have run
        return new Promise(function (resolve) { setTimeout(resolve, 0); }).then(function () {
          var ms = Math.max(stats.drawnAt || 0, performance.now()) - started;
          stats.updates += 1;
          stats.lastMs = ms;
          stats.totalMs += ms;
          stats.maxMs = Math.max(stats.maxMs, ms);
          stats.points = data.t.length;
          $("graphs-state").textContent = data.t.length + " s kept, every " + pollMs + " ms";
        });
      })
      .catch(function (e) {
        stats.errors += 1;
        $("graphs-state").textContent = "update failed: " + e.message;
      })
      .finally(function () { setTimeout(poll, pollMs); });
  }

  CHARTS.filter(function (c) { return !c.optional; }).forEach(box);
  poll();
})();
