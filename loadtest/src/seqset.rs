//! A set of sequence numbers kept as disjoint half-open ranges: a stream delivered in order
//! costs one entry however long the run, so subscribers' bookkeeping stays small.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
/// A set of sequence numbers kept as disjoint ranges (small for long runs).
pub struct SeqSet {
    /// start -> end (exclusive), disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        let end = seq.saturating_add(1);
        let joins_left = self
            .ranges
            .range(..=seq)
            .next_back()
            .filter(|(_, e)| **e == seq)
            .map(|(s, _)| *s);
        let right_end = self.ranges.remove(&end);
        match joins_left {
            Some(s) => {
                self.ranges.insert(s, right_end.unwrap_or(end));
            }
            None => {
                self.ranges.insert(seq, right_end.unwrap_or(end));
            }
        }
        self.len += 1;
        true
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, e)| seq < *e)
    }

    /// Numbers in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many of `0..n` are absent.
    pub fn missing_below(&self, n: u64) -> u64 {
        let present: u64 = self.ranges.range(..n).map(|(s, e)| (*e).min(n) - s).sum();
        n - present
    }

    /// Number of stored ranges (memory use).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

impl FromIterator<u64> for SeqSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut s = Self::default();
        for seq in iter {
            s.insert(seq);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_runs_and_counts_holes() {
        let mut s = SeqSet::default();
        for seq in [0, 1, 2, 5, 4, 9, 3] {
            assert!(s.insert(seq));
        }
        assert!(!s.insert(4));
        assert_eq!(s.len(), 7);
        assert_eq!(s.ranges(), 2); // 0..6 and 9..10
        assert!(s.contains(5) && !s.contains(6) && s.contains(9));
        assert_eq!(s.missing_below(12), 5); // 6, 7, 8, 10, 11
        assert_eq!(s.missing_below(6), 0);
        assert!(s.insert(7) && s.insert(6) && s.insert(8));
        assert_eq!(s.ranges(), 1);
        assert_eq!(s.missing_below(10), 0);
    }
}
