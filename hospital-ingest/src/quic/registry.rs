//! Which vehicles are online now: a vehicle counts from its accepted Hello until its last
//! bearer connection ends (it may have several at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// A live session: its connection, the serial number of its certificate, its vehicle and
/// when its Hello was accepted (UTC ns).
type LiveSession = (quinn::Connection, Option<Vec<u8>>, String, i64);

/// Acknowledgements held per offline vehicle at most (the newest are kept).
pub const MAX_HELD_ACKS: usize = 64;
/// Vehicles with held acknowledgements at most (the ones held longest are dropped).
pub const MAX_VEHICLES_WITH_HELD_ACKS: usize = 4096;

/// Where an ED's acknowledgement of a clinical event reaches one connection of a vehicle.
#[derive(Debug)]
struct AckRoute {
    vehicle: String,
    session: u64,
    tx: tokio::sync::mpsc::Sender<relay_proto::wire::v1::EventAck>,
}

/// Estimate of a vehicle's clock offset, from the clock exchanges of all its bearers.
pub(crate) type SharedClock = Arc<Mutex<relay_proto::clock::ClockFilter>>;

/// A connected vehicle: its connection count, the read budget its bearers share and its
/// clock offset estimate (forgotten when its last bearer goes: the clock may be set anew).
type Vehicle = (usize, Arc<Semaphore>, SharedClock);

/// Which vehicles have a bearer connected now (vehicle -> connection count and read budget),
/// and when the connected vehicles' certificates expire.
#[derive(Debug, Default)]
pub struct Online {
    inner: Mutex<HashMap<String, Vehicle>>,
    /// notAfter (Unix seconds) -> connections whose certificate expires then.
    expiries: Mutex<BTreeMap<i64, usize>>,
    /// Live sessions with their certificate's serial, to close revoked ones.
    live: Mutex<HashMap<u64, LiveSession>>,
    next_live: std::sync::atomic::AtomicU64,
    /// Hellos being read per vehicle: what a certificate can make the ingest hold before
    /// its sessions count.
    hellos: Mutex<HashMap<String, usize>>,
    /// Live connection id -> where event acknowledgements for it go.
    ack_routes: Mutex<HashMap<u64, AckRoute>>,
    /// Acknowledgements for vehicles that were offline when the ED gave them, sent when a
    /// bearer of the event's session connects (vehicle -> acks, oldest first).
    held_acks: Mutex<BTreeMap<String, std::collections::VecDeque<relay_proto::wire::v1::EventAck>>>,
}

impl Online {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vehicle>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn track_expiry(&self, not_after: Option<i64>, add: bool) {
        let Some(at) = not_after else { return };
        let mut e = self.expiries.lock().unwrap_or_else(|p| p.into_inner());
        if add {
            *e.entry(at).or_default() += 1;
        } else if let Some(n) = e.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                e.remove(&at);
            }
        }
        if let Some((&earliest, _)) = e.first_key_value() {
            metrics::gauge!("relay_ingest_vehicle_certificate_expiry_timestamp_seconds")
                .set(earliest as f64);
        }
    }

    /// Counts one more connection of `v` unless it already holds `max`; returns the read
    /// budget of the vehicle (`budget_bytes`, made when its first bearer connects).
    fn try_up(
        &self,
        v: &str,
        max: usize,
        budget_bytes: usize,
    ) -> Option<(Arc<Semaphore>, SharedClock)> {
        let mut m = self.lock();
        if m.get(v).is_some_and(|(n, _, _)| *n >= max) || max == 0 {
            return None;
        }
        let (n, budget, clock) = m.entry(v.to_owned()).or_insert_with(|| {
            (
                0,
                Arc::new(Semaphore::new(budget_bytes)),
                SharedClock::default(),
            )
        });
        *n += 1;
        let up = (budget.clone(), clock.clone());
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
        Some(up)
    }

    /// Connections of vehicle `v` now.
    pub fn connections(&self, v: &str) -> usize {
        self.lock().get(v).map_or(0, |(n, _, _)| *n)
    }

    /// The estimate of vehicle `v`'s clock offset while it is online.
    pub fn clock(&self, v: &str) -> Option<relay_proto::model::ClockOffset> {
        let clock = self.lock().get(v).map(|(_, _, c)| c.clone())?;
        let filter = clock.lock().unwrap_or_else(|p| p.into_inner());
        filter.estimate()
    }

    fn down(&self, v: &str) {
        let mut m = self.lock();
        if let Some((n, _, _)) = m.get_mut(v) {
            *n -= 1;
            if *n == 0 {
                m.remove(v);
            }
        }
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
    }

    /// Closes every live session whose certificate serial is in `revoked`; returns how many.
    pub fn close_revoked(&self, revoked: &[Vec<u8>]) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for (conn, serial, _, _) in live.values() {
            if serial.as_ref().is_some_and(|s| revoked.contains(s)) {
                conn.close(
                    quinn::VarInt::from_u32(relay_proto::CloseCode::Revoked.as_u32()),
                    b"certificate revoked",
                );
                closed += 1;
            }
        }
        closed
    }

    /// Closes every live session of the vehicles in `vehicles` with `code`; returns how many.
    pub fn close_vehicles(
        &self,
        vehicles: &std::collections::HashSet<Arc<str>>,
        code: relay_proto::CloseCode,
        reason: &str,
    ) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for (conn, _, vehicle, _) in live.values() {
            if vehicles.contains(vehicle.as_str()) {
                conn.close(quinn::VarInt::from_u32(code.as_u32()), reason.as_bytes());
                closed += 1;
            }
        }
        closed
    }

    /// Whether any bearer of vehicle `v` is connected.
    pub fn is_online(&self, v: &str) -> bool {
        self.lock().contains_key(v)
    }

    /// Hands `ack` to every connected bearer of `vehicle` in the acknowledged event's
    /// session; how many took it. When none did, the ack is held for the session's next
    /// connection.
    pub fn send_event_ack(&self, vehicle: &str, ack: &relay_proto::wire::v1::EventAck) -> usize {
        let routes = self.ack_routes.lock().unwrap_or_else(|p| p.into_inner());
        let took = routes
            .values()
            .filter(|r| r.vehicle == vehicle && r.session == ack.session_id)
            .filter(|r| r.tx.try_send(ack.clone()).is_ok())
            .count();
        if took == 0 {
            let mut held = self.held_acks.lock().unwrap_or_else(|p| p.into_inner());
            if !held.contains_key(vehicle) && held.len() >= MAX_VEHICLES_WITH_HELD_ACKS {
                // The map is ordered by name, not age: drop the vehicle with the oldest ack.
                let oldest = held
                    .iter()
                    .min_by_key(|(_, q)| q.front().map_or(i64::MIN, |a| a.acknowledged_at_ns))
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    held.remove(&k);
                }
            }
            let q = held.entry(vehicle.to_owned()).or_default();
            q.push_back(ack.clone());
            while q.len() > MAX_HELD_ACKS {
                q.pop_front();
            }
        }
        took
    }

    /// Acknowledgements held for `vehicle` now.
    pub fn held_acks(&self, vehicle: &str) -> usize {
        self.held_acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vehicle)
            .map_or(0, |q| q.len())
    }

    /// The vehicle's bearer connections now.
    pub fn bearers(&self, v: &str) -> Vec<relay_proto::model::BearerLink> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut links: Vec<relay_proto::model::BearerLink> = live
            .values()
            .filter(|(_, _, vehicle, _)| vehicle == v)
            .map(|(conn, _, _, since)| {
                let stats = conn.stats();
                relay_proto::model::BearerLink {
                    rtt_ns: i64::try_from(stats.path.rtt.as_nanos()).unwrap_or(i64::MAX),
                    sent_packets: stats.path.sent_packets,
                    lost_packets: stats.path.lost_packets,
                    connected_since_ns: *since,
                }
            })
            .collect();
        links.sort_by_key(|l| l.connected_since_ns);
        links
    }
}

/// One Hello of a vehicle being read; the count drops when it is dropped.
#[derive(Debug)]
pub(crate) struct HelloSlot<'a> {
    online: &'a Online,
    vehicle: &'a str,
}

impl<'a> HelloSlot<'a> {
    /// A slot unless vehicle `vehicle` already has `max` Hellos being read.
    pub(crate) fn try_new(online: &'a Online, vehicle: &'a str, max: usize) -> Option<Self> {
        let mut hellos = online.hellos.lock().unwrap_or_else(|p| p.into_inner());
        let n = hellos.entry(vehicle.to_owned()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { online, vehicle })
    }
}

impl Drop for HelloSlot<'_> {
    fn drop(&mut self) {
        let mut hellos = self.online.hellos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = hellos.get_mut(self.vehicle) {
            *n -= 1;
            if *n == 0 {
                hellos.remove(self.vehicle);
            }
        }
    }
}

/// Marks a vehicle online from its accepted Hello until the connection ends.
pub(crate) struct OnlineGuard<'a> {
    online: &'a Online,
    vehicle: &'a str,
    not_after: Option<i64>,
    live_id: u64,
    /// Bytes of frames this vehicle may have in reading at once, all its bearers together.
    pub(crate) budget: Arc<Semaphore>,
    /// The vehicle's clock offset estimate, fed by all its bearers.
    pub(crate) clock: SharedClock,
}

impl<'a> OnlineGuard<'a> {
    /// Counts the connection, unless the vehicle already holds `max` (`None` then), and
    /// keeps its certificate's expiry and serial (for revocation) while it lives.
    pub(crate) fn try_new(
        online: &'a Online,
        vehicle: &'a str,
        max: usize,
        budget_bytes: usize,
        conn: &quinn::Connection,
    ) -> Option<Self> {
        let (budget, clock) = online.try_up(vehicle, max, budget_bytes)?;
        let not_after = crate::tls::connection_not_after(conn);
        online.track_expiry(not_after, true);
        let live_id = online
            .next_live
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        online
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                live_id,
                (
                    conn.clone(),
                    crate::tls::connection_serial(conn),
                    vehicle.to_owned(),
                    crate::now_utc_ns(),
                ),
            );
        Some(Self {
            online,
            vehicle,
            not_after,
            live_id,
            budget,
            clock,
        })
    }
}

impl OnlineGuard<'_> {
    /// Event acknowledgements for this connection's `session` go to `tx` while it lives;
    /// those held while the vehicle was offline go first.
    pub(crate) fn route_acks(
        &self,
        session: u64,
        tx: tokio::sync::mpsc::Sender<relay_proto::wire::v1::EventAck>,
    ) {
        {
            let mut held = self
                .online
                .held_acks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(q) = held.get_mut(self.vehicle) {
                // Acks of this session leave the queue once this connection took them; a
                // full queue keeps them for the next connection.
                q.retain(|a| a.session_id != session || tx.try_send(a.clone()).is_err());
                if q.is_empty() {
                    held.remove(self.vehicle);
                }
            }
        }
        let route = AckRoute {
            vehicle: self.vehicle.to_owned(),
            session,
            tx,
        };
        self.online
            .ack_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.live_id, route);
    }
}

impl Drop for OnlineGuard<'_> {
    fn drop(&mut self) {
        self.online
            .ack_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.live_id);
        self.online
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.live_id);
        self.online.track_expiry(self.not_after, false);
        self.online.down(self.vehicle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vehicle_reads_at_most_its_cap_of_hellos_at_once() {
        let online = Online::default();
        let a = HelloSlot::try_new(&online, "amb-1", 2).unwrap();
        let b = HelloSlot::try_new(&online, "amb-1", 2).unwrap();
        assert!(HelloSlot::try_new(&online, "amb-1", 2).is_none());
        let other = HelloSlot::try_new(&online, "amb-2", 2);
        assert!(other.is_some(), "another vehicle has slots of its own");
        drop(a);
        let c = HelloSlot::try_new(&online, "amb-1", 2);
        assert!(c.is_some(), "a finished Hello frees its slot");
        drop((b, c, other));
        let hellos = online.hellos.lock().unwrap();
        assert!(
            hellos.is_empty(),
            "nothing kept for vehicles without Hellos"
        );
    }

    #[test]
    fn acknowledgements_for_an_offline_vehicle_are_held_up_to_the_bound() {
        let online = Online::default();
        let ack = |seq: u64| relay_proto::wire::v1::EventAck {
            session_id: 7,
            stream_id: 3,
            seq,
            acknowledged_at_ns: seq as i64,
            ..Default::default()
        };
        for seq in 0..(MAX_HELD_ACKS as u64 + 10) {
            assert_eq!(
                online.send_event_ack("amb-1", &ack(seq)),
                0,
                "nobody connected"
            );
        }
        assert_eq!(online.held_acks("amb-1"), MAX_HELD_ACKS);
        assert_eq!(online.held_acks("amb-2"), 0);
        let held = online.held_acks.lock().unwrap();
        assert_eq!(
            held["amb-1"].front().unwrap().seq,
            10,
            "the newest are kept"
        );
    }

    #[test]
    fn bearers_of_one_vehicle_share_one_read_budget_and_the_cap_holds() {
        let online = Online::default();
        let (a1, clock1) = online.try_up("amb-1", 2, 1000).unwrap();
        let (a2, clock2) = online.try_up("amb-1", 2, 1000).unwrap();
        assert!(
            Arc::ptr_eq(&clock1, &clock2),
            "one clock estimate per vehicle"
        );
        assert!(
            Arc::ptr_eq(&a1, &a2),
            "one budget for all bearers of a vehicle"
        );
        assert!(
            online.try_up("amb-1", 2, 1000).is_none(),
            "third bearer over the cap"
        );
        let (b, _) = online.try_up("amb-2", 2, 1000).unwrap();
        assert!(
            !Arc::ptr_eq(&a1, &b),
            "another vehicle has a budget of its own"
        );
        let _held = a1.clone().try_acquire_many_owned(1000).unwrap();
        assert_eq!(a2.available_permits(), 0);
        assert_eq!(b.available_permits(), 1000);
        online.down("amb-1");
        online.down("amb-1");
        assert_eq!(online.connections("amb-1"), 0);
        assert!(!online.is_online("amb-1"));
        let (again, _) = online.try_up("amb-1", 2, 1000).unwrap();
        assert_eq!(
            again.available_permits(),
            1000,
            "a fresh budget after reconnecting"
        );
    }
}
