// "End session": a POST to stop beside this page (same origin), then say so in place of the screen.
(function () {
  "use strict";
  var button = document.getElementById("end");
  var status = document.getElementById("status");
  button.addEventListener("click", function () {
    button.disabled = true;
    status.textContent = "Ending the session…";
    fetch("stop", {method: "POST", credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      var p = document.createElement("p");
      p.className = "ended";
      p.textContent = "Session ended.";
      document.body.replaceChildren(p);
    }).catch(function (e) {
      button.disabled = false;
      status.textContent = "Could not end the session: " + e.message;
    });
  });
})();
