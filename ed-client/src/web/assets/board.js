"use strict";
// The board: one row per vehicle in the user's scope, pushed once a second.
(async function () {
  const me = await ed.me();
  if (!me) return;
  const body = document.getElementById("vehicles");
  const status = document.getElementById("status");
  const banner = document.getElementById("banner");
  const empty = document.getElementById("empty");
  window.edBoard = { updates: 0, vehicles: [] };

  function row(v, now) {
    const link = ed.el("a", { href: "/vehicle?id=" + encodeURIComponent(v.id) }, v.id);
    const online = v.online ? ed.el("span", { class: "online" }, "online")
      : ed.el("span", { class: "offline-text" }, "offline");
    // Bearer health as the ingest sees it: how many, their round-trip times, downlink loss.
    const bearers = (v.bearers || []);
    const health = bearers.length
      ? ed.el("div", { class: "bearers" }, `${bearers.length} bearer${bearers.length > 1 ? "s" : ""}: RTT ` +
        bearers.map(b => b.rtt_ms.toFixed(0)).join(", ") + " ms" +
        `, loss ${(100 * Math.max(...bearers.map(b => b.loss))).toFixed(1)} %`)
      : "";
    const vit = v.vitals || {};
    const nibp = vit.nibp_sys && vit.nibp_dia
      ? `${vit.nibp_sys.value.toFixed(0)}/${vit.nibp_dia.value.toFixed(0)} ${ed.unit(vit.nibp_sys.unit)}` : "–";
    const highs = (v.events || []).filter(e => e.severity === "high");
    const alerts = ed.el("td", {}, ...(highs.length
      ? highs.slice(-3).map(e => ed.el("div", { class: e.acked_by ? "" : "alert-high" },
        `${e.code} ${ed.time(e.time)} ` + (e.acked_by ? `(acknowledged by ${e.acked_by})` : "UNACKNOWLEDGED")))
      : ["–"]));
    const track = ed.el("canvas", { width: "160", height: "80", class: "track" });
    ed.drawTrack(track, v.track, me.tile_url);
    const pos = v.position
      ? `${v.position.lat.toFixed(4)}, ${v.position.lon.toFixed(4)}` + (v.position.speed != null ? ` · ${(v.position.speed * 3.6).toFixed(0)} km/h` : "")
      : "–";
    return ed.el("tr", { "data-vehicle": v.id },
      ed.el("td", {}, link), ed.el("td", {}, online, health), ed.el("td", {}, ed.age(v.last_seen, now)),
      ed.el("td", {}, ed.vital(vit.hr, 0)), ed.el("td", {}, ed.vital(vit.spo2, 0)),
      ed.el("td", {}, nibp), alerts, ed.el("td", {}, ed.el("div", {}, pos), track));
  }

  function render(b) {
    window.edBoard.updates += 1;
    window.edBoard.vehicles = b.vehicles.map(v => v.id);
    status.textContent = "updated " + ed.time(b.now);
    banner.classList.toggle("hidden", b.connected);
    banner.textContent = b.connected ? "" : "The ingest is not reachable: the board is not current.";
    body.replaceChildren(...b.vehicles.map(v => row(v, b.now)));
    window.edBoard.unacknowledged = b.vehicles.reduce((n, v) => n + ed.unacknowledged(v.events, b.now).length, 0);
    banner.classList.toggle("hidden", b.connected && window.edBoard.unacknowledged === 0);
    if (b.connected && window.edBoard.unacknowledged > 0) {
      banner.textContent = `${window.edBoard.unacknowledged} alert(s) not acknowledged: open the vehicle to acknowledge.`;
    }
    empty.classList.toggle("hidden", b.vehicles.length > 0);
  }

  // Unacknowledged alerts sound again every 5 s, on every screen, until someone acknowledges.
  setInterval(() => { if (window.edBoard.unacknowledged > 0) ed.beep(); }, 5000);

  const es = new EventSource("/api/board/events");
  es.addEventListener("board", ev => render(JSON.parse(ev.data)));
  es.onerror = () => { status.textContent = "reconnecting…"; };
})();
