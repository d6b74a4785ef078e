// The viewer: the session's progress in words until its display is up (GET status, once a second), then
// noVNC in the frame; how the session ended once it did. The bar: "End session", and what the session's
// profile allows (GET features): the Downloads panel, Upload (a file chooser, or a file dropped on the screen),
// Sound. Every request goes to a path beside this page (same origin, below the session's token); the server
// checks the profile's policy again. Strings from the session go in as text, never as markup.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var status = $("status");
  var say = function (text) { status.textContent = text; };

  // -- progress: what happens until the display is up, and how the session ended ---------------------
  var POLL_MS = 1000, GIVE_UP = 5;  // 5 unanswered polls in a row: the viewer is gone
  var frame = $("vnc"), progress = $("progress"), finished = false, misses = 0;
  function tell(text) {
    if ($("progress-text").textContent !== text) { $("progress-text").textContent = text; }
  }
  function connected() {  // noVNC (same origin) marks its page once it talks to the guest's VNC server
    try {
      return frame.contentDocument.documentElement.classList.contains("noVNC_connected");
    } catch (e) { return false; }
  }
  function showDisplay() {
    if (!frame.getAttribute("src")) { frame.src = frame.getAttribute("data-src"); frame.hidden = false; }
    if (connected()) { progress.hidden = true; }
  }
  function finish(text, error) {
    finished = true;
    frame.remove();  // no more reconnecting to a display that is gone
    stopSound();
    $("end").disabled = true;
    ["downloads", "upload-label", "sound", "panel"].forEach(function (id) { $(id).hidden = true; });
    progress.hidden = false;
    tell(text);
    $("problem-message").textContent = error ? error.message : "";
    $("problem-hint").textContent = error && error.hint ? "Hint: " + error.hint : "";
  }
  function poll() {
    if (finished) { return; }
    fetch("status", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 403) {
        return {done: true, text: "This viewer is closed: its session ended (or the link is not valid)."};
      }
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (s) {
      misses = 0;
      if (finished) { return; }
      var detail = s.done ? "" : String(s.detail || "");
      if ($("progress-detail").textContent !== detail) { $("progress-detail").textContent = detail; }
      if (s.done) { finish(String(s.text), s.error); return; }
      if (s.display) {
        showDisplay();
        if (!connected()) { tell(String(s.text)); }
      } else {
        progress.hidden = false;
        tell(String(s.text));
      }
      setTimeout(poll, POLL_MS);
    }).catch(function () {
      misses += 1;
      if (misses >= GIVE_UP) {
        finish("The viewer stopped answering: the session ended, or dispo was stopped.", null);
        return;
      }
      if (!progress.hidden) { tell("No answer from dispo; trying again…"); }
      setTimeout(poll, POLL_MS);
    });
  }
  // Hide the words as soon as noVNC connects, rather than at the next poll.
  setInterval(function () {
    if (!finished && frame.getAttribute("src") && !progress.hidden && connected()) { progress.hidden = true; }
  }, 200);
  poll();

  // A view link watches: no "End session" (the server refuses it, and the files, clipboard and sound, too).
  if (document.body.getAttribute("data-scope") === "view") {
    $("end").hidden = true;
    say("View only");
  }

  $("end").addEventListener("click", function () {
    var button = $("end");
    button.disabled = true;
    say("Ending the session…");
    fetch("stop", {method: "POST", credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      stopSound();
      finished = true;
      var p = document.createElement("p");
      p.className = "ended";
      p.textContent = "Session ended.";
      document.body.replaceChildren(p);
    }).catch(function (e) {
      button.disabled = false;
      say("Could not end the session: " + e.message);
    });
  });

  // -- downloads ---------------------------------------------------------------------------------
  var panel = $("panel"), timer = null;
  function size(n) {
    return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
  }
  function listDownloads() {
    fetch("downloads", {credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (data) {
      var items = data.downloads.map(function (d) {
        var li = document.createElement("li");
        if (d.complete) {
          var a = document.createElement("a");
          a.href = "downloads/" + encodeURIComponent(d.name);
          a.download = d.name;
          a.textContent = d.name;  // text, never markup: the name comes from the guest
          li.appendChild(a);
        } else {
          li.textContent = d.name + " (downloading)";
        }
        li.appendChild(document.createTextNode(" " + size(d.size)));
        return li;
      });
      if (!items.length) {
        var none = document.createElement("li");
        none.textContent = "No downloads yet.";
        items.push(none);
      }
      $("files").replaceChildren.apply($("files"), items);
    }).catch(function (e) { say("Downloads: " + e.message); });
  }
  $("downloads").addEventListener("click", function () {
    panel.hidden = !panel.hidden;
    clearInterval(timer);
    if (!panel.hidden) { listDownloads(); timer = setInterval(listDownloads, 2000); }
  });

  // -- uploads -----------------------------------------------------------------------------------
  function upload(file) {
    say("Uploading " + file.name + "…");
    fetch("uploads?name=" + encodeURIComponent(file.name), {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/octet-stream"}, body: file}).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) { throw new Error(body.message || body.detail || ("HTTP " + r.status)); }
        say("Uploaded to ~/Uploads/" + body.name);
      });
    }).catch(function (e) { say("Upload failed: " + e.message); });
  }
  $("upload").addEventListener("change", function (e) {
    Array.prototype.forEach.call(e.target.files, upload);
    e.target.value = "";
  });
  function dropTarget(doc) {
    doc.addEventListener("dragover", function (e) {
      if (e.dataTransfer && Array.prototype.indexOf.call(e.dataTransfer.types, "Files") >= 0) {
        e.preventDefault();
        document.body.classList.add("dropping");
      }
    });
    doc.addEventListener("dragleave", function () { document.body.classList.remove("dropping"); });
    doc.addEventListener("drop", function (e) {
      document.body.classList.remove("dropping");
      if (e.dataTransfer && e.dataTransfer.files.length) {
        e.preventDefault();
        Array.prototype.forEach.call(e.dataTransfer.files, upload);
      }
    });
  }

  // -- sound: raw s16le 48 kHz stereo from the guest, scheduled back to back ---------------------------
  var sound = null;
  function stopSound() {
    if (sound) { sound.ws.close(); sound.ctx.close(); sound = null; }
    $("sound").textContent = "Sound off";
  }
  function startSound() {
    var ctx = new AudioContext({sampleRate: 48000, latencyHint: "interactive"});
    var url = location.href.replace(/^http/, "ws").replace(/[^/]*$/, "") + "sound";
    var ws = new WebSocket(url, "binary");
    ws.binaryType = "arraybuffer";
    var at = 0;
    ws.onmessage = function (e) {
      var pcm = new Int16Array(e.data), frames = pcm.length >> 1;
      if (!frames) { return; }
      var buf = ctx.createBuffer(2, frames, 48000), l = buf.getChannelData(0), r = buf.getChannelData(1);
      for (var i = 0; i < frames; i++) { l[i] = pcm[2 * i] / 32768; r[i] = pcm[2 * i + 1] / 32768; }
      var src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(ctx.destination);
      // Late by more than 200 ms (a stall): drop the backlog rather than play it late.
      if (at < ctx.currentTime || at > ctx.currentTime + 0.2) { at = ctx.currentTime + 0.03; }
      src.start(at);
      at += buf.duration;
    };
    ws.onclose = function () { if (sound && sound.ws === ws) { stopSound(); } };
    sound = {ctx: ctx, ws: ws};
    $("sound").textContent = "Sound on";
  }
  $("sound").addEventListener("click", function () { if (sound) { stopSound(); } else { startSound(); } });

  fetch("features", {credentials: "same-origin"}).then(function (r) { return r.ok ? r.json() : null; })
    .then(function (f) {
      if (!f || finished) { return; }
      $("downloads").hidden = !f.downloads.enabled;
      $("upload-label").hidden = !f.uploads.enabled;
      $("sound").hidden = !f.audio;
      if (f.uploads.enabled) {
        dropTarget(document);
        var hook = function () { try { dropTarget(frame.contentDocument); } catch (e) { /* not loaded */ } };
        frame.addEventListener("load", hook);
        hook();
      }
    }).catch(function () { /* an older server: just the End button */ });
})();
