//! Half-open sequence ranges: compact acknowledgements and gap bookkeeping.

use crate::wire::v1::SeqRange;

/// Collapses sorted-or-not sequence numbers into the fewest half-open ranges.
pub fn ranges_from_seqs(seqs: &mut [u64]) -> Vec<SeqRange> {
    seqs.sort_unstable();
    let mut out: Vec<SeqRange> = Vec::new();
    for &s in seqs.iter() {
        match out.last_mut() {
            Some(r) if r.end == s => r.end = s + 1,
            Some(r) if r.end > s => {} // duplicate
            _ => out.push(SeqRange {
                start: s,
                end: s + 1,
            }),
        }
    }
    out
}

/// Number of sequence numbers a range covers; a malformed range (end < start) covers none.
pub fn range_len(r: &SeqRange) -> u64 {
    r.end.saturating_sub(r.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_runs_and_duplicates() {
        let mut seqs = vec![5, 1, 2, 3, 3, 9, 10, 7];
        let r = ranges_from_seqs(&mut seqs);
        let pairs: Vec<(u64, u64)> = r.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(pairs, vec![(1, 4), (5, 6), (7, 8), (9, 11)]);
        assert_eq!(r.iter().map(range_len).sum::<u64>(), 7);
    }

    #[test]
    fn malformed_range_is_empty() {
        assert_eq!(range_len(&SeqRange { start: 9, end: 3 }), 0);
    }
}
