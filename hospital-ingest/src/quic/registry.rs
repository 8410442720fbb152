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

    fn up(&self, v: &str) {
        let mut m = self.lock();
        *m.entry(v.to_owned()).or_default() += 1;
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
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
    pub(crate) fn new(online: &'a Online, vehicle: &'a str) -> Self {
        online.up(vehicle);
        Self { online, vehicle }
    }
}

impl Drop for OnlineGuard<'_> {
    fn drop(&mut self) {
        self.online.down(self.vehicle);
    }
}
