//! The board's state: every vehicle the ingest lists, with its latest vitals, track and recent
//! clinical events, fed by `ListVehicles` and a live subscription (vitals, location, events).

use std::collections::{BTreeMap, VecDeque};

use relay_proto::codes;
use relay_proto::model::{SubscribeResponse, Vehicle, frame::Payload, subscribe_response::Record};
use serde_json::{Value, json};

use super::auth::Scope;
use super::feed::{kind_name, ms, severity_name, stream_key};

/// Track points kept per vehicle (about 5 min at one fix a second).
pub const MAX_TRACK: usize = 300;
/// Clinical events kept per vehicle.
pub const MAX_EVENTS: usize = 20;
/// Vehicles the board holds; more are dropped (least recently seen first).
pub const MAX_VEHICLES: usize = 1000;

#[derive(Debug, Default, Clone)]
struct Reading {
    value: f64,
    unit: String,
    time_ms: f64,
}

#[derive(Debug, Default)]
struct Entry {
    online: bool,
    last_seen_ms: f64,
    listed: bool,
    streams: Vec<Value>,
    bearers: Vec<Value>,
    clock_offset_ms: Option<f64>,
    vitals: BTreeMap<&'static str, Reading>,
    track: VecDeque<(f64, f64, f64)>,
    speed_mps: Option<f64>,
    events: VecDeque<Value>,
}

/// Every vehicle's state.
#[derive(Debug, Default)]
pub struct Board {
    vehicles: BTreeMap<String, Entry>,
    /// Cursor of the last live message, to resume after a reconnect.
    pub cursor: Option<u64>,
    /// Whether the ingest answered the latest refresh.
    pub connected: bool,
}

fn vital_name(mdc: u32) -> Option<&'static str> {
    Some(match mdc {
        codes::ECG_HEART_RATE => "hr",
        codes::PULS_OXIM_SAT_O2 => "spo2",
        codes::PRESS_BLD_NONINV_SYS => "nibp_sys",
        codes::PRESS_BLD_NONINV_DIA => "nibp_dia",
        codes::PRESS_BLD_NONINV_MEAN => "nibp_mean",
        codes::RESP_RATE => "rr",
        codes::AWAY_CO2_ET => "etco2",
        codes::TEMP_BODY => "temp",
        _ => return None,
    })
}

impl Board {
    /// Takes the ingest's list of vehicles.
    pub fn set_vehicles(&mut self, list: &[Vehicle]) {
        self.connected = true;
        for e in self.vehicles.values_mut() {
            e.listed = false;
        }
        for v in list {
            let e = self.entry(&v.vehicle_id);
            e.listed = true;
            e.online = v.online;
            e.last_seen_ms = ms(v.last_seen_ns);
            e.clock_offset_ms = v.clock.as_ref().map(|c| c.offset_ns as f64 / 1e6);
            e.bearers = v
                .bearers
                .iter()
                .map(|b| {
                    json!({
                        "rtt_ms": b.rtt_ns as f64 / 1e6,
                        "loss": if b.sent_packets > 0 { b.lost_packets as f64 / b.sent_packets as f64 } else { 0.0 },
                        "since": ms(b.connected_since_ns),
                    })
                })
                .collect();
            e.streams = v
                .streams
                .iter()
                .filter_map(|i| {
                    let s = i.stream.as_ref()?;
                    let d = i.descriptor.as_ref();
                    Some(json!({
                        "key": stream_key(s),
                        "kind": kind_name(s.kind),
                        "name": d.map(|d| d.name.as_str()).unwrap_or(""),
                        "rate": d.and_then(|d| d.waveform.as_ref()).map(|w| w.sample_rate_hz),
                        "channels": d.and_then(|d| d.waveform.as_ref()).map(|w| w.channels.len()),
                    }))
                })
                .collect();
        }
        self.vehicles.retain(|_, e| e.listed);
    }

    fn entry(&mut self, id: &str) -> &mut Entry {
        if !self.vehicles.contains_key(id) && self.vehicles.len() >= MAX_VEHICLES {
            let oldest = self
                .vehicles
                .iter()
                .min_by(|a, b| a.1.last_seen_ms.total_cmp(&b.1.last_seen_ms))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.vehicles.remove(&k);
            }
        }
        self.vehicles.entry(id.to_owned()).or_default()
    }

    /// Takes one live message.
    pub fn apply(&mut self, msg: &SubscribeResponse) {
        self.cursor = Some(msg.cursor);
        let Some(Record::Data(d)) = &msg.record else {
            return;
        };
        let (Some(s), Some(f)) = (&d.stream, &d.frame) else {
            return;
        };
        let time_ms = ms(f.capture_time_ns);
        let e = self.entry(&s.vehicle_id);
        e.last_seen_ms = e.last_seen_ms.max(ms(d.received_time_ns));
        match &f.payload {
            Some(Payload::Vitals(r)) => {
                for x in &r.values {
                    if let Some(name) = vital_name(x.mdc_code) {
                        let newer = e.vitals.get(name).is_none_or(|old| old.time_ms <= time_ms);
                        if newer {
                            e.vitals.insert(
                                name,
                                Reading {
                                    value: x.value,
                                    unit: x.unit.clone(),
                                    time_ms,
                                },
                            );
                        }
                    }
                }
            }
            Some(Payload::Location(l)) => {
                if e.track.back().is_none_or(|p| p.2 <= time_ms) {
                    e.speed_mps = Some(l.speed_mps);
                }
                e.track
                    .push_back((l.latitude_deg, l.longitude_deg, time_ms));
                while e.track.len() > MAX_TRACK {
                    e.track.pop_front();
                }
            }
            Some(Payload::Event(ev)) => {
                e.events.push_back(json!({
                    "key": stream_key(s),
                    "seq": f.seq,
                    "code": ev.code,
                    "severity": severity_name(ev.severity),
                    "text": ev.text,
                    "time": time_ms,
                }));
                while e.events.len() > MAX_EVENTS {
                    e.events.pop_front();
                }
            }
            _ => {}
        }
    }

    /// Records that `user` acknowledged event `seq` of stream `key` of `vehicle` through
    /// ed-web, so every screen stops alarming for it. False when the board does not hold
    /// that event (older than the last MAX_EVENTS).
    pub fn acknowledged(
        &mut self,
        vehicle: &str,
        key: &str,
        seq: u64,
        user: &str,
        at_ms: f64,
    ) -> bool {
        let Some(e) = self.vehicles.get_mut(vehicle) else {
            return false;
        };
        match e
            .events
            .iter_mut()
            .find(|ev| ev["key"] == key && ev["seq"] == seq)
        {
            Some(ev) => {
                if ev.get("acked_by").is_none() {
                    ev["acked_by"] = json!(user);
                    ev["acked_at"] = json!(at_ms);
                }
                true
            }
            None => false,
        }
    }

    /// The vehicles `scope` allows, as the page's JSON.
    pub fn snapshot(&self, scope: &Scope, now_ms: f64) -> Value {
        let vehicles: Vec<Value> = self
            .vehicles
            .iter()
            .filter(|(id, _)| scope.allows(id))
            .map(|(id, e)| {
                let vitals: serde_json::Map<String, Value> = e
                    .vitals
                    .iter()
                    .map(|(k, r)| {
                        (
                            (*k).to_owned(),
                            json!({"value": r.value, "unit": r.unit, "time": r.time_ms}),
                        )
                    })
                    .collect();
                let mut track: Vec<&(f64, f64, f64)> = e.track.iter().collect();
                track.sort_by(|a, b| a.2.total_cmp(&b.2));
                json!({
                    "id": id,
                    "online": e.online,
                    "last_seen": e.last_seen_ms,
                    "clock_offset_ms": e.clock_offset_ms,
                    "streams": e.streams,
                    "bearers": e.bearers,
                    "vitals": vitals,
                    "track": track.iter().map(|p| [p.0, p.1]).collect::<Vec<_>>(),
                    "position": track.last().map(|p| json!({"lat": p.0, "lon": p.1, "time": p.2, "speed": e.speed_mps})),
                    "events": e.events,
                })
            })
            .collect();
        json!({ "now": now_ms, "connected": self.connected, "vehicles": vehicles })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use relay_proto::model::{DataRecord, Frame, StreamRef, VitalSign, VitalsReport};

    fn vitals(vehicle: &str, t_ns: i64, hr: f64) -> SubscribeResponse {
        SubscribeResponse {
            provisional: false,
            cursor: 1,
            record: Some(Record::Data(DataRecord {
                stream: Some(StreamRef {
                    vehicle_id: vehicle.into(),
                    session_id: 1,
                    stream_id: 2,
                    kind: 3,
                }),
                frame: Some(Frame {
                    stream_id: 2,
                    seq: 0,
                    capture_time_ns: t_ns,
                    payload: Some(Payload::Vitals(VitalsReport {
                        values: vec![VitalSign {
                            mdc_code: codes::ECG_HEART_RATE,
                            label: "HR".into(),
                            value: hr,
                            unit: "/min".into(),
                        }],
                    })),
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn the_latest_measurement_wins_and_scopes_filter_vehicles() {
        let mut b = Board::default();
        b.apply(&vitals("amb-1", 2_000_000_000, 80.0));
        // A late report of an older measurement does not replace the newer one.
        b.apply(&vitals("amb-1", 1_000_000_000, 60.0));
        b.apply(&vitals("amb-2", 1_000_000_000, 70.0));
        let all = b.snapshot(&Scope::new(vec!["*".into()]), 0.0);
        assert_eq!(all["vehicles"].as_array().unwrap().len(), 2);
        assert_eq!(all["vehicles"][0]["vitals"]["hr"]["value"], 80.0);
        assert_eq!(all["vehicles"][0]["vitals"]["hr"]["time"], 2000.0);
        let one = b.snapshot(&Scope::new(vec!["amb-2".into()]), 0.0);
        assert_eq!(one["vehicles"].as_array().unwrap().len(), 1);
        assert_eq!(one["vehicles"][0]["id"], "amb-2");
    }

    #[test]
    fn the_first_acknowledgement_of_an_event_shows_on_the_board() {
        use relay_proto::model::Event;
        let mut b = Board::default();
        let mut msg = vitals("amb-1", 1, 80.0);
        if let Some(Record::Data(d)) = &mut msg.record
            && let Some(f) = &mut d.frame
        {
            f.seq = 4;
            f.payload = Some(Payload::Event(Event {
                code: "STEMI".into(),
                severity: 4,
                ..Default::default()
            }));
        }
        b.apply(&msg);
        assert!(
            !b.acknowledged("amb-1", "1:2", 5, "dr-lee", 1.0),
            "no such event"
        );
        assert!(b.acknowledged("amb-1", "1:2", 4, "dr-lee", 1.0));
        assert!(b.acknowledged("amb-1", "1:2", 4, "dr-kim", 2.0));
        let snap = b.snapshot(&Scope::new(vec!["*".into()]), 0.0);
        assert_eq!(snap["vehicles"][0]["events"][0]["acked_by"], "dr-lee");
        assert_eq!(snap["vehicles"][0]["events"][0]["acked_at"], 1.0);
    }
}
