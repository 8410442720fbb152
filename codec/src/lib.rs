//! Lossless codec for waveform frames ("RELAY-LPC1").
//!
//! Every frame decodes on its own: nothing is carried from one frame to the next, so a lost or
//! late frame never prevents decoding another (the relay delivers frames out of order and
//! across bearers). What makes that affordable on 40 ms frames:
//!
//! - each channel is predicted by a fixed polynomial of order 0-4 (the FLAC fixed predictors),
//!   with the order ramping up over the first samples of the frame; the first sample is
//!   predicted by the channel's centre (its baseline), so its residual is the value's
//!   distance from it;
//! - a channel may instead be predicted from one or two earlier channels: its prediction
//!   residual minus a combination (weights -1, -1/2, 1/2, 1) of theirs. Limb leads III, aVR,
//!   aVL and aVF are such combinations of I and II; where a source computed them, the
//!   residual is the rounding alone. The encoder only picks it when the samples show it pays;
//! - residuals are zig-zag mapped and Rice coded with a parameter per channel and frame (the
//!   first with an Exp-Golomb code of the same order, as it is larger), with an escape for
//!   outliers, so any `i32` input round-trips.
//!
//! Bit layout of a frame, channel after channel, most significant bit first, the last byte
//! padded with zeros:
//!
//! ```text
//! order:3 (0..=4)  inter:1  [ref_a:w  weight_a:2  second:1  [ref_b:w  weight_b:2]]  k:5
//! residual[0]: Exp-Golomb(k)   residual[1..n]: Rice(k)      (k = 31: all of them zero)
//! ```
//!
//! `w` is the number of bits that can name every earlier channel; weights index
//! `[-1, -1/2, 1/2, 1]`.

mod bits;

use bits::{BitReader, BitWriter, exp_golomb_bits, rice_bits};

/// Highest polynomial prediction order.
pub const MAX_ORDER: usize = 4;
/// Most channels a frame may hold (channel references are coded in at most 8 bits).
pub const MAX_CHANNELS: usize = 256;
/// `k` value that says every residual after the first is zero (a flat line, a lead off).
const K_ALL_ZERO: u32 = 31;
/// Doubled weights of a reference channel, by their 2-bit code.
const WEIGHTS: [i64; 4] = [-2, -1, 1, 2];
/// How many of the channels just before a channel, and of the first ones, the encoder tries
/// as references (the first ones: 12-lead sources put I and II first).
const RECENT_REFERENCES: usize = 4;
const LEADING_REFERENCES: usize = 3;
/// Frames between full searches for a channel's references (staggered over the channels);
/// in between, the encoder tries what the last search found. How leads relate does not
/// change from one frame to the next, and the search is most of the encoding time.
const SEARCH_EVERY: u64 = 25;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame ended before all its samples were read.
    #[error("frame truncated")]
    Truncated,
    /// The bits do not describe a valid frame.
    #[error("corrupt frame: {0}")]
    Corrupt(&'static str),
    /// The data decoded to all samples but bytes are left over.
    #[error("{0} bytes after the last sample")]
    TrailingBytes(usize),
    /// The channel count is 0 or above MAX_CHANNELS, or the samples are not a multiple of it.
    #[error("bad layout: {0}")]
    Layout(&'static str),
}

/// How one channel of a frame is predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Choice {
    order: usize,
    /// Up to two earlier channels and their doubled weights.
    refs: [Option<(usize, i64)>; 2],
}

/// Bits to name any of `n` channels.
fn ref_bits(n: usize) -> u32 {
    if n <= 1 {
        0
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Prediction of `x[t]` from the samples before it, by order `min(t, order)`; the centre for
/// the first sample and for order 0.
fn predict(x: &[i64], t: usize, order: usize, center: i64) -> i64 {
    match order.min(t) {
        0 => center,
        1 => x[t - 1],
        2 => 2 * x[t - 1] - x[t - 2],
        3 => 3 * x[t - 1] - 3 * x[t - 2] + x[t - 3],
        _ => 4 * x[t - 1] - 6 * x[t - 2] + 4 * x[t - 3] - x[t - 4],
    }
}

/// Inter-channel part of a prediction: the weighted (halves) residuals of the references.
fn combine(refs: &[Option<(usize, i64)>; 2], residual_of: impl Fn(usize) -> i64) -> i64 {
    let mut sum = 0i64;
    for (channel, weight) in refs.iter().flatten() {
        sum += weight * residual_of(*channel);
    }
    sum >> 1
}

/// Encodes frames of one stream. Keeps scratch space and each channel's last choice (a hint
/// for the next frame's search, never needed to decode).
#[derive(Debug, Clone)]
pub struct Encoder {
    centers: Vec<i64>,
    /// Samples, channel-major: `x[c * n + t]`.
    x: Vec<i64>,
    /// Residuals of every channel at every order: `e[(c * (MAX_ORDER + 1) + p) * n + t]`.
    e: Vec<i64>,
    last: Vec<Choice>,
    /// Per channel, the best references the last full search found.
    found: Vec<Option<Choice>>,
    /// Frames encoded so far.
    frames: u64,
    residual: Vec<i64>,
}

impl Encoder {
    /// An encoder for frames of `centers.len()` interleaved channels; `centers` are the values
    /// the first sample of each channel is predicted by (the channel's baseline).
    pub fn new(centers: &[i32]) -> Result<Self, CodecError> {
        check_channels(centers.len())?;
        Ok(Self {
            centers: centers.iter().map(|&c| i64::from(c)).collect(),
            x: Vec::new(),
            e: Vec::new(),
            last: vec![Choice::default(); centers.len()],
            found: vec![None; centers.len()],
            frames: 0,
            residual: Vec::new(),
        })
    }

    /// Channels per frame.
    pub fn channels(&self) -> usize {
        self.centers.len()
    }

    /// Appends the encoding of `interleaved` (sample 0 of every channel, then sample 1, ...)
    /// to `out`.
    pub fn encode(&mut self, interleaved: &[i32], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let channels = self.centers.len();
        if !interleaved.len().is_multiple_of(channels) {
            return Err(CodecError::Layout("samples not a multiple of the channels"));
        }
        let n = interleaved.len() / channels;
        if n == 0 {
            return Ok(());
        }
        self.x.clear();
        self.x.resize(channels * n, 0);
        for (t, row) in interleaved.chunks_exact(channels).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                self.x[c * n + t] = i64::from(v);
            }
        }
        let orders = MAX_ORDER + 1;
        self.e.clear();
        self.e.resize(channels * orders * n, 0);
        for c in 0..channels {
            let x = &self.x[c * n..(c + 1) * n];
            for p in 0..orders {
                let base = (c * orders + p) * n;
                for t in 0..n {
                    self.e[base + t] = x[t] - predict(x, t, p, self.centers[c]);
                }
            }
        }
        let mut w = BitWriter::new(out);
        for c in 0..channels {
            let (choice, k) = self.choose(c, n);
            self.last[c] = choice;
            self.residual_into(c, n, &choice);
            write_channel(&mut w, c, &choice, k, &self.residual);
        }
        w.finish();
        self.frames += 1;
        Ok(())
    }

    fn residuals(&self, c: usize, p: usize, n: usize) -> &[i64] {
        let base = (c * (MAX_ORDER + 1) + p) * n;
        &self.e[base..base + n]
    }

    fn residual_into(&mut self, c: usize, n: usize, choice: &Choice) {
        let mut r = std::mem::take(&mut self.residual);
        r.clear();
        let own = self.residuals(c, choice.order, n);
        for (t, &e) in own.iter().enumerate() {
            let pred = combine(&choice.refs, |a| self.residuals(a, choice.order, n)[t]);
            r.push(e - pred);
        }
        self.residual = r;
    }

    /// Sum of |residual| of channel `c` under `choice`, stopping once it passes `bound`.
    fn l1(&self, c: usize, n: usize, choice: &Choice, bound: u64) -> u64 {
        let own = self.residuals(c, choice.order, n);
        let reference = |i: usize| match choice.refs[i] {
            Some((a, w)) => (self.residuals(a, choice.order, n), w),
            None => (own, 0),
        };
        let ((ra, wa), (rb, wb)) = (reference(0), reference(1));
        let mut sum = 0u64;
        for (t, ((&e, &a), &b)) in own.iter().zip(ra).zip(rb).enumerate() {
            sum += (e - ((wa * a + wb * b) >> 1)).unsigned_abs();
            if t % 4 == 3 && sum > bound {
                break;
            }
        }
        sum
    }

    /// The cheapest prediction for channel `c` and its Rice parameter.
    fn choose(&mut self, c: usize, n: usize) -> (Choice, u32) {
        // Own prediction: the order with the fewest bits.
        let mut best: Option<(u64, Choice, u32)> = None;
        for order in 0..=MAX_ORDER {
            let choice = Choice {
                order,
                refs: [None, None],
            };
            let (bits, k) = cost(self.residuals(c, order, n));
            if best.as_ref().is_none_or(|b| bits < b.0) {
                best = Some((bits, choice, k));
            }
        }
        let Some((own_bits, own_choice, own_k)) = best else {
            return (Choice::default(), 0);
        };
        if c == 0 {
            return (own_choice, own_k);
        }
        // Other channels: search by L1 (cheap), starting from last frame's choice so the
        // bound is tight early; then compare exact costs.
        let own_l1 = self.l1(c, n, &own_choice, u64::MAX);
        let mut best_l1 = own_l1;
        let mut best_inter: Option<Choice> = None;
        let last = self.last[c];
        let mut consider = |this: &Self, choice: Choice, best_l1: &mut u64| {
            let l1 = this.l1(c, n, &choice, *best_l1);
            if l1 < *best_l1 {
                *best_l1 = l1;
                best_inter = Some(choice);
            }
        };
        for hint in [Some(last), self.found[c]].into_iter().flatten() {
            if hint.refs[0].is_some() && hint.refs.iter().flatten().all(|&(a, _)| a < c) {
                consider(self, hint, &mut best_l1);
            }
        }
        // A search is due (the first frame, then staggered), unless nothing is left to gain
        // on a residual of about a unit a sample.
        let search_due = self.frames == 0 || self.frames % SEARCH_EVERY == c as u64 % SEARCH_EVERY;
        if own_l1 <= n as u64 || !search_due {
            return self.pick(c, n, best_inter, own_bits, own_choice, own_k);
        }
        let mut candidates: Vec<usize> = (0..c.min(LEADING_REFERENCES))
            .chain(c.saturating_sub(RECENT_REFERENCES)..c)
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let orders: &[usize] = if own_choice.order == 0 {
            &[0]
        } else {
            &[0, own_choice.order]
        };
        for &order in orders {
            for (i, &a) in candidates.iter().enumerate() {
                for &wa in &WEIGHTS {
                    let single = Choice {
                        order,
                        refs: [Some((a, wa)), None],
                    };
                    consider(self, single, &mut best_l1);
                    for &b in &candidates[i + 1..] {
                        for &wb in &WEIGHTS {
                            let pair = Choice {
                                order,
                                refs: [Some((a, wa)), Some((b, wb))],
                            };
                            consider(self, pair, &mut best_l1);
                        }
                    }
                }
            }
        }
        self.found[c] = best_inter;
        self.pick(c, n, best_inter, own_bits, own_choice, own_k)
    }

    /// The inter-channel choice if it costs fewer bits than the channel's own prediction.
    fn pick(
        &mut self,
        c: usize,
        n: usize,
        inter: Option<Choice>,
        own_bits: u64,
        own_choice: Choice,
        own_k: u32,
    ) -> (Choice, u32) {
        let Some(inter) = inter else {
            return (own_choice, own_k);
        };
        self.residual_into(c, n, &inter);
        let (bits, k) = cost(&self.residual);
        let header = header_bits(c, &inter) - header_bits(c, &own_choice);
        if bits.saturating_add(header) < own_bits {
            (inter, k)
        } else {
            (own_choice, own_k)
        }
    }
}

fn check_channels(channels: usize) -> Result<(), CodecError> {
    if channels == 0 || channels > MAX_CHANNELS {
        Err(CodecError::Layout("channel count out of range"))
    } else {
        Ok(())
    }
}

/// Header bits of one channel under `choice` (beyond order, inter flag and k).
fn header_bits(c: usize, choice: &Choice) -> u64 {
    let per_ref = u64::from(ref_bits(c)) + 2;
    match choice.refs {
        [None, _] => 0,
        [Some(_), None] => per_ref + 1,
        [Some(_), Some(_)] => 2 * per_ref + 1,
    }
}

/// Fewest bits for a channel's residuals (first one Exp-Golomb, the rest Rice) and the
/// parameter that gives them.
fn cost(r: &[i64]) -> (u64, u32) {
    let Some((&first, rest)) = r.split_first() else {
        return (0, 0);
    };
    if rest.iter().all(|&v| v == 0) {
        return (exp_golomb_bits(zigzag(first), 0), K_ALL_ZERO);
    }
    let sum: u64 = rest.iter().map(|&v| zigzag(v)).fold(0, u64::saturating_add);
    let mean = sum / rest.len() as u64;
    // Residuals of i32 samples stay below 2^38, so k never needs to exceed 29; the clamp
    // keeps the range below non-empty whatever the mean.
    let guess = (64 - mean.leading_zeros()).min(K_ALL_ZERO - 2);
    let mut best = (u64::MAX, 0);
    for k in guess.saturating_sub(2)..=(guess + 1).min(K_ALL_ZERO - 1) {
        let bits = exp_golomb_bits(zigzag(first), k)
            + rest.iter().map(|&v| rice_bits(zigzag(v), k)).sum::<u64>();
        if bits < best.0 {
            best = (bits, k);
        }
    }
    best
}

fn write_channel(w: &mut BitWriter<'_>, c: usize, choice: &Choice, k: u32, r: &[i64]) {
    w.put(choice.order as u64, 3);
    let weight_code = |wt: i64| WEIGHTS.iter().position(|&x| x == wt).unwrap_or(0) as u64;
    match choice.refs {
        [Some((a, wa)), second] => {
            w.put(1, 1);
            w.put(a as u64, ref_bits(c));
            w.put(weight_code(wa), 2);
            match second {
                Some((b, wb)) => {
                    w.put(1, 1);
                    w.put(b as u64, ref_bits(c));
                    w.put(weight_code(wb), 2);
                }
                None => w.put(0, 1),
            }
        }
        [None, _] => w.put(0, 1),
    }
    w.put(u64::from(k), 5);
    if let Some((&first, rest)) = r.split_first() {
        if k == K_ALL_ZERO {
            w.exp_golomb(zigzag(first), 0);
        } else {
            w.exp_golomb(zigzag(first), k);
            for &v in rest {
                w.rice(zigzag(v), k);
            }
        }
    }
}

/// Decodes one frame of `count` samples per channel into `out` (interleaved, appended),
/// with the same `centers` the encoder had. Never reads past `data` and never allocates
/// more than the `count * centers.len()` samples asked for.
pub fn decode(
    data: &[u8],
    centers: &[i32],
    count: usize,
    out: &mut Vec<i32>,
) -> Result<(), CodecError> {
    let channels = centers.len();
    check_channels(channels)?;
    if count == 0 {
        return if data.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes(data.len()))
        };
    }
    let orders = MAX_ORDER + 1;
    let mut x = vec![0i64; channels * count];
    let mut inter = Vec::with_capacity(count);
    let mut r = BitReader::new(data);
    for c in 0..channels {
        let order = r.get(3)? as usize;
        if order >= orders {
            return Err(CodecError::Corrupt("prediction order above 4"));
        }
        let mut refs = [None, None];
        if r.get(1)? == 1 {
            if c == 0 {
                return Err(CodecError::Corrupt("first channel refers to another"));
            }
            let read_ref = |r: &mut BitReader<'_>| -> Result<(usize, i64), CodecError> {
                let a = r.get(ref_bits(c))? as usize;
                if a >= c {
                    return Err(CodecError::Corrupt("reference to a later channel"));
                }
                Ok((a, WEIGHTS[r.get(2)? as usize]))
            };
            refs[0] = Some(read_ref(&mut r)?);
            if r.get(1)? == 1 {
                refs[1] = Some(read_ref(&mut r)?);
            }
        }
        let k = r.get(5)? as u32;
        let (done, rest) = x.split_at_mut(c * count);
        let own = &mut rest[..count];
        // The references' share of each prediction, from their decoded samples.
        inter.clear();
        inter.resize(count, 0);
        for (a, weight) in refs.iter().flatten() {
            let xa = &done[a * count..(a + 1) * count];
            let center = i64::from(centers[*a]);
            for (t, share) in inter.iter_mut().enumerate() {
                *share += weight * (xa[t] - predict(xa, t, order, center));
            }
        }
        let center = i64::from(centers[c]);
        for t in 0..count {
            let u = match (t, k) {
                (0, K_ALL_ZERO) => r.exp_golomb(0)?,
                (0, _) => r.exp_golomb(k)?,
                (_, K_ALL_ZERO) => 0,
                _ => r.rice(k)?,
            };
            let value = unzigzag(u)
                .checked_add(inter[t] >> 1)
                .and_then(|v| v.checked_add(predict(own, t, order, center)))
                .filter(|v| i32::try_from(*v).is_ok())
                .ok_or(CodecError::Corrupt("sample outside the 32-bit range"))?;
            own[t] = value;
        }
    }
    let left = r.remaining();
    if left >= 8 {
        return Err(CodecError::TrailingBytes(left / 8));
    }
    out.reserve(channels * count);
    for t in 0..count {
        for c in 0..channels {
            out.push(x[c * count + t] as i32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
