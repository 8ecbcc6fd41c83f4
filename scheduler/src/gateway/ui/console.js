// Honua console: refreshes the page's live region (#live) every data-poll milliseconds
// (at most 2 s) while the tab is visible. The server answers the x-console-fragment
// request with that region only. No other script runs on the console's pages.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live) return;
  var every = Math.min(parseInt(live.getAttribute("data-poll"), 10) || 2000, 2000);
  var busy = false;
  function refresh() {
    if (document.hidden || busy) return;
    busy = true;
    fetch(window.location.href, {
      headers: { "x-console-fragment": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (r) {
        if (r.redirected || !r.ok) throw new Error("refresh: " + r.status);
        return r.text();
      })
      .then(function (html) {
        // The focused element keeps its focus when it is outside the live region.
        if (!live.contains(document.activeElement)) {
          // A choice made in a list (the step to retry from) survives the refresh.
          var kept = {};
          live.querySelectorAll("select[id]").forEach(function (s) {
            kept[s.id] = s.value;
          });
          live.innerHTML = html;
          Object.keys(kept).forEach(function (id) {
            var s = document.getElementById(id);
            if (s && s.querySelector('option[value="' + CSS.escape(kept[id]) + '"]')) {
              s.value = kept[id];
            }
          });
        }
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {
        document.body.setAttribute("data-refresh-failed", String(Date.now()));
      })
      .then(function () {
        busy = false;
      });
  }
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh();
  });
})();
