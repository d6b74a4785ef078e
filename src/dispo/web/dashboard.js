// The dashboard's behaviour: start sessions, end them, keep the list current from the event stream, keep the
// ended ones listed (how they ended, their receipt), and come back by itself when dispod does.
// Everything goes through the /v1 API with the token from this page's own path (/ui/TOKEN/). Strings from
// sessions go in as text, never as markup.
(function () {
  "use strict";
  var token = decodeURIComponent(location.pathname.split("/")[2] || "");
  var ORDER = {starting: 0, running: 1, stopping: 2, ended: 3};
  var HISTORY_MAX = 20;        // ended sessions listed (the runtime keeps more; a page need not)
  var RETRY_MS = 2000;         // how often a lost connection is tried again
  var THUMB_MS = 4000;         // how often a running session's picture is asked again (dispod keeps it 3 s)
  var $ = function (id) { return document.getElementById(id); };
  var sessions = new Map();    // id -> {status, seen: performance.now() when status arrived}
  var history = new Map();     // id -> status of an ended session
  var endedByMe = new Set();   // ids this page ended ("Ended by you")
  var rows = $("rows"), table = $("table"), empty = $("empty"), region = $("sessions");
  var statusLine = $("status"), alertBox = $("alert"), connection = $("connection");
  var STEP_WORDS = {};
  try { STEP_WORDS = JSON.parse(region.getAttribute("data-step-words") || "{}"); } catch (e) { STEP_WORDS = {}; }

  // -- talking to dispod --------------------------------------------------------------------------------
  function api(method, path, body) {
    var headers = {"Accept": "application/json", "Authorization": "Bearer " + token};
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    return fetch(path, {method: method, headers: headers, credentials: "omit", cache: "no-store",
                        body: body === undefined ? undefined : JSON.stringify(body)})
      .catch(function () {
        var e = new Error("dispod does not answer.");
        e.lost = true;
        throw e;
      })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          if (!r.ok) {
            var e = new Error(data.detail || ("dispod answered " + r.status + "."));
            e.hint = data.hint || "";
            e.status = r.status;
            throw e;
          }
          return data;
        });
      });
  }

  // -- words for people ---------------------------------------------------------------------------------
  function say(text) { statusLine.textContent = text; }

  function sentence(text) {
    text = String(text || "").trim();
    if (!text) { return ""; }
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?…]$/.test(text) ? text : text + ".";
  }

  function minutes(seconds) {
    var s = Number(seconds) || 0;
    if (s < 120) { return Math.round(s) + " s"; }
    if (s < 7200) { return Math.round(s / 60) + " min"; }
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }

  function failure(s) {
    var e = s.error || {};
    var text = String(e.message || "").trim();
    if (e.hint) { text = text.replace(/[.:;]$/, "") + ": " + String(e.hint).trim(); }
    return sentence(text);
  }

  // How a session ended, in words ("Ended by you", "Ended after 15 min idle", "Could not start: ..."), from
  // the status's end_kind (the API's end_reason is a line for logs, not for this page).
  var END_WORDS = {
    user: "Ended through the API (dispo stop, or another page).",
    viewer: "Ended from its viewer.",
    finished: "Finished: its template was saved.",
    dispod_stopped: "Ended because dispod stopped.",
    interrupted: "Ended from the command line.",
    pool: "A warm-pool guest, put away before anyone used it.",
    reclaimed: "Cleaned up when dispod started again (the dispod that ran it died).",
    node_lost: "Ended with its node, which the cluster lost."
  };
  function howEnded(s) {
    var kind = String(s.end_kind || "");
    if (s.error) { return (s.step ? "Could not start: " : "Failed: ") + failure(s); }
    if (kind === "user" && endedByMe.has(s.id)) { return "Ended by you."; }
    if (kind === "idle") { return "Ended after " + minutes(s.idle_timeout_s) + " idle."; }
    if (kind === "lifetime") { return "Ended at its time limit (" + minutes(s.max_lifetime_s) + ")."; }
    if (kind === "exited") {
      return s.exit_status === 0 ? "The app closed." : "The app quit with an error (status " + s.exit_status + ").";
    }
    return END_WORDS[kind] || "Ended.";
  }

  function stepText(s) {
    if (s.state === "stopping") { return "Ending…"; }
    if (s.state === "running") { return "Running"; }
    var steps = s.steps || [];
    var step = s.step || steps[0] || "";  // announced, its first step not begun yet
    var i = steps.indexOf(step);
    var words = STEP_WORDS[step] || (step ? "Step " + step + "…" : "Starting…");
    var warm = s.start === "boot" ? "cold start" : s.start === "pool" ? "warm start, from the pool" : "warm start";
    return words + (i >= 0 ? " (step " + (i + 1) + " of " + steps.length + ", " : " (") + warm + ")";
  }

  // -- errors and the connection ------------------------------------------------------------------------
  function showError(e, prefix) {
    if (e.lost) { lost(); return; }
    if (e.status === 401) { tokenChanged(); return; }
    alertBox.textContent = "";
    var strong = document.createElement("strong");
    strong.textContent = (prefix || "") + sentence(e.message);
    alertBox.appendChild(strong);
    if (e.hint) { alertBox.appendChild(document.createTextNode(" " + sentence(e.hint))); }
    alertBox.hidden = false;
    alertBox.focus();   // the person was on the button that failed: the alert is where to read why
  }

  function clearError() { alertBox.hidden = true; alertBox.textContent = ""; }

  var source = null, retry = null, gone = false;

  function notice(text) {
    if (connection.textContent !== text) { connection.textContent = text; }
    connection.hidden = false;
  }

  function lost() {
    if (gone) { return; }
    if (source) { source.close(); source = null; }
    notice("Lost the connection to dispod (it stopped, or the network is down). Trying again every " +
           RETRY_MS / 1000 + " s…");
    document.body.classList.add("offline");
    if (!retry) { retry = setTimeout(probe, RETRY_MS); }
  }

  function tokenChanged() {
    gone = true;
    if (source) { source.close(); source = null; }
    if (retry) { clearTimeout(retry); retry = null; }
    notice("This page's link is no longer valid: dispod has a new access token (dispod --new-token). " +
           "Open the dashboard again from the link in dispod.url in dispod's state directory (for example: sudo cat /run/dispo/dispod.url).");
    document.body.classList.add("offline");
    document.querySelectorAll("form.start button, button.end").forEach(function (b) {
      b.setAttribute("aria-disabled", "true");
    });
  }

  function probe() {
    retry = null;
    api("GET", "/v1/health").then(function () {
      connection.hidden = true;
      connection.textContent = "";
      document.body.classList.remove("offline");
      say("Connected to dispod again.");
      listen();
    }).catch(function (e) {
      if (e.status === 401) { tokenChanged(); return; }
      retry = setTimeout(probe, RETRY_MS);
    });
  }

  // -- the sessions -------------------------------------------------------------------------------------
  function elapsed(entry) {
    return Math.max(0, (entry.status.age_s || 0) + (performance.now() - entry.seen) / 1000);
  }

  function merge(s) {
    if (!s || !s.id || s.pooled) { return; }  // a clone waiting in the warm pool is nobody's session yet
    if (s.state === "ended") {
      var was = sessions.get(s.id);
      if (was) {
        say("Session " + s.id + ": " + howEnded(s));
        sessions.delete(s.id);
      }
      history.set(s.id, s);
    } else if (!history.has(s.id)) {
      var old = sessions.get(s.id);
      if (!old || ORDER[s.state] > ORDER[old.status.state] ||
          (s.state === old.status.state && s.state === "starting")) {
        sessions.set(s.id, {status: s, seen: performance.now()});
      } else if (ORDER[s.state] === ORDER[old.status.state]) {
        old.status = Object.assign({}, old.status, s, {step: old.status.step});
      }
    }
    render();
  }

  function stepDone(ev) {  // a bring-up step finished: the next one is under way
    var entry = sessions.get(ev.session_id);
    if (!entry) { return; }
    var s = entry.status, steps = s.steps || [], i = steps.indexOf(ev.fields.step);
    if (s.state === "starting" && i >= 0 && i + 1 < steps.length) {
      entry.status = Object.assign({}, s, {step: steps[i + 1]});
      render();
    }
  }

  function cell(tr, className, content) {
    var td = document.createElement("td");
    td.className = className || "";
    if (typeof content === "string") { td.textContent = content; } else if (content) { td.appendChild(content); }
    tr.appendChild(td);
    return td;
  }

  function sessionLabel(s) {
    var code = document.createElement("code");
    code.id = "sid-" + s.id;
    code.textContent = s.id + (s.name ? " (" + s.name + ")" : "");
    return code;
  }

  function endSession(s, button) {
    if (button.getAttribute("aria-disabled") === "true") { return; }
    button.setAttribute("aria-disabled", "true");   // not `disabled`: a disabled button loses the focus
    button.textContent = "Ending…";
    clearError();
    endedByMe.add(s.id);
    api("DELETE", "/v1/sessions/" + encodeURIComponent(s.id)).then(merge).catch(function (e) {
      endedByMe.delete(s.id);
      button.removeAttribute("aria-disabled");
      button.textContent = "End session";
      showError(e, "Could not end session " + s.id + ": ");
    });
  }

  function newRow(s) {
    var tr = document.createElement("tr");
    tr.id = "session-" + s.id;
    cell(tr, "", sessionLabel(s));
    cell(tr, "profile", "");
    cell(tr, "state", "");
    cell(tr, "age", "");
    cell(tr, "viewer", "");
    var end = document.createElement("button");
    end.type = "button";
    end.className = "end";
    end.textContent = "End session";
    end.setAttribute("aria-describedby", "sid-" + s.id);
    end.addEventListener("click", function () { endSession(sessions.get(s.id).status, end); });
    cell(tr, "", end);
    return tr;
  }

  function setText(el, text) { if (el.textContent !== text) { el.textContent = text; } }

  function update(tr, entry) {  // in place, so a focused button keeps its focus
    var s = entry.status;
    var how = {restore: " (warm: restored)", pool: " (warm: from the pool)"}[s.start] || "";
    setText(tr.querySelector(".profile"), (s.profile || s.image || "") + how);
    setText(tr.querySelector(".state"), stepText(s));
    setText(tr.querySelector(".age"), minutes(elapsed(entry)) + (s.state === "starting" ? " so far" : ""));
    var viewer = tr.querySelector(".viewer");
    if (s.viewer_url && !viewer.firstChild) {
      var link = document.createElement("a");
      link.href = s.viewer_url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      // The screen's picture, in the link (a person picks the session by it); alt="": the link says what it is.
      var img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";
      img.hidden = true;
      img.addEventListener("load", function () { img.hidden = false; img.dataset.busy = ""; });
      img.addEventListener("error", function () { img.hidden = true; img.dataset.busy = ""; });
      link.appendChild(img);
      var words = document.createElement("span");
      words.textContent = "Open viewer";
      link.appendChild(words);
      link.setAttribute("aria-describedby", "sid-" + s.id);
      viewer.appendChild(link);
    }
    var thumb = viewer.querySelector("img.thumb");
    if (thumb && s.state === "running" && !thumb.dataset.busy &&
        (!thumb.dataset.at || performance.now() - Number(thumb.dataset.at) >= THUMB_MS)) {
      thumb.dataset.busy = "1";   // one request at a time per row
      thumb.dataset.at = String(performance.now());
      thumb.src = "thumb/" + encodeURIComponent(s.id) + "?at=" + Math.round(performance.now());
    }
    var end = tr.querySelector("button.end");
    if (s.state === "stopping") {
      end.setAttribute("aria-disabled", "true");
      setText(end, "Ending…");
    }
  }

  function historyRow(s) {
    var tr = document.createElement("tr");
    tr.id = "ended-" + s.id;
    cell(tr, "", sessionLabel(s)).firstChild.id = "hid-" + s.id;
    cell(tr, "", s.profile || s.image || "");
    var how = cell(tr, "how", "");
    var words = document.createElement("span");
    words.className = s.error ? "failed" : "";
    words.textContent = howEnded(s);
    how.appendChild(words);
    var tail = s.error && s.error.console_tail ? String(s.error.console_tail).trim() : "";
    if (tail) {
      var details = document.createElement("details");
      var summary = document.createElement("summary");
      summary.textContent = "The guest console's last lines";
      var pre = document.createElement("pre");
      pre.textContent = tail.split("\n").slice(-12).join("\n");
      details.appendChild(summary);
      details.appendChild(pre);
      how.appendChild(details);
    }
    cell(tr, "", s.exit_status === null || s.exit_status === undefined ? "–" : String(s.exit_status));
    var duration = s.ended && s.created ? minutes(s.ended - s.created) : "–";
    cell(tr, "", duration);
    var link = document.createElement("a");
    link.href = "receipt/" + encodeURIComponent(s.id);
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    var clean = s.receipt ? (s.receipt.clean ? "clean" : "NOT clean") : "";
    link.textContent = "Receipt" + (clean ? " (" + clean + ")" : "");
    link.setAttribute("aria-describedby", "hid-" + s.id);
    cell(tr, "", link);
    return tr;
  }

  function moveFocusFrom(tr) {
    // The person was on this row (its "End session"): the next row's button, else the one before, else the
    // heading; never the top of the page.
    var next = tr.nextElementSibling || tr.previousElementSibling;
    while (next && !sessions.has(next.id.replace("session-", ""))) { next = next.nextElementSibling; }
    var target = next ? next.querySelector("button.end") : $("sessions-h");
    target.focus();
  }

  function render() {
    region.setAttribute("aria-busy", "false");
    var list = Array.from(sessions.values()).sort(function (a, b) { return a.status.created - b.status.created; });
    var wanted = new Set(list.map(function (e) { return "session-" + e.status.id; }));
    Array.from(rows.children).forEach(function (tr) {
      if (!wanted.has(tr.id)) {
        if (tr.contains(document.activeElement)) { moveFocusFrom(tr); }
        tr.remove();
      }
    });
    list.forEach(function (entry, i) {
      var tr = $("session-" + entry.status.id);
      if (!tr) {
        tr = newRow(entry.status);
        rows.insertBefore(tr, rows.children[i] || null);
      }
      update(tr, entry);
    });
    table.hidden = list.length === 0;
    empty.hidden = list.length !== 0;
    empty.textContent = "No sessions.";
    renderHistory();
  }

  function renderHistory() {
    var list = Array.from(history.values()).sort(function (a, b) {
      return (b.ended || b.created || 0) - (a.ended || a.created || 0);
    });
    list.slice(HISTORY_MAX).forEach(function (s) { history.delete(s.id); });
    list = list.slice(0, HISTORY_MAX);
    var body = $("history-rows");
    var have = Array.from(body.children).map(function (tr) { return tr.id; }).join(" ");
    var want = list.map(function (s) { return "ended-" + s.id; }).join(" ");
    if (have !== want) {
      var fresh = document.createDocumentFragment();
      list.forEach(function (s) { fresh.appendChild($("ended-" + s.id) || historyRow(s)); });
      body.textContent = "";
      body.appendChild(fresh);
    }
    $("history-section").hidden = list.length === 0;
  }

  function refresh() {
    return api("GET", "/v1/sessions?all=1").then(function (data) {
      var live = new Set(data.sessions.map(function (s) { return s.id; }));
      Array.from(sessions.keys()).forEach(function (id) { if (!live.has(id)) { sessions.delete(id); } });
      data.sessions.forEach(merge);
      render();
    }).catch(function (e) { showError(e); });
  }

  // -- starting -----------------------------------------------------------------------------------------
  document.querySelectorAll("form.start").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var button = form.querySelector("button");
      if (button.getAttribute("aria-disabled") === "true") { return; }
      var input = form.querySelector("input[name=url]");
      var name = form.dataset.profile;
      var body = {profile: name};
      if (input && input.value.trim()) { body.url = input.value.trim(); }
      button.setAttribute("aria-disabled", "true");
      clearError();
      say("Starting " + name + "…");
      api("POST", "/v1/sessions", body).then(function (s) {
        merge(s);
        say("Session " + s.id + " (" + name + ") is starting.");
        if (input) { input.value = ""; }
      }).catch(function (e) {
        say("");
        showError(e, "Could not start " + name + ": ");
      }).finally(function () { button.removeAttribute("aria-disabled"); });
    });
  });

  function listen() {
    if (source) { source.close(); }
    source = new EventSource("/v1/events?access_token=" + encodeURIComponent(token));
    source.addEventListener("open", refresh);   // after a reconnect too: catch up on what was missed
    source.addEventListener("state", function (ev) { merge(JSON.parse(ev.data).fields); });
    source.addEventListener("step", function (ev) { stepDone(JSON.parse(ev.data)); });
    source.addEventListener("error", function () {
      // EventSource retries by itself after a dropped stream, but gives up for good on a 401 (a new token):
      // take over, so both cases say so and the page comes back once dispod does.
      lost();
    });
  }

  setInterval(function () {
    sessions.forEach(function (entry, id) {
      var tr = $("session-" + id);
      if (tr) { update(tr, entry); }
    });
  }, 1000);
  listen();
})();
