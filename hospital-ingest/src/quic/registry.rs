//! Which vehicles are online now: a vehicle counts from its accepted Hello until its last
//! bearer connection ends (it may have several at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Which vehicles have a bearer connected now (vehicle -> connection count), and when the
/// connected vehicles' certificates expire.
#[derive(Debug, Default)]
pub struct Online {
    inner: Mutex<HashMap<String, usize>>,
    /// notAfter (Unix seconds) -> connections whose certificate expires then.
    expiries: Mutex<BTreeMap<i64, usize>>,
}

impl Online {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
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

    /// Counts one more connection of `v` unless it already holds `max`.
    fn try_up(&self, v: &str, max: usize) -> bool {
        let mut m = self.lock();
        let n = m.entry(v.to_owned()).or_default();
        if *n >= max {
            if *n == 0 {
                m.remove(v);
            }
            return false;
        }
        *n += 1;
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
        true
    }

    /// Connections of vehicle `v` now.
    pub fn connections(&self, v: &str) -> usize {
        self.lock().get(v).copied().unwrap_or(0)
    }

    fn down(&self, v: &str) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(v) {
            *n -= 1;
            if *n == 0 {
                m.remove(v);
            }
        }
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
    }

    /// Whether any bearer of vehicle `v` is connected.
    pub fn is_online(&self, v: &str) -> bool {
        self.lock().contains_key(v)
    }
}

/// Marks a vehicle online from its accepted Hello until the connection ends.
pub(crate) struct OnlineGuard<'a> {
    online: &'a Online,
    vehicle: &'a str,
    not_after: Option<i64>,
}

impl<'a> OnlineGuard<'a> {
    /// Counts the connection (whose certificate expires at `not_after`), unless the vehicle
    /// already holds `max` (`None` then).
    pub(crate) fn try_new(
        online: &'a Online,
        vehicle: &'a str,
        max: usize,
        not_after: Option<i64>,
    ) -> Option<Self> {
        if !online.try_up(vehicle, max) {
            return None;
        }
        online.track_expiry(not_after, true);
        Some(Self {
            online,
            vehicle,
            not_after,
        })
    }
}

impl Drop for OnlineGuard<'_> {
    fn drop(&mut self) {
        self.online.track_expiry(self.not_after, false);
        self.online.down(self.vehicle);
    }
}
