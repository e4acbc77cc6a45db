"""
The live status page, ``GET /`` on the metrics listener.

One self-contained HTML page (no external assets: it works offline and
behind any firewall) whose script polls ``status.json?view=page`` once a
second and redraws: the policy and readiness, totals, and every backend
with its state, weight, connections, load as a bar, routed rate and
failures.  Read-only: the page only reads.  Polling rather than
server-sent events: one small request a second per open page costs the
balancer less than a held connection per viewer would cost to manage, and
survives proxies and balancer restarts without reconnect logic.
"""

from __future__ import annotations

from twisted.web.resource import Resource

__all__ = ["PAGE", "StatusPage"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>twistedcluster</title>
<style>
:root { color-scheme: light dark; --up: #1a7f37; --draining: #b35900; --down: #c62828;
        --disabled: #6e7781; --bar: #2f81f7; --bg2: rgba(127,127,127,.12); }
* { box-sizing: border-box; }
body { font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; padding: 1rem; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline; margin-bottom: 1rem; }
h1 { font-size: 1.3rem; margin: 0; }
#ready { font-weight: 600; }
#ready.ok { color: var(--up); } #ready.bad { color: var(--down); }
#age { opacity: .7; font-size: .9rem; }
.totals { display: grid; grid-template-columns: repeat(auto-fit, minmax(8rem, 1fr)); gap: .5rem; margin-bottom: 1rem; }
.total { background: var(--bg2); border-radius: .4rem; padding: .5rem .75rem; }
.total b { display: block; font-size: 1.4rem; font-variant-numeric: tabular-nums; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid var(--bg2); }
th { font-size: .8rem; text-transform: uppercase; opacity: .7; }
td.num { text-align: right; }
.state { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; color: #fff; font-size: .85rem; }
.state.up { background: var(--up); } .state.draining { background: var(--draining); }
.state.down { background: var(--down); } .state.disabled { background: var(--disabled); }
.bar { position: relative; min-width: 6rem; height: 1.1rem; background: var(--bg2); border-radius: .3rem; overflow: hidden; }
.bar span { position: absolute; inset: 0 auto 0 0; background: var(--bar); }
.bar i { position: relative; font-style: normal; font-size: .8rem; padding-left: .3rem; }
#error { color: var(--down); font-weight: 600; }
@media (max-width: 640px) {
  thead { display: none; }
  table, tbody, tr, td { display: block; width: 100%; }
  tr { border: 1px solid var(--bg2); border-radius: .4rem; margin-bottom: .6rem; padding: .3rem; }
  td { border: 0; display: flex; justify-content: space-between; gap: 1rem; padding: .2rem .4rem; }
  td::before { content: attr(data-label); opacity: .7; }
  td.num { text-align: left; }
  .bar { flex: 1; }
}
</style>
</head>
<body>
<header>
  <h1>twistedcluster</h1>
  <span>policy <b id="policy">?</b></span>
  <span id="ready">loading...</span>
  <span id="age"></span>
  <span id="error"></span>
</header>
<section class="totals">
  <div class="total">backends up<b id="up">-</b></div>
  <div class="total">clients open<b id="clients">-</b></div>
  <div class="total">waiting<b id="waiting">-</b></div>
  <div class="total">routed/s<b id="rate">-</b></div>
  <div class="total">ended<b id="ended">-</b></div>
  <div class="total">refused or failed<b id="refused">-</b></div>
</section>
<table>
  <thead><tr><th>backend</th><th>address</th><th>state</th><th>weight</th><th>conns</th>
  <th>load</th><th>routed/s</th><th>routed</th><th>failures</th></tr></thead>
  <tbody id="backends"></tbody>
</table>
<script>
"use strict";
var previous = null, lastOk = 0;
function cell(row, label, text, cls) {
  var td = document.createElement("td");
  td.setAttribute("data-label", label);
  if (cls) td.className = cls;
  if (text !== undefined) td.textContent = text;
  row.appendChild(td);
  return td;
}
function hostPort(b) { return (b.host.indexOf(":") >= 0 ? "[" + b.host + "]" : b.host) + ":" + b.port; }
function draw(data) {
  var now = Date.now() / 1000, dt = previous ? now - previous.at : 0, before = Object.create(null);
  if (previous) previous.data.backends.forEach(function (b) { before[b.name] = b.routed; });
  document.getElementById("policy").textContent = data.policy;
  var ready = document.getElementById("ready");
  ready.textContent = data.ready === null ? "ready" : "not ready: " + data.ready;
  ready.className = data.ready === null ? "ok" : "bad";
  var up = data.backends.filter(function (b) { return b.state === "up"; }).length, total = 0;
  document.getElementById("up").textContent = up + " / " + data.backends.length;
  document.getElementById("clients").textContent = data.clients;
  document.getElementById("waiting").textContent = data.waiting;
  document.getElementById("ended").textContent = data.ended;
  document.getElementById("refused").textContent = data.refused;
  var body = document.getElementById("backends"), rows = document.createDocumentFragment();
  data.backends.forEach(function (b) {
    var tr = document.createElement("tr"), rate = "";
    tr.setAttribute("data-backend", b.name);
    tr.setAttribute("data-state", b.state);
    if (dt > 0 && b.name in before) {
      var r = Math.max(0, (b.routed - before[b.name]) / dt);
      total += r;
      rate = r.toFixed(1);
    }
    cell(tr, "backend", b.name);
    cell(tr, "address", hostPort(b));
    var s = document.createElement("span");
    s.className = "state " + b.state;
    s.textContent = b.state + (b.static ? " (static)" : "");
    cell(tr, "state").appendChild(s);
    cell(tr, "weight", b.weight, "num");
    cell(tr, "conns", b.connections, "num");
    var bar = document.createElement("div"), fill = document.createElement("span"), label = document.createElement("i");
    bar.className = "bar";
    fill.style.width = Math.min(100, Math.max(0, b.load * 100)).toFixed(1) + "%";
    label.textContent = (b.load * 100).toFixed(1) + "%";
    bar.appendChild(fill); bar.appendChild(label);
    cell(tr, "load").appendChild(bar);
    cell(tr, "routed/s", rate, "num");
    cell(tr, "routed", b.routed, "num");
    cell(tr, "failures", b.failures, "num");
    rows.appendChild(tr);
  });
  body.replaceChildren(rows);
  if (!data.backends.length) {
    var tr = document.createElement("tr");
    cell(tr, "", "no backend has registered").colSpan = 9;
    body.appendChild(tr);
  }
  document.getElementById("rate").textContent = previous ? total.toFixed(1) : "-";
  previous = {at: now, data: data};
}
function poll() {
  var request = new XMLHttpRequest();
  request.open("GET", "status.json?view=page");
  request.timeout = 3000;
  request.onload = function () {
    if (request.status === 200) {
      draw(JSON.parse(request.responseText));
      lastOk = Date.now();
      document.getElementById("error").textContent = "";
    } else {
      document.getElementById("error").textContent = "status.json: HTTP " + request.status;
    }
  };
  request.onerror = request.ontimeout = function () {
    document.getElementById("error").textContent = "balancer unreachable";
  };
  request.send();
}
function tick() {
  document.getElementById("age").textContent = lastOk ?
    "updated " + ((Date.now() - lastOk) / 1000).toFixed(0) + " s ago" : "";
}
poll();
setInterval(poll, 1000);
setInterval(tick, 500);
</script>
</body>
</html>
"""


class StatusPage(Resource):
    """
    The page; its data comes from C{status.json?view=page} beside it.
    """

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # Self-contained: nothing else may load, and no one may frame it.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; "
            b"style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        )
        return PAGE.encode("utf-8")
