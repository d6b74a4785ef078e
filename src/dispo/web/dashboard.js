// The dashboard's behaviour: start sessions, end them, and keep the list current from the event stream.
// Everything goes through the /v1 API with the token from this page's own path (/ui/TOKEN/).
(function () {
  "use strict";
  var token = decodeURIComponent(location.pathname.split("/")[2] || "");
  var ORDER = {starting: 0, running: 1, stopping: 2, ended: 3};
  var sessions = new Map();   // id -> {status, seen: performance.now() when status arrived}
  var ended = new Set();      // ids known to have ended: an older answer must not bring them back
  var rows = document.getElementById("rows");
  var table = document.getElementById("table");
  var empty = document.getElementById("empty");
  var region = document.getElementById("sessions");
  var statusLine = document.getElementById("status");
  var alertBox = document.getElementById("alert");

  function api(method, path, body) {
    var headers = {"Accept": "application/json", "Authorization": "Bearer " + token};
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    return fetch(path, {method: method, headers: headers, credentials: "omit", cache: "no-store",
                        body: body === undefined ? undefined : JSON.stringify(body)})
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          if (!r.ok) {
            var e = new Error(data.detail || ("HTTP " + r.status));
            e.hint = data.hint || "";
            throw e;
          }
          return data;
        });
      });
  }

  function say(text) { statusLine.textContent = text; }

  function showError(e) {
    alertBox.textContent = "";
    var strong = document.createElement("strong");
    strong.textContent = e.message;
    alertBox.appendChild(strong);
    if (e.hint) { alertBox.appendChild(document.createTextNode(" (" + e.hint + ")")); }
    alertBox.hidden = false;
  }

  function clearError() { alertBox.hidden = true; alertBox.textContent = ""; }

  function age(entry) {
    var s = Math.max(0, Math.round((entry.status.age_s || 0) + (performance.now() - entry.seen) / 1000));
    if (s < 120) { return s + " s"; }
    if (s < 7200) { return Math.floor(s / 60) + " min"; }
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function merge(s) {
    if (!s || !s.id || s.pooled) { return; }  // a clone waiting in the warm pool is nobody's session yet
    if (s.state === "ended") {
      if (sessions.has(s.id)) {
        say("Session " + s.id + " ended" + (s.end_reason ? ": " + s.end_reason : "") + ".");
      }
      sessions.delete(s.id);
      ended.add(s.id);
    } else if (!ended.has(s.id)) {
      var old = sessions.get(s.id);
      if (!old || ORDER[s.state] >= ORDER[old.status.state]) {
        sessions.set(s.id, {status: s, seen: performance.now()});
      }
    }
    render();
  }

  function cell(tr, content) {
    var td = document.createElement("td");
    if (typeof content === "string") { td.textContent = content; } else if (content) { td.appendChild(content); }
    tr.appendChild(td);
    return td;
  }

  function row(entry) {
    var s = entry.status;
    var tr = document.createElement("tr");
    tr.id = "session-" + s.id;
    var code = document.createElement("code");
    code.id = "sid-" + s.id;
    code.textContent = s.id + (s.name ? " (" + s.name + ")" : "");
    cell(tr, code);
    var how = {restore: " (restored)", pool: " (from the pool)"}[s.start] || "";
    cell(tr, (s.profile || s.image || "") + how);
    cell(tr, s.state).className = "state";
    cell(tr, age(entry)).className = "age";
    var link = null;
    if (s.viewer_url) {
      link = document.createElement("a");
      link.href = s.viewer_url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.textContent = "Open viewer";
      link.setAttribute("aria-describedby", code.id);
    }
    cell(tr, link);
    var end = document.createElement("button");
    end.type = "button";
    end.className = "end";
    end.textContent = "End session";
    end.setAttribute("aria-describedby", code.id);
    end.disabled = s.state === "stopping";
    end.addEventListener("click", function () {
      end.disabled = true;
      clearError();
      api("DELETE", "/v1/sessions/" + encodeURIComponent(s.id)).then(merge).catch(function (e) {
        end.disabled = false;
        showError(e);
      });
    });
    cell(tr, end);
    return tr;
  }

  function render() {
    region.setAttribute("aria-busy", "false");
    var list = Array.from(sessions.values()).sort(function (a, b) { return a.status.created - b.status.created; });
    var wanted = new Set(list.map(function (e) { return "session-" + e.status.id; }));
    Array.from(rows.children).forEach(function (tr) { if (!wanted.has(tr.id)) { tr.remove(); } });
    list.forEach(function (entry) {
      var fresh = row(entry);
      var current = document.getElementById(fresh.id);
      if (!current) {
        rows.appendChild(fresh);
      } else if (current.querySelector(".state").textContent !== entry.status.state ||
                 current.querySelectorAll("a").length !== fresh.querySelectorAll("a").length) {
        current.replaceWith(fresh);   // keep a row (and its focus) unless what it shows changed
      }
    });
    table.hidden = list.length === 0;
    empty.hidden = list.length !== 0;
    empty.textContent = "No sessions.";
  }

  function refresh() {
    return api("GET", "/v1/sessions").then(function (data) {
      var live = new Set(data.sessions.map(function (s) { return s.id; }));
      Array.from(sessions.keys()).forEach(function (id) { if (!live.has(id)) { sessions.delete(id); } });
      data.sessions.forEach(merge);
      render();
    }).catch(showError);
  }

  document.querySelectorAll("form.start").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var button = form.querySelector("button");
      var input = form.querySelector("input[name=url]");
      var body = {profile: form.dataset.profile};
      if (input && input.value.trim()) { body.url = input.value.trim(); }
      button.disabled = true;
      clearError();
      say("Starting " + form.dataset.profile + "…");
      api("POST", "/v1/sessions", body).then(function (s) {
        merge(s);
        say("Started session " + s.id + " (" + form.dataset.profile + ").");
        if (input) { input.value = ""; }
      }).catch(showError).finally(function () { button.disabled = false; });
    });
  });

  function listen() {
    var source = new EventSource("/v1/events?access_token=" + encodeURIComponent(token));
    source.addEventListener("open", refresh);   // after a reconnect too: catch up on what was missed
    source.addEventListener("state", function (ev) { merge(JSON.parse(ev.data).fields); });
  }

  setInterval(function () {
    sessions.forEach(function (entry, id) {
      var tr = document.getElementById("session-" + id);
      if (tr) { tr.querySelector(".age").textContent = age(entry); }
    });
  }, 1000);
  listen();
})();
