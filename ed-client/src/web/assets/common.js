"use strict";
// Helpers shared by the pages. Everything from the network is put on the page as text
// (textContent), never as markup.
const ed = {
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  },
  time(ms) {
    if (!Number.isFinite(ms) || ms <= 0) return "–";
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  },
  age(ms, now) {
    if (!Number.isFinite(ms) || ms <= 0) return "never";
    const s = Math.max(0, (now - ms) / 1000);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  },
  async me() {
    const r = await fetch("/api/me", { credentials: "same-origin" });
    if (r.status === 401) { location.href = "/login"; return null; }
    const me = await r.json();
    const u = document.getElementById("user");
    if (u) u.textContent = me.user;
    return me;
  },
  // Draws a plain track (no map tiles): the positions scaled into the canvas, north up.
  drawTrack(canvas, track) {
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, canvas.width, canvas.height);
    g.strokeStyle = "#ccc";
    g.strokeRect(0.5, 0.5, canvas.width - 1, canvas.height - 1);
    if (!track || track.length === 0) return;
    let [minLat, maxLat, minLon, maxLon] = [Infinity, -Infinity, Infinity, -Infinity];
    for (const [lat, lon] of track) {
      minLat = Math.min(minLat, lat); maxLat = Math.max(maxLat, lat);
      minLon = Math.min(minLon, lon); maxLon = Math.max(maxLon, lon);
    }
    const midLat = (minLat + maxLat) / 2;
    const kx = Math.cos(midLat * Math.PI / 180);
    const span = Math.max((maxLon - minLon) * kx, maxLat - minLat, 1e-4);
    const pad = 8, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
    const scale = Math.min(w, h) / span;
    const x = lon => pad + (lon - minLon) * kx * scale;
    const y = lat => canvas.height - pad - (lat - minLat) * scale;
    g.strokeStyle = "#1b5fa8"; g.lineWidth = 2; g.beginPath();
    track.forEach(([lat, lon], i) => i ? g.lineTo(x(lon), y(lat)) : g.moveTo(x(lon), y(lat)));
    g.stroke();
    const [lat, lon] = track[track.length - 1];
    g.fillStyle = "#b00020"; g.beginPath(); g.arc(x(lon), y(lat), 5, 0, 2 * Math.PI); g.fill();
  },
  // A short tone (Web Audio: no sound file); silent where the browser has no audio device or
  // has not been interacted with yet, which the visual alarm covers.
  beep() {
    try {
      ed.audio = ed.audio || new AudioContext();
      const o = ed.audio.createOscillator(), g = ed.audio.createGain();
      o.frequency.value = 880; g.gain.value = 0.2;
      o.connect(g); g.connect(ed.audio.destination);
      o.start(); o.stop(ed.audio.currentTime + 0.4);
    } catch (_) { /* no audio */ }
  },
  // High-severity events of the last 30 minutes nobody has acknowledged through ed-web.
  unacknowledged(events, now) {
    return (events || []).filter(e => e.severity === "high" && !e.acked_by && e.time > now - 30 * 60 * 1000);
  },
  // UCUM codes as clinicians write them.
  unit(u) {
    return { "Cel": "°C", "mm[Hg]": "mmHg", "[degF]": "°F", "{beats}/min": "/min" }[u] || u;
  },
  vital(v, digits) {
    return v ? v.value.toFixed(digits) + " " + ed.unit(v.unit) : "–";
  },
};
