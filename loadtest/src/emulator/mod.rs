//! User-space cellular link emulator: per bearer a UDP relay on loopback whose uplink and
//! downlink follow a capacity trace (or fixed rate), delay, jitter, loss and outages.

pub mod model;
pub mod trace;
