"use strict";
// The vehicle view: every waveform as a sweeping trace on a millimetre grid (25 or 50 mm/s,
// 5/10/20 mm/mV, 1 mV calibration pulse), vitals with their time of measurement, position,
// clinical events with acknowledgement. Data arrives as server-sent events whose ids are the
// ingest's cursors: a reconnecting EventSource resumes after the last one it got.
(async function () {
  const me = await ed.me();
  if (!me) return;
  const params = new URLSearchParams(location.search);
  const vehicle = params.get("id") || "";
  document.getElementById("title").textContent = vehicle;
  document.title = "ED view: " + vehicle;

  const PPMM = me.pixels_per_mm;          // CSS pixels per millimetre of this screen
  const MISSING = -2147483648;            // a sample never received
  const KEEP_S = 60;                      // seconds of samples held per stream
  const LEAD_MM = 35;                     // height of one lead's strip
  const MARGIN_MM = 15;                   // left margin holding label and calibration pulse
  const ERASE_S = 0.25;                   // blank bar ahead of the sweep
  const LATENCIES = 20000;                // latency samples kept for the page's statistics
  const MV_UNITS = { "mV": 1, "uV": 0.001, "µV": 0.001, "V": 1000 };
  const LEAD_ORDER = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"];

  const view = { speed: 25, gain: 10, rewindMs: null };
  // The page's own record of what it received, read by tests and shown to the user.
  const state = window.edState = {
    vehicle, streams: {}, synced: false, cursor: null, messages: 0, lagged: 0,
    latencies: [], latencyNext: 0, gaps: 0, gapsClosed: 0, vitals: {}, events: [],
    position: null, track: [], online: null, connected: false, errors: 0,
  };
  const pendingLatency = [];

  const waves = document.getElementById("waves");
  const status = document.getElementById("status");
  const banner = document.getElementById("banner");

  function fnv(h, v) {
    for (let b = 0; b < 4; b++) {
      h ^= (v >>> (8 * b)) & 0xff;
      h = Math.imul(h, 16777619) >>> 0;
    }
    return h;
  }

  function addStream(m) {
    if (state.streams[m.key] || !m.waveform) return;
    const w = m.waveform, nch = w.channels.length;
    if (!(w.rate > 0) || nch === 0) return;
    const cap = Math.ceil(w.rate * KEEP_S);
    const s = {
      key: m.key, name: m.name, rate: w.rate, channels: w.channels, nch, cap,
      data: new Int32Array(cap * nch).fill(MISSING), slot: new Float64Array(cap).fill(-1),
      late: new Uint8Array(cap), maxIndex: -1, base: null, contig: 0, hash: 2166136261,
      received: 0, duplicates: 0, backfilled: 0, gaps: 0, holes: 0, anchor: null, newestCap: 0,
    };
    state.streams[m.key] = s;
    layout(s);
  }

  // The standard 12 leads (names matched without regard to case: PhysioNet writes "avr")
  // in the usual 4 columns of 3 (I II III | aVR aVL aVF | V1-V3 | V4-V6); any other channel
  // (Frank leads, pleth) below at full width.
  function standardLead(name) {
    return LEAD_ORDER.find(n => n.toLowerCase() === String(name).toLowerCase());
  }
  function layout(s) {
    const group = ed.el("div", { class: "wave-group" }, ed.el("h3", {}, s.name));
    const byLead = LEAD_ORDER.map(n => s.channels.findIndex(c => standardLead(c.name) === n));
    const twelve = byLead.every(i => i >= 0);
    s.canvases = [];
    const add = (box, ch, cols) => {
      const name = standardLead(s.channels[ch].name) || s.channels[ch].name;
      const c = ed.el("canvas", { class: "lead", "data-stream": s.key, "data-lead": name });
      c.channel = ch; c.cols = cols; c.label = name;
      box.append(c);
      s.canvases.push(c);
    };
    if (twelve) {
      const grid12 = ed.el("div", { class: "leads" });
      grid12.style.gridTemplateColumns = "repeat(4, 1fr)";
      grid12.style.gridTemplateRows = "repeat(3, auto)";
      grid12.style.gridAutoFlow = "column";
      for (const ch of byLead) add(grid12, ch, 4);
      group.append(grid12);
    }
    const rest = ed.el("div", { class: "leads" });
    s.channels.forEach((c, ch) => { if (!twelve || !byLead.includes(ch)) add(rest, ch, 1); });
    group.append(rest);
    waves.append(group);
  }

  function onWave(m) {
    const s = state.streams[m.key];
    if (!s) return;
    const nch = s.nch, cap = s.cap;
    const endCap = m.cap + (m.n / s.rate) * 1000;
    if (view.rewindMs !== null && m.cap > view.rewindMs + windowSeconds(s) * 1000) return;
    if (s.base === null) s.base = m.first;
    for (let j = 0; j < m.n; j++) {
      const i = m.first + j;
      if (i <= s.maxIndex - cap) continue; // older than what the ring holds
      const slot = i % cap;
      if (s.slot[slot] === i) { s.duplicates++; continue; }
      s.slot[slot] = i;
      for (let ch = 0; ch < nch; ch++) s.data[slot * nch + ch] = m.s[j * nch + ch];
      s.late[slot] = m.late || i < s.maxIndex ? 1 : 0;
      if (s.late[slot]) s.backfilled++;
      s.received++;
    }
    const last = m.first + m.n - 1;
    if (last > s.maxIndex) {
      // Slots between the old newest and this chunk are holes until data fills them.
      if (s.maxIndex >= 0 && m.first > s.maxIndex + 1) s.holes++;
      for (let i = Math.max(s.maxIndex + 1, last - cap + 1); i < m.first; i++) s.slot[i % cap] = -1;
      s.maxIndex = last;
      s.anchor = { index: m.first, cap: m.cap };
      s.newestCap = endCap;
    }
    while (true) {
      const i = s.base + s.contig;
      if (i > s.maxIndex) break;
      const slot = i % cap;
      if (s.slot[slot] !== i) break;
      for (let ch = 0; ch < nch; ch++) s.hash = fnv(s.hash, s.data[slot * nch + ch]);
      s.contig++;
    }
    if (state.synced && !m.late) pendingLatency.push(m.cap_ingest + (m.n / s.rate) * 1000);
  }

  function onMessage(ev) {
    const m = JSON.parse(ev.data);
    state.messages++;
    if (ev.lastEventId) state.cursor = ev.lastEventId;
    switch (m.t) {
      case "stream": addStream(m); break;
      case "wave": onWave(m); break;
      case "vitals":
        for (const v of m.values) {
          const old = state.vitals[v.mdc];
          if (!old || old.time <= m.cap) state.vitals[v.mdc] = { ...v, time: m.cap };
        }
        renderVitals();
        break;
      case "loc":
        state.track.push([m.lat, m.lon]);
        if (state.track.length > 300) state.track.shift();
        state.position = m;
        renderPosition();
        break;
      case "event": onEvent(m); break;
      case "gap": state.gaps++; if (state.streams[m.key]) state.streams[m.key].gaps++; break;
      case "gap_closed": state.gapsClosed++; break;
      case "sync": state.synced = true; break;
      case "lagged": state.lagged++; break;
    }
  }

  // ---- the event stream -------------------------------------------------------------------
  let source = null;
  function open(query) {
    if (source) source.close();
    const url = `/api/vehicles/${encodeURIComponent(vehicle)}/events` + (query ? "?" + query : "");
    source = new EventSource(url);
    source.onmessage = onMessage;
    source.onopen = () => { state.connected = true; status.textContent = "live"; };
    source.onerror = () => {
      state.connected = false;
      state.errors++;
      status.textContent = "reconnecting…";
      // The browser retries by itself (with Last-Event-ID) unless the server refused the
      // stream; then reopen after the last cursor in a few seconds.
      if (source.readyState === EventSource.CLOSED) {
        const cursor = state.cursor;
        setTimeout(() => open(cursor ? "after=" + cursor : query), 3000);
      }
    };
  }

  function reset() {
    state.streams = {};
    state.synced = false;
    state.cursor = null;
    waves.replaceChildren();
  }

  document.getElementById("speed").onchange = e => { view.speed = Number(e.target.value); };
  document.getElementById("gain").onchange = e => { view.gain = Number(e.target.value); };
  document.getElementById("rewind").onclick = () => {
    const v = document.getElementById("from").value;
    const t = v ? new Date(v).getTime() : NaN;
    if (!Number.isFinite(t)) return;
    view.rewindMs = t;
    reset();
    open("from=" + t);
  };
  document.getElementById("live").onclick = () => { view.rewindMs = null; reset(); open(""); };

  // ---- drawing -----------------------------------------------------------------------------
  const grids = new Map();
  function grid(w, h, dpr) {
    const key = `${w}x${h}x${dpr}`;
    if (grids.has(key)) return grids.get(key);
    const c = document.createElement("canvas");
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    const g = c.getContext("2d");
    g.scale(dpr, dpr);
    g.fillStyle = "#fff"; g.fillRect(0, 0, w, h);
    for (const [every, colour, width] of [[1, "#f6d0d0", 0.5], [5, "#e08a8a", 1]]) {
      g.strokeStyle = colour; g.lineWidth = width; g.beginPath();
      for (let mm = 0; mm * PPMM <= w; mm += every) { g.moveTo(mm * PPMM, 0); g.lineTo(mm * PPMM, h); }
      for (let mm = 0; mm * PPMM <= h; mm += every) { g.moveTo(0, mm * PPMM); g.lineTo(w, mm * PPMM); }
      g.stroke();
    }
    grids.set(key, c);
    return c;
  }

  // 1 mV calibration pulse, 200 ms wide at the chosen speed, in the left margin.
  function calibrationPulse(g, y0, pxPerMv) {
    const x0 = 3 * PPMM, pw = 0.2 * view.speed * PPMM;
    g.strokeStyle = "#000"; g.lineWidth = 1.5; g.beginPath();
    g.moveTo(PPMM, y0); g.lineTo(x0, y0); g.lineTo(x0, y0 - pxPerMv);
    g.lineTo(x0 + pw, y0 - pxPerMv); g.lineTo(x0 + pw, y0); g.lineTo(x0 + pw + 2 * PPMM, y0);
    g.stroke();
  }

  function windowSeconds(s) {
    const w = Math.max(0, ...(s.canvases || []).map(c => c.clientWidth)) || 800;
    return Math.max(1, (w - MARGIN_MM * PPMM) / (view.speed * PPMM));
  }

  function drawLead(s, canvas, head) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.floor(canvas.parentElement.clientWidth / canvas.cols);
    const h = Math.round(LEAD_MM * PPMM);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
    }
    const g = canvas.getContext("2d");
    g.setTransform(1, 0, 0, 1, 0, 0);
    g.drawImage(grid(w, h, dpr), 0, 0);
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    const ch = canvas.channel, info = s.channels[ch];
    const y0 = h / 2;
    const margin = MARGIN_MM * PPMM;
    const mvPerUnit = MV_UNITS[info.unit];
    g.fillStyle = "#1a4fa0"; g.font = "12px system-ui, sans-serif";
    g.fillText(canvas.label, 2, 13);
    g.lineWidth = 1.5; g.lineJoin = "round";
    let scaleY;
    if (mvPerUnit !== undefined) {
      const pxPerMv = view.gain * PPMM;
      scaleY = phys => y0 - phys * mvPerUnit * pxPerMv;
      calibrationPulse(g, y0, pxPerMv);
    } else {
      g.fillText(info.unit, 2, 27);
    }
    const W = Math.max(1, (w - MARGIN_MM * PPMM) / (view.speed * PPMM));
    const n = Math.floor((W - ERASE_S) * s.rate);
    const first = Math.max(head - n + 1, s.maxIndex - s.cap + 1, 0);
    const gain = info.gain || 1, baseline = info.baseline || 0;
    if (scaleY === undefined) {
      // Not a voltage: fit the visible window (a pleth or a capnogram has no mm/mV).
      let lo = Infinity, hi = -Infinity;
      for (let i = first; i <= head; i++) {
        const slot = i % s.cap;
        if (s.slot[slot] !== i) continue;
        const v = s.data[slot * s.nch + ch];
        lo = Math.min(lo, v); hi = Math.max(hi, v);
      }
      const span = hi > lo ? hi - lo : 1, mid = (hi + lo) / 2;
      scaleY = phys => y0 - ((phys * gain + baseline - mid) / span) * h * 0.8;
    }
    const pxPerS = view.speed * PPMM;
    // Received samples in black, back-filled (late) ones in orange on a pale band; a sample
    // never received breaks the line. No point is ever invented between two samples.
    const paths = { live: new Path2D(), late: new Path2D() };
    const bands = [];
    let prev = null, prevKind = null;
    for (let i = first; i <= head; i++) {
      const slot = i % s.cap;
      if (s.slot[slot] !== i) { prev = null; prevKind = null; continue; }
      const x = margin + ((i / s.rate) % W) * pxPerS;
      const y = scaleY((s.data[slot * s.nch + ch] - baseline) / gain);
      const kind = s.late[slot] ? "late" : "live";
      if (kind === "late") {
        const band = bands[bands.length - 1];
        if (band && x >= band[1] && x - band[1] < 2) band[1] = x; else bands.push([x, x]);
      }
      if (prev && x >= prev.x) {
        if (prevKind !== kind) paths[kind].moveTo(prev.x, prev.y);
        paths[kind].lineTo(x, y);
        prevKind = kind;
      } else {
        prevKind = null;
      }
      prev = { x, y };
    }
    g.fillStyle = "rgba(255, 160, 0, 0.18)";
    for (const [x0, x1] of bands) g.fillRect(x0 - 1, 0, x1 - x0 + 2, h);
    g.strokeStyle = "#000"; g.stroke(paths.live);
    g.strokeStyle = "#d35400"; g.stroke(paths.late);
  }

  function headIndex(s) {
    if (view.rewindMs === null || !s.anchor) return s.maxIndex;
    const end = view.rewindMs + windowSeconds(s) * 1000;
    const i = s.anchor.index + Math.floor(((end - s.anchor.cap) / 1000) * s.rate);
    return Math.min(s.maxIndex, i);
  }

  function frame() {
    const now = performance.timeOrigin + performance.now();
    for (const end of pendingLatency) {
      state.latencies[state.latencyNext % LATENCIES] = now - end;
      state.latencyNext++;
    }
    pendingLatency.length = 0;
    for (const s of Object.values(state.streams)) {
      if (s.maxIndex < 0) continue;
      const head = headIndex(s);
      for (const c of s.canvases) drawLead(s, c, head);
    }
    renderBanner(now);
    requestAnimationFrame(frame);
  }

  // ---- the side panels ---------------------------------------------------------------------
  function percentile(xs, p) {
    if (xs.length === 0) return NaN;
    const a = Float64Array.from(xs).sort();
    return a[Math.min(a.length - 1, Math.floor(p * a.length))];
  }
  setInterval(() => {
    const recent = state.latencies.slice(-1000);
    document.getElementById("latency").textContent = recent.length
      ? `capture to screen: p50 ${percentile(recent, 0.5).toFixed(0)} ms, p99 ${percentile(recent, 0.99).toFixed(0)} ms`
      : "–";
  }, 1000);

  function renderVitals() {
    const now = Date.now();
    const rows = Object.values(state.vitals).map(v => ed.el("tr", {},
      ed.el("th", {}, v.label), ed.el("td", {}, `${Number(v.value).toFixed(v.value % 1 ? 1 : 0)} ${ed.unit(v.unit)}`),
      ed.el("td", {}, `${ed.time(v.time)} (${ed.age(v.time, now)})`)));
    document.querySelector("#vitals tbody").replaceChildren(...rows);
  }

  function renderPosition() {
    const p = state.position;
    document.getElementById("position").textContent =
      `${p.lat.toFixed(5)}, ${p.lon.toFixed(5)} · ${(p.speed * 3.6).toFixed(0)} km/h · fix ${p.fix}, ${p.satellites} sat · ${ed.time(p.cap)}`;
    ed.drawTrack(document.getElementById("track"), state.track, me.tile_url);
  }

  // ---- clinical events and the alarm ---------------------------------------------------------
  const alarm = document.getElementById("alarm");
  function onEvent(m) {
    const e = { ...m, acked: null, arrived: performance.timeOrigin + performance.now() };
    state.events.push(e);
    if (state.events.length > 50) state.events.shift();
    renderEvents();
  }

  async function acknowledge(e) {
    const r = await fetch(`/api/vehicles/${encodeURIComponent(vehicle)}/ack`, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ key: e.key, seq: e.seq }),
    });
    const body = r.ok ? await r.json() : null;
    e.acked = {
      time: Date.now(), by: me.user, ok: r.ok,
      delivered: body ? body.delivered : false, held: body ? body.held : false,
    };
    renderEvents();
  }

  function openAlarms() {
    const recent = Date.now() - 30 * 60 * 1000;
    return state.events.filter(e => e.severity === "high" && !e.acked && e.cap > recent);
  }

  // The 10 s of ECG before the newest open alarm, from the ingest's history, drawn at the
  // chosen speed and gain (lead II when the stream has one).
  const strip = { alert: null };
  async function showAlarmStrip(e) {
    const id = `${e.key}/${e.seq}`;
    if (strip.alert === id) return;
    strip.alert = id;
    const s = Object.values(state.streams)[0];
    if (!s) return;
    const ch = Math.max(0, s.channels.findIndex(c => standardLead(c.name) === "II"));
    const url = `/api/vehicles/${encodeURIComponent(vehicle)}/history?key=${encodeURIComponent(s.key)}` +
      `&from=${e.cap - 10000}&to=${e.cap}`;
    // The alert travels ahead of the ECG frame it falls in (events go first), and frames a
    // bearer lost are still on their way: ask again until the history reaches the alert's
    // time without gaps, for 5 s at most; what is still missing then is drawn as a break.
    let hist = null, samples = new Map();
    for (let attempt = 0; attempt < 10; attempt++) {
      const r = await fetch(url, { credentials: "same-origin" });
      if (!r.ok) return;
      hist = await r.json();
      samples = new Map();
      let newest = -Infinity;
      for (const m of hist.records) {
        if (m.t !== "wave") continue;
        // Frames overlap the range's ends: keep exactly the 10 s before the alert.
        for (let j = 0; j < m.n; j++) {
          const t = m.cap + (j / s.rate) * 1000;
          newest = Math.max(newest, t);
          if (t >= e.cap - 10000 && t <= e.cap) samples.set(m.first + j, m.s[j * s.nch + ch]);
        }
      }
      // Done when the ECG reaches the alert and no part of it is still being recovered.
      if ((newest >= e.cap - 1000 / s.rate && hist.missing.length === 0) || hist.truncated) break;
      await new Promise(done => setTimeout(done, 500));
    }
    if (strip.alert !== id) return; // a newer alarm took the strip meanwhile
    const idx = [...samples.keys()].sort((a, b) => a - b);
    // The strip and the live trace must show the same samples where both hold them.
    let agree = 0, differ = 0;
    for (const i of idx) {
      const slot = i % s.cap;
      if (s.slot[slot] !== i) continue;
      if (s.data[slot * s.nch + ch] === samples.get(i)) agree++; else differ++;
    }
    state.alarmStrip = {
      alert: id, samples: samples.size, truncated: hist.truncated, missing: hist.missing.length,
      first: idx.length ? idx[0] : null, last: idx.length ? idx[idx.length - 1] : null,
      agree, differ, channel: ch,
    };
    const canvas = document.getElementById("alarm-canvas");
    const info = s.channels[ch];
    const w = Math.round(MARGIN_MM * PPMM + 10 * view.speed * PPMM), h = Math.round(LEAD_MM * PPMM);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
    const g = canvas.getContext("2d");
    g.drawImage(grid(w, h, dpr), 0, 0);
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    const y0 = h / 2, pxPerMv = view.gain * PPMM, mv = MV_UNITS[info.unit] || 1;
    calibrationPulse(g, y0, pxPerMv);
    const label = standardLead(info.name) || info.name;
    g.fillStyle = "#1a4fa0"; g.font = "12px system-ui, sans-serif"; g.fillText(label, 2, 13);
    const t0 = idx.length ? idx[0] : 0, end = idx.length ? idx[idx.length - 1] : -1;
    const x = i => MARGIN_MM * PPMM + ((i - t0) / s.rate) * view.speed * PPMM;
    const y = i => y0 - ((samples.get(i) - (info.baseline || 0)) / (info.gain || 1)) * mv * pxPerMv;
    g.strokeStyle = "#000"; g.lineWidth = 1.5; g.beginPath();
    let drawing = false;
    for (let i = t0; i <= end; i++) {
      if (!samples.has(i)) { drawing = false; continue; }
      if (drawing) g.lineTo(x(i), y(i)); else g.moveTo(x(i), y(i));
      drawing = true;
    }
    g.stroke();
    document.getElementById("alarm-strip-title").textContent =
      `${s.name} ${label}: the 10 s before the ${e.code} alert at ${ed.time(e.cap)}` +
      (hist.missing.length ? " (with gaps)" : "");
    document.getElementById("alarm-strip").classList.remove("hidden");
  }

  function renderEvents() {
    const items = state.events.slice().reverse().map(e => {
      const li = ed.el("li", { class: e.severity === "high" ? "alert-high" : "" },
        `${ed.time(e.cap)} ${e.code}` + (e.text ? `: ${e.text}` : ""));
      if (e.acked) {
        li.append(ed.el("div", {}, `acknowledged by ${e.acked.by} at ${ed.time(e.acked.time)}` +
          (!e.acked.ok ? " (failed)" : e.acked.delivered === null ? "" :
            e.acked.delivered ? " (delivered to the crew)" :
            e.acked.held ? " (the vehicle is offline: it gets this when it reconnects)" : " (not delivered)")));
      } else {
        const b = ed.el("button", { type: "button" }, "Acknowledge");
        b.onclick = () => acknowledge(e);
        li.append(" ", b);
      }
      return li;
    });
    document.getElementById("events").replaceChildren(...items);
    const open = openAlarms();
    alarm.classList.toggle("hidden", open.length === 0);
    if (open.length) {
      const e = open[open.length - 1];
      const b = ed.el("button", { type: "button" }, "Acknowledge");
      b.onclick = () => acknowledge(e);
      alarm.replaceChildren(`${e.code} ALERT ${ed.time(e.cap)}` + (e.text ? `: ${e.text}` : ""), b);
      showAlarmStrip(e);
    } else {
      document.getElementById("alarm-strip").classList.add("hidden");
    }
  }
  // An unacknowledged alert sounds again every 5 s.
  setInterval(() => { if (openAlarms().length) ed.beep(); }, 5000);

  // ---- banners: offline, behind, rewound ---------------------------------------------------
  setInterval(async () => {
    try {
      const r = await fetch("/api/board", { credentials: "same-origin" });
      if (r.status === 401) { location.href = "/login"; return; }
      const b = await r.json();
      const v = b.vehicles.find(x => x.id === vehicle);
      state.online = v ? v.online : false;
      state.lastSeen = v ? v.last_seen : null;
      // Acknowledged on another screen: this one stops alarming too.
      let changed = false;
      for (const b of (v && v.events) || []) {
        if (!b.acked_by) continue;
        const e = state.events.find(x => x.key === b.key && x.seq === b.seq);
        if (e && !e.acked) {
          e.acked = { by: b.acked_by, time: b.acked_at, ok: true, delivered: null };
          changed = true;
        }
      }
      if (changed) renderEvents();
    } catch (_) { state.online = null; }
  }, 2000);

  function renderBanner(now) {
    let text = "", offline = false;
    if (view.rewindMs !== null) {
      text = `Rewound: showing from ${new Date(view.rewindMs).toLocaleString()}. Press Live to return.`;
    } else if (state.online === false) {
      offline = true;
      text = `Vehicle offline (last seen ${ed.age(state.lastSeen, now)}): waiting for it to reconnect.`;
    } else if (!state.connected) {
      text = "Connection to ed-web lost: reconnecting, nothing will be missed.";
    } else if (state.synced) {
      const newest = Math.max(0, ...Object.values(state.streams).map(s => s.newestCap));
      const behind = newest > 0 ? (now - newest) / 1000 : 0;
      if (behind > 5) text = `The view is ${behind.toFixed(0)} s behind the vehicle.`;
    } else {
      text = "Loading the last seconds…";
    }
    if (banner.textContent !== text) banner.textContent = text;
    banner.classList.toggle("hidden", text === "");
    banner.classList.toggle("offline", offline);
  }

  const from = Number(params.get("from"));
  if (Number.isFinite(from) && from > 0) open("from=" + from); else open("");
  requestAnimationFrame(frame);
})();
