//! Which vehicles are online now: a vehicle counts from its accepted Hello until its last
//! bearer connection ends (it may have several at once).

use std::collections::HashMap;
use std::sync::Mutex;

/// Which vehicles have a bearer connected now (vehicle -> connection count).
#[derive(Debug, Default)]
pub struct Online {
    inner: Mutex<HashMap<String, usize>>,
}

impl Online {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
}

impl<'a> OnlineGuard<'a> {
    /// Counts the connection, unless the vehicle already holds `max` (`None` then).
    pub(crate) fn try_new(online: &'a Online, vehicle: &'a str, max: usize) -> Option<Self> {
        online
            .try_up(vehicle, max)
            .then_some(Self { online, vehicle })
    }
}

impl Drop for OnlineGuard<'_> {
    fn drop(&mut self) {
        self.online.down(self.vehicle);
    }
}
