//! Mahimahi capacity traces: one 1500-byte delivery opportunity per line, in milliseconds since
//! the trace start; the trace repeats with a period equal to its last timestamp.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes one delivery opportunity lets leave the bottleneck.
pub const OPPORTUNITY_BYTES: usize = 1500;

/// Refuse larger files: the longest shipped trace has 155k lines (1 MB).
const MAX_TRACE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
/// Why a trace file could not be loaded.
pub enum TraceError {
    #[error("{path}: {source}")]
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_TRACE_BYTES} bytes")]
    /// The file is larger than a trace may be.
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    #[error("{path}:{line}: {reason}")]
    /// A line is not a millisecond timestamp.
    Parse {
        /// The file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    #[error("{path}: no delivery opportunity, or the last one is at 0 ms")]
    /// The file holds no opportunity.
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A parsed trace, shared read-only between links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    name: String,
    /// Opportunity times in ms, non-decreasing.
    opportunities_ms: Vec<u64>,
    period_ms: u64,
}

impl Trace {
    /// Reads a Mahimahi trace (one delivery opportunity per line, milliseconds).
    pub fn from_file(path: &Path) -> Result<Self, TraceError> {
        let io = |source| TraceError::Io {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(path, &text)
    }

    /// Parses trace text; `source` names it in errors, and its file name names the trace.
    pub fn parse(source: &Path, text: &str) -> Result<Self, TraceError> {
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| source.display().to_string());
        let mut opportunities_ms = Vec::new();
        let mut last = 0u64;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parse_err = |reason: String| TraceError::Parse {
                path: source.to_owned(),
                line: i + 1,
                reason,
            };
            let ms: u64 = line
                .parse()
                .map_err(|_| parse_err(format!("not a millisecond count: {line:?}")))?;
            if ms < last {
                return Err(parse_err(format!("time goes backwards ({ms} < {last})")));
            }
            last = ms;
            opportunities_ms.push(ms);
        }
        if last == 0 {
            return Err(TraceError::Empty {
                path: source.to_owned(),
            });
        }
        Ok(Self {
            name,
            opportunities_ms,
            period_ms: last,
        })
    }

    /// The file name, for reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length of the trace before it wraps.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms)
    }

    /// Delivery opportunities per period.
    pub fn opportunities_per_period(&self) -> usize {
        self.opportunities_ms.len()
    }

    /// Mean capacity in bits per second.
    pub fn mean_bits_per_second(&self) -> f64 {
        (self.opportunities_ms.len() * OPPORTUNITY_BYTES * 8) as f64
            / (self.period_ms as f64 / 1000.0)
    }

    /// Time of opportunity `index` counted over the endlessly repeated trace, in ms.
    pub fn time_of_ms(&self, index: u64) -> u64 {
        let n = self.opportunities_ms.len() as u64;
        let cycle = index / n;
        let within = (index % n) as usize;
        cycle
            .saturating_mul(self.period_ms)
            .saturating_add(self.opportunities_ms.get(within).copied().unwrap_or(0))
    }

    /// Index of the first opportunity at or after `t_ms`.
    pub fn first_at_or_after(&self, t_ms: u64) -> u64 {
        let n = self.opportunities_ms.len() as u64;
        // The last opportunity of a cycle sits exactly at the period, i.e. at the start of the
        // next cycle, so times are mapped into (0, period].
        let cycle = t_ms.saturating_sub(1) / self.period_ms;
        let within = t_ms - cycle * self.period_ms;
        let idx = self.opportunities_ms.partition_point(|&o| o < within) as u64;
        if idx == n {
            (cycle + 1) * n
        } else {
            cycle * n + idx
        }
    }

    /// Number of opportunities in `[from_ms, to_ms)`.
    pub fn opportunities_between(&self, from_ms: u64, to_ms: u64) -> u64 {
        self.first_at_or_after(to_ms)
            .saturating_sub(self.first_at_or_after(from_ms))
    }

    /// Start of the longest stretch without any opportunity, and its length, in ms.
    pub fn longest_gap_ms(&self) -> (u64, u64) {
        let mut best = (0, 0);
        let mut prev = 0;
        for &o in &self.opportunities_ms {
            if o - prev > best.1 {
                best = (prev, o - prev);
            }
            prev = o;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around_with_the_last_timestamp_as_period() {
        let t = Trace::parse(Path::new("t"), "5\n5\n10\n").unwrap();
        assert_eq!(t.period(), Duration::from_millis(10));
        assert_eq!(t.time_of_ms(0), 5);
        assert_eq!(t.time_of_ms(1), 5);
        assert_eq!(t.time_of_ms(2), 10);
        assert_eq!(t.time_of_ms(3), 15);
        assert_eq!(t.first_at_or_after(0), 0);
        assert_eq!(t.first_at_or_after(6), 2);
        assert_eq!(t.first_at_or_after(11), 3);
        assert_eq!(t.opportunities_between(0, 20), 5);
    }

    #[test]
    fn rejects_bad_input_with_the_line() {
        assert!(matches!(
            Trace::parse(Path::new("t"), "1\nx\n"),
            Err(TraceError::Parse { line: 2, .. })
        ));
        assert!(matches!(
            Trace::parse(Path::new("t"), "5\n3\n"),
            Err(TraceError::Parse { line: 2, .. })
        ));
        assert!(matches!(
            Trace::parse(Path::new("t"), "\n"),
            Err(TraceError::Empty { .. })
        ));
    }
}
