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
  // Draws a vehicle's track, north up: on map tiles when a tile source is configured (fitted
  // to the track, Web Mercator, images cached and drawn when loaded), else plain.
  drawTrack(canvas, track, tileUrl) {
    canvas.edTrack = { track, tileUrl };
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, canvas.width, canvas.height);
    g.strokeStyle = "#ccc";
    g.strokeRect(0.5, 0.5, canvas.width - 1, canvas.height - 1);
    if (!track || track.length === 0) return;
    if (tileUrl) return ed.drawOnTiles(canvas, g, track, tileUrl);
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
    ed.polyline(g, track, ([lat, lon]) => [pad + (lon - minLon) * kx * scale,
      canvas.height - pad - (lat - minLat) * scale]);
  },
  polyline(g, track, xy) {
    g.strokeStyle = "#1b5fa8"; g.lineWidth = 2; g.beginPath();
    track.forEach((p, i) => { const [x, y] = xy(p); if (i) g.lineTo(x, y); else g.moveTo(x, y); });
    g.stroke();
    const [x, y] = xy(track[track.length - 1]);
    g.fillStyle = "#b00020"; g.beginPath(); g.arc(x, y, 5, 0, 2 * Math.PI); g.fill();
  },
  tiles: new Map(),                           // url -> Image, the newest 256
  tileStats: { requested: 0, loaded: 0, failed: 0 },
  drawOnTiles(canvas, g, track, tileUrl) {
    const world = z => 256 * Math.pow(2, z);
    const px = (lat, lon, z) => {
      const s = Math.sin(Math.max(-85, Math.min(85, lat)) * Math.PI / 180);
      return [(lon + 180) / 360 * world(z), (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * world(z)];
    };
    const pad = 16;
    let z = 17;
    for (; z > 3; z--) {
      const pts = track.map(([lat, lon]) => px(lat, lon, z));
      const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
      if (Math.max(...xs) - Math.min(...xs) <= canvas.width - 2 * pad &&
          Math.max(...ys) - Math.min(...ys) <= canvas.height - 2 * pad) break;
    }
    const pts = track.map(([lat, lon]) => px(lat, lon, z));
    const cx = (Math.min(...pts.map(p => p[0])) + Math.max(...pts.map(p => p[0]))) / 2;
    const cy = (Math.min(...pts.map(p => p[1])) + Math.max(...pts.map(p => p[1]))) / 2;
    const ox = cx - canvas.width / 2, oy = cy - canvas.height / 2;
    const n = Math.pow(2, z);
    for (let tx = Math.floor(ox / 256); tx <= Math.floor((ox + canvas.width) / 256); tx++) {
      for (let ty = Math.floor(oy / 256); ty <= Math.floor((oy + canvas.height) / 256); ty++) {
        if (tx < 0 || ty < 0 || tx >= n || ty >= n) continue;
        const url = tileUrl.replace("{z}", z).replace("{x}", tx).replace("{y}", ty);
        let img = ed.tiles.get(url);
        if (!img) {
          img = new Image();
          img.onload = () => { ed.tileStats.loaded++; ed.redrawTracks(); };
          img.onerror = () => { ed.tileStats.failed++; };
          img.src = url;
          ed.tileStats.requested++;
          ed.tiles.set(url, img);
          if (ed.tiles.size > 256) ed.tiles.delete(ed.tiles.keys().next().value);
        }
        if (img.complete && img.naturalWidth > 0) g.drawImage(img, tx * 256 - ox, ty * 256 - oy);
      }
    }
    ed.polyline(g, track, ([lat, lon]) => { const [x, y] = px(lat, lon, z); return [x - ox, y - oy]; });
    g.fillStyle = "rgba(255,255,255,0.7)"; g.fillRect(0, canvas.height - 14, canvas.width, 14);
    g.fillStyle = "#333"; g.font = "10px system-ui, sans-serif";
    g.fillText("map: " + new URL(tileUrl.replace(/[{}]/g, "")).host, 3, canvas.height - 3);
  },
  redrawTracks() {
    for (const c of document.querySelectorAll("canvas")) {
      if (c.edTrack) ed.drawTrack(c, c.edTrack.track, c.edTrack.tileUrl);
    }
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
