//! Stream classes: the strict delivery priority both ends agree on (events > waveforms > vitals >
//! location > bulk), derived from a stream's kind. The agent's scheduler orders by it, the QUIC
//! priority mapping and the metric labels come from it.

use crate::model::StreamKind;

/// Delivery class of a stream, most urgent first (the derived order is the priority order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Alarms and crew events.
    Events,
    /// ECG and every other waveform.
    Waveforms,
    /// Vital-sign numerics.
    Vitals,
    /// GPS position.
    Location,
    /// Anything else (bulk transfers, unknown kinds).
    Bulk,
}

impl Class {
    /// Number of classes.
    pub const COUNT: usize = 5;
    /// Every class, most urgent first.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Events,
        Self::Waveforms,
        Self::Vitals,
        Self::Location,
        Self::Bulk,
    ];

    /// The class of a stream kind; the raw i32 may come from the network, so unknown kinds are
    /// `Bulk`.
    pub fn of_kind(kind: i32) -> Self {
        match StreamKind::try_from(kind) {
            Ok(StreamKind::Events) => Self::Events,
            Ok(StreamKind::Waveform) => Self::Waveforms,
            Ok(StreamKind::Vitals) => Self::Vitals,
            Ok(StreamKind::Location) => Self::Location,
            _ => Self::Bulk,
        }
    }

    /// Position in [`Class::ALL`] (0 is the most urgent), for per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Short snake_case name, a bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Waveforms => "waveforms",
            Self::Vitals => "vitals",
            Self::Location => "location",
            Self::Bulk => "bulk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_priority_and_index_matches_all() {
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert!(Class::Events < Class::Waveforms && Class::Location < Class::Bulk);
        assert_eq!(
            Class::of_kind(StreamKind::Waveform as i32),
            Class::Waveforms
        );
        assert_eq!(Class::of_kind(StreamKind::Location as i32), Class::Location);
        assert_eq!(Class::of_kind(9_999), Class::Bulk);
    }
}
