"use strict";
// Tells why the previous attempt was refused (the server redirects here with a flag).
(function () {
  const q = new URLSearchParams(location.search);
  const m = document.getElementById("message");
  if (q.has("failed")) m.textContent = "Unknown user or wrong password.";
  if (q.has("locked")) m.textContent = "Too many failed attempts: wait a minute and try again.";
})();
