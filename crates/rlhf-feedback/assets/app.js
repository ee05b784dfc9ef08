// rlhf feedback: keyboard-first labelling. The forms work without this script; it adds the
// keys, records the time spent on the item, and fills the form when editing a label.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  var keysToggle = document.getElementById("keys-toggle");
  var keys = document.getElementById("keys");
  function toggleKeys() { if (keys) keys.hidden = !keys.hidden; }
  if (keysToggle) keysToggle.addEventListener("click", toggleKeys);
  if (!form) return;

  var kind = form.dataset.kind;
  var n = parseInt(form.dataset.n || "0", 10);
  var started = performance.now();
  var submitting = false;

  function radio(name, value) {
    var el = form.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (el) { el.checked = true; el.dispatchEvent(new Event("change", { bubbles: true })); }
  }
  function cycle(name) {
    var els = form.querySelectorAll('input[name="' + name + '"]');
    for (var i = 0; i < els.length; i++) {
      if (els[i].checked) { radio(name, els[(i + 1) % els.length].value); return; }
    }
    if (els.length) radio(name, els[0].value);
  }
  function submit() {
    if (submitting) return;
    if (!form.reportValidity()) return;
    submitting = true;
    form.requestSubmit ? form.requestSubmit() : form.submit();
  }
  form.addEventListener("submit", function (e) {
    var lt = document.getElementById("lead_time_ms");
    if (lt) lt.value = String(Math.round(performance.now() - started));
    // The skip button must not be blocked by validation, and a double press must not
    // send twice (the server would keep one label anyway).
    var btns = form.querySelectorAll("button[type=submit]");
    setTimeout(function () { for (var i = 0; i < btns.length; i++) btns[i].disabled = true; }, 0);
  });

  // Ranking state: groups of answer indices, best first.
  var groups = [];
  var tieNext = false;
  function showRanking() {
    for (var i = 0; i < n; i++) {
      var input = document.getElementById("rank_" + i);
      if (input) input.value = "";
    }
    var parts = [];
    groups.forEach(function (g, gi) {
      g.forEach(function (i) {
        var input = document.getElementById("rank_" + i);
        if (input) input.value = String(gi + 1);
      });
      parts.push(g.map(function (i) { return i + 1; }).join(" = "));
    });
    var order = document.getElementById("rank-order");
    if (order) order.textContent = parts.length ? "Order: " + parts.join(" > ") : "";
  }
  function rankPress(i) {
    if (i >= n) return;
    groups = groups.map(function (g) { return g.filter(function (x) { return x !== i; }); })
      .filter(function (g) { return g.length; });
    if (tieNext && groups.length) groups[groups.length - 1].push(i);
    else groups.push([i]);
    tieNext = false;
    showRanking();
  }

  // Editing: fill the form from the stored label.
  if (form.dataset.editing) {
    try {
      var l = JSON.parse(form.dataset.editing);
      if (kind === "pairwise") {
        radio("choice", l.choice);
        if (l.degree) radio("degree", l.degree);
        (l.safety || []).forEach(function (s, i) { radio("safety_" + i, s || ""); });
      } else if (kind === "rank") {
        groups = l.ranking || [];
        showRanking();
      } else if (kind === "single") {
        radio("thumb", l.thumb);
      }
    } catch (err) { /* a form without prefill still works */ }
  }

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "checkbox"));
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); return; }
    if (typing) {
      if (e.key === "Escape") t.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var k = e.key;
    if (k === "Enter") { e.preventDefault(); submit(); return; }
    if (k === "?") { toggleKeys(); return; }
    if (k === "n") {
      var skip = document.getElementById("skip");
      if (skip) { e.preventDefault(); skip.click(); }
      return;
    }
    if (kind === "pairwise") {
      var choices = { a: "a", b: "b", t: "tie", x: "both_bad" };
      var degrees = { "1": "significantly_better", "2": "better", "3": "slightly_better", "4": "negligibly_better" };
      if (choices[k]) { radio("choice", choices[k]); e.preventDefault(); }
      else if (degrees[k]) { radio("degree", degrees[k]); e.preventDefault(); }
      else if (k === "z") { cycle("safety_0"); e.preventDefault(); }
      else if (k === "c") { cycle("safety_1"); e.preventDefault(); }
    } else if (kind === "rank") {
      if (/^[1-9]$/.test(k)) { rankPress(parseInt(k, 10) - 1); e.preventDefault(); }
      else if (k === "=") { tieNext = true; e.preventDefault(); }
      else if (k === "Backspace") { groups.pop(); tieNext = false; showRanking(); e.preventDefault(); }
      else if (k === "0") { groups = []; tieNext = false; showRanking(); e.preventDefault(); }
    } else if (kind === "single") {
      if (k === "u") { radio("thumb", "up"); e.preventDefault(); }
      else if (k === "d") { radio("thumb", "down"); e.preventDefault(); }
      else if (k === "r") { var rw = document.getElementById("rewrite"); if (rw) { rw.focus(); e.preventDefault(); } }
    }
  });

  // Typing into a rank box by hand keeps the keyboard state in step.
  form.addEventListener("input", function (e) {
    if (kind !== "rank" || !/^rank_/.test(e.target.name || "")) return;
    var byRank = {};
    for (var i = 0; i < n; i++) {
      var v = parseInt((document.getElementById("rank_" + i) || {}).value, 10);
      if (v > 0) (byRank[v] = byRank[v] || []).push(i);
    }
    groups = Object.keys(byRank).map(Number).sort(function (a, b) { return a - b; })
      .map(function (r) { return byRank[r]; });
    var order = document.getElementById("rank-order");
    if (order) order.textContent = groups.length ? "Order: " + groups.map(function (g) { return g.map(function (i) { return i + 1; }).join(" = "); }).join(" > ") : "";
  });
})();
