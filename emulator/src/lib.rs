//! User-space cellular link emulator: per bearer a UDP relay on loopback whose uplink and
//! downlink follow a capacity trace (or fixed rate), delay, jitter, loss and outages.
#![warn(missing_docs)]

pub mod model;
pub mod runtime;
pub mod spec;
pub mod trace;

pub use model::{Capacity, DirectionCounters, DirectionParams, GilbertElliott};
pub use runtime::{Link, LinkCounters, start_links};
pub use spec::{BearerSpec, TraceCache};
pub use trace::Trace;
