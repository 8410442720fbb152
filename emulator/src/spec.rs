//! Text form of a bearer, for the command line:
//!
//! `trace=data/traces/ATT-LTE-driving.up,delay=40ms,jitter=5ms,loss=1%,ge=0.01/0.25/1.0,
//!  queue=256KiB,blackout=20s-80s,offset=120s,reorder=true,down.rate=20mbit`
//!
//! A bare path is short for `trace=PATH`. Keys apply to the uplink (vehicle to ingest); the
//! downlink copies delay, jitter, reorder and blackouts (a coverage hole cuts both ways) and
//! otherwise has a 50 Mbit/s capacity and no loss, unless `down.<key>` says otherwise.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::model::{Capacity, DirectionParams, GilbertElliott};
use super::trace::{Trace, TraceError};

#[derive(Debug, thiserror::Error)]
/// Why a bearer specification was not accepted.
pub enum SpecError {
    #[error("bearer spec {spec:?}: {reason}")]
    /// The text is not a valid specification.
    Invalid {
        /// The specification.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    #[error(transparent)]
    /// Its trace file could not be loaded.
    Trace(#[from] TraceError),
}

/// Both directions of one emulated bearer.
#[derive(Debug, Clone)]
pub struct BearerSpec {
    /// Short name for reports (the trace file name or the rate).
    pub name: String,
    /// Agent-to-ingest direction.
    pub up: DirectionParams,
    /// Ingest-to-agent direction.
    pub down: DirectionParams,
}

impl BearerSpec {
    /// A clean, fast link: fixed rate, no delay, no loss.
    pub fn ideal() -> Self {
        Self {
            name: "ideal".into(),
            up: DirectionParams::default(),
            down: DirectionParams::default(),
        }
    }

    /// Parses `spec`; trace files are read through `traces` so links share one copy.
    pub fn parse(spec: &str, traces: &mut TraceCache) -> Result<Self, SpecError> {
        let invalid = |reason: String| SpecError::Invalid {
            spec: spec.to_owned(),
            reason,
        };
        let mut up = DirectionParams::default();
        let mut down = DirectionParams::default();
        // Downlink keys given explicitly (the rest follow the uplink).
        let mut down_set: HashSet<&str> = HashSet::new();
        let mut name = String::from("ideal");
        let mut up_offset = Duration::ZERO;
        let mut down_offset = Duration::ZERO;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => ("trace", item),
            };
            let (is_down, key) = match key.strip_prefix("down.") {
                Some(k) => (true, k),
                None => (false, key),
            };
            let dir = if is_down { &mut down } else { &mut up };
            if is_down {
                down_set.insert(key);
            }
            match key {
                "trace" => {
                    let trace = traces.load(Path::new(value))?;
                    if !is_down {
                        name = trace.name().to_owned();
                    }
                    dir.capacity = Capacity::Trace {
                        trace,
                        offset: Duration::ZERO,
                    };
                }
                "rate" => {
                    let bits_per_second = parse_rate(value).map_err(invalid)?;
                    if !is_down {
                        name = format!("rate {value}");
                    }
                    dir.capacity = Capacity::Rate { bits_per_second };
                }
                "offset" => {
                    let o = parse_duration(value).map_err(invalid)?;
                    if is_down {
                        down_offset = o;
                    } else {
                        up_offset = o;
                    }
                }
                "delay" => dir.delay = parse_duration(value).map_err(invalid)?,
                "jitter" => dir.jitter = parse_duration(value).map_err(invalid)?,
                "reorder" => {
                    dir.reorder = value
                        .parse()
                        .map_err(|_| invalid(format!("reorder={value}: true or false")))?
                }
                "loss" => dir.loss = parse_probability(value).map_err(invalid)?,
                "ge" => dir.gilbert_elliott = Some(parse_ge(value).map_err(invalid)?),
                "queue" => dir.queue_bytes = parse_bytes(value).map_err(invalid)?,
                "blackout" => dir.blackouts.push(parse_window(value).map_err(invalid)?),
                other => return Err(invalid(format!("unknown key {other:?}"))),
            }
        }
        set_offset(&mut up.capacity, up_offset);
        set_offset(&mut down.capacity, down_offset);
        // The downlink follows the uplink's path properties unless told otherwise.
        if !down_set.contains("delay") {
            down.delay = up.delay;
        }
        if !down_set.contains("jitter") {
            down.jitter = up.jitter;
        }
        if !down_set.contains("reorder") {
            down.reorder = up.reorder;
        }
        if !down_set.contains("blackout") {
            down.blackouts = up.blackouts.clone();
        }
        if !down_set.contains("queue") {
            down.queue_bytes = up.queue_bytes;
        }
        Ok(Self { name, up, down })
    }

    /// The same bearer with its trace started `offset` later (different vehicles see
    /// different stretches of road).
    pub fn with_trace_offset(&self, offset: Duration) -> Self {
        let mut s = self.clone();
        for dir in [&mut s.up, &mut s.down] {
            if let Capacity::Trace { trace, offset: o } = &mut dir.capacity {
                // Offsets beyond the period wrap, as the trace does.
                let period = trace.period().as_millis().max(1);
                let wrapped = (o.as_millis() + offset.as_millis()) % period;
                *o = Duration::from_millis(u64::try_from(wrapped).unwrap_or(0));
            }
        }
        s
    }
}

fn set_offset(c: &mut Capacity, offset: Duration) {
    if let Capacity::Trace { offset: o, .. } = c {
        *o = offset;
    }
}

/// Loads each trace file once.
#[derive(Debug, Default)]
pub struct TraceCache {
    loaded: HashMap<PathBuf, Arc<Trace>>,
}

impl TraceCache {
    /// The trace at `path`, read once and shared.
    pub fn load(&mut self, path: &Path) -> Result<Arc<Trace>, TraceError> {
        if let Some(t) = self.loaded.get(path) {
            return Ok(t.clone());
        }
        let t = Arc::new(Trace::from_file(path)?);
        self.loaded.insert(path.to_owned(), t.clone());
        Ok(t)
    }
}

/// `40ms`, `1.5s`, `2m`, `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 40ms or 20s"))?;
    let secs = match unit.trim() {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unit must be us, ms, s, m or h")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `20s-80s`: from 20 s to 80 s after the link started.
fn parse_window(s: &str) -> Result<Range<Duration>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("blackout {s:?}: expected START-END, e.g. 20s-80s"))?;
    let (a, b) = (parse_duration(a)?, parse_duration(b)?);
    if b <= a {
        return Err(format!("blackout {s:?}: end must be after start"));
    }
    Ok(a..b)
}

/// `10mbit`, `500kbit`, `1.5gbit`, `64000bit`.
fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = lower.strip_suffix("bit") {
        (n, 1.0)
    } else {
        return Err(format!("rate {s:?}: use bit, kbit, mbit or gbit"));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("rate {s:?} is not a number"))?;
    let bps = v * mult;
    if !(1.0..=1e12).contains(&bps) {
        return Err(format!("rate {s:?} is out of range"));
    }
    Ok(bps as u64)
}

/// `256KiB`, `1MiB`, `1500B`, `1500`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("KiB") {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else if let Some(n) = t.strip_suffix('B') {
        (n, 1)
    } else {
        (t, 1)
    };
    let v: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("size {s:?}: use B, KiB or MiB"))?;
    v.checked_mul(mult)
        .filter(|b| *b >= 1500 && *b <= 1 << 30)
        .ok_or_else(|| format!("size {s:?}: must be 1500 B ..= 1 GiB"))
}

/// `0.05` or `5%`.
fn parse_probability(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("probability {s:?}: use 0.05 or 5%"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("probability {s:?} must be within 0..=1"));
    }
    Ok(v)
}

/// `p/r/loss_bad[/loss_good]`.
fn parse_ge(s: &str) -> Result<GilbertElliott, String> {
    let parts: Vec<f64> = s
        .split('/')
        .map(parse_probability)
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [p, r, bad] => Ok(GilbertElliott {
            p_good_to_bad: p,
            p_bad_to_good: r,
            loss_bad: bad,
            loss_good: 0.0,
        }),
        [p, r, bad, good] => Ok(GilbertElliott {
            p_good_to_bad: p,
            p_bad_to_good: r,
            loss_bad: bad,
            loss_good: good,
        }),
        _ => Err(format!(
            "ge={s}: expected p_good_to_bad/p_bad_to_good/loss_bad[/loss_good]"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces");
        let spec = format!(
            "{}/ATT-LTE-driving.up,delay=40ms,jitter=5ms,loss=1%,ge=0.01/0.25/1.0,queue=64KiB,\
             blackout=20s-80s,offset=120s,down.rate=20mbit,down.loss=0.5%",
            dir.display()
        );
        let b = BearerSpec::parse(&spec, &mut TraceCache::default()).unwrap();
        assert_eq!(b.name, "ATT-LTE-driving.up");
        assert!(
            matches!(&b.up.capacity, Capacity::Trace { offset, .. } if *offset == Duration::from_secs(120))
        );
        assert_eq!(b.up.delay, Duration::from_millis(40));
        assert_eq!(b.up.loss, 0.01);
        assert_eq!(b.up.queue_bytes, 64 * 1024);
        assert_eq!(b.up.gilbert_elliott.unwrap().p_bad_to_good, 0.25);
        assert_eq!(
            b.up.blackouts,
            vec![Duration::from_secs(20)..Duration::from_secs(80)]
        );
        assert!(matches!(
            b.down.capacity,
            Capacity::Rate {
                bits_per_second: 20_000_000
            }
        ));
        assert_eq!(b.down.delay, b.up.delay);
        assert_eq!(b.down.blackouts, b.up.blackouts);
        assert_eq!(b.down.loss, 0.005);
    }

    #[test]
    fn trace_offsets_add_up_and_wrap_at_the_period() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces");
        let spec = format!("{}/ATT-LTE-driving.up,offset=1000s", dir.display());
        let b = BearerSpec::parse(&spec, &mut TraceCache::default()).unwrap();
        let Capacity::Trace { trace, .. } = &b.up.capacity else {
            panic!("a trace bearer")
        };
        let period = trace.period();
        let shifted = b.with_trace_offset(Duration::from_secs(100));
        let Capacity::Trace { offset, .. } = shifted.up.capacity else {
            panic!("a trace bearer")
        };
        assert_eq!(offset, Duration::from_secs(1100) - period);
    }

    #[test]
    fn rejects_mistakes_with_a_reason() {
        let mut c = TraceCache::default();
        for bad in [
            "delay=40",
            "loss=2",
            "blackout=80s-20s",
            "rate=fast",
            "colour=blue",
            "queue=10",
            "/nonexistent/trace.up",
        ] {
            let e = BearerSpec::parse(bad, &mut c).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }
}
