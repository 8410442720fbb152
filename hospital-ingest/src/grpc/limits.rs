//! Per-client bounds of the API (sans-IO where it matters): calls per minute as a token bucket
//! fed with time, and subscriptions held at once, both keyed by the client certificate's
//! fingerprint so one stolen or misbehaving certificate cannot take the API from the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

/// Clients tracked at most; when full, clients whose bucket is full again are forgotten first
/// (forgetting them loses nothing).
const MAX_CLIENTS: usize = 4096;

/// A token bucket: `per_minute` calls a minute, bursts of as many.
#[derive(Debug, Clone)]
pub struct CallBucket {
    tokens: f64,
    last: Instant,
}

impl CallBucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(per_minute),
            last: now,
        }
    }

    /// Takes a token if there is one; refills at `per_minute` a minute up to `per_minute`.
    pub fn try_take(&mut self, per_minute: u32, now: Instant) -> bool {
        let rate = f64::from(per_minute) / 60.0;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(per_minute));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, per_minute: u32, now: Instant) -> bool {
        let rate = f64::from(per_minute) / 60.0;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= f64::from(per_minute)
    }
}

/// Why a call was refused by a per-client bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// More calls a minute than allowed.
    Rate,
    /// More subscriptions at once than allowed.
    Subscriptions,
}

impl Refused {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Rate => "call_rate",
            Self::Subscriptions => "subscriptions",
        }
    }
}

#[derive(Debug, Default)]
struct Client {
    bucket: Option<CallBucket>,
    subscriptions: usize,
}

/// Calls and subscriptions per client.
#[derive(Debug)]
pub struct ClientLimits {
    per_minute: u32,
    max_subscriptions: usize,
    clients: Mutex<HashMap<String, Client>>,
}

impl ClientLimits {
    /// `per_minute` calls a minute and `max_subscriptions` at once per client.
    pub fn new(per_minute: u32, max_subscriptions: usize) -> Arc<Self> {
        Arc::new(Self {
            per_minute,
            max_subscriptions,
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Client>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call of `client` at `now`.
    pub fn call(&self, client: &str, now: Instant) -> Result<(), Refused> {
        let mut clients = self.lock();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(client) {
            let per_minute = self.per_minute;
            clients.retain(|_, c| {
                c.subscriptions > 0
                    || c.bucket
                        .as_ref()
                        .is_some_and(|b| !b.is_full(per_minute, now))
            });
            if clients.len() >= MAX_CLIENTS {
                // Thousands of clients busy at once: the newcomer waits.
                return Err(Refused::Rate);
            }
        }
        let entry = clients.entry(client.to_owned()).or_default();
        let bucket = entry
            .bucket
            .get_or_insert_with(|| CallBucket::new(self.per_minute, now));
        if bucket.try_take(self.per_minute, now) {
            Ok(())
        } else {
            Err(Refused::Rate)
        }
    }

    /// A subscription slot of `client`, given back when the returned guard is dropped.
    pub fn subscribe(self: &Arc<Self>, client: &str) -> Result<SubscriptionSlot, Refused> {
        let mut clients = self.lock();
        let entry = clients.entry(client.to_owned()).or_default();
        if entry.subscriptions >= self.max_subscriptions {
            return Err(Refused::Subscriptions);
        }
        entry.subscriptions += 1;
        Ok(SubscriptionSlot {
            limits: self.clone(),
            client: client.to_owned(),
        })
    }

    /// Subscriptions `client` holds now.
    pub fn subscriptions(&self, client: &str) -> usize {
        self.lock().get(client).map_or(0, |c| c.subscriptions)
    }
}

/// One subscription of a client.
#[derive(Debug)]
pub struct SubscriptionSlot {
    limits: Arc<ClientLimits>,
    client: String,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        let mut clients = self.limits.lock();
        if let Some(c) = clients.get_mut(&self.client) {
            c.subscriptions = c.subscriptions.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let t0 = Instant::now();
        let limits = ClientLimits::new(60, 2);
        for _ in 0..60 {
            assert_eq!(limits.call("a", t0), Ok(()));
        }
        assert_eq!(limits.call("a", t0), Err(Refused::Rate));
        assert_eq!(
            limits.call("b", t0),
            Ok(()),
            "another client has its own bucket"
        );
        // One token a second refills.
        assert_eq!(
            limits.call("a", t0 + Duration::from_millis(999)),
            Err(Refused::Rate)
        );
        assert_eq!(limits.call("a", t0 + Duration::from_millis(1001)), Ok(()));
        assert_eq!(
            limits.call("a", t0 + Duration::from_millis(1002)),
            Err(Refused::Rate)
        );
        // A long pause refills no more than the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..60 {
            assert_eq!(limits.call("a", later), Ok(()));
        }
        assert_eq!(limits.call("a", later), Err(Refused::Rate));
    }

    #[test]
    fn subscriptions_are_counted_per_client_and_given_back() {
        let limits = ClientLimits::new(60, 2);
        let a1 = limits.subscribe("a").unwrap();
        let _a2 = limits.subscribe("a").unwrap();
        assert_eq!(limits.subscribe("a").unwrap_err(), Refused::Subscriptions);
        let _b = limits.subscribe("b").unwrap();
        drop(a1);
        assert_eq!(limits.subscriptions("a"), 1);
        assert!(limits.subscribe("a").is_ok());
    }

    #[test]
    fn the_client_table_stays_bounded() {
        let t0 = Instant::now();
        let limits = ClientLimits::new(60, 2);
        for i in 0..MAX_CLIENTS + 100 {
            let _ = limits.call(&format!("c{i}"), t0 + Duration::from_secs(i as u64 * 120));
        }
        assert!(limits.lock().len() <= MAX_CLIENTS);
    }
}
