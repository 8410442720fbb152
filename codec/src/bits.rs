//! MSB-first bit packing for the codec's variable-length codes.

use crate::CodecError;

/// Unary prefixes at least this long are followed by the value's explicit length instead of
/// going on: a wild residual costs about 40 bits, not millions.
pub(crate) const RICE_ESCAPE: u64 = 32;

pub(crate) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    filled: u32,
}

impl<'a> BitWriter<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            filled: 0,
        }
    }

    /// Appends the low `n` bits of `v` (n <= 32).
    pub(crate) fn put(&mut self, v: u64, n: u32) {
        debug_assert!(n <= 32);
        if n == 0 {
            return;
        }
        self.acc = (self.acc << n) | (v & ((1u64 << n) - 1));
        self.filled += n;
        while self.filled >= 8 {
            self.filled -= 8;
            self.out.push((self.acc >> self.filled) as u8);
        }
    }

    /// Appends the low `n` bits of `v`, any n <= 64.
    pub(crate) fn put_wide(&mut self, v: u64, n: u32) {
        if n > 32 {
            self.put(v >> 32, n - 32);
            self.put(v, 32);
        } else {
            self.put(v, n);
        }
    }

    fn ones(&mut self, mut n: u64) {
        while n >= 32 {
            self.put(u64::from(u32::MAX), 32);
            n -= 32;
        }
        self.put((1u64 << n) - 1, n as u32);
    }

    /// Rice code with parameter `k`: the quotient in unary (ones ended by a zero), then the
    /// `k` low bits; quotients of RICE_ESCAPE or more are written as the escape prefix, a 7-bit
    /// length and the value itself.
    pub(crate) fn rice(&mut self, u: u64, k: u32) {
        let q = u >> k;
        if q < RICE_ESCAPE {
            self.ones(q);
            self.put(0, 1);
            self.put_wide(u, k);
        } else {
            self.ones(RICE_ESCAPE);
            let len = 64 - u.leading_zeros();
            self.put(u64::from(len), 7);
            self.put_wide(u, len);
        }
    }

    /// Exponential-Golomb code of order `k`: Elias gamma of `(u >> k) + 1`, then `k` low bits.
    pub(crate) fn exp_golomb(&mut self, u: u64, k: u32) {
        let m = (u >> k) + 1;
        let len = 64 - m.leading_zeros();
        self.put_wide(0, len - 1);
        self.put_wide(m, len);
        self.put_wide(u, k);
    }

    /// Pads the last byte with zeros.
    pub(crate) fn finish(mut self) {
        if self.filled > 0 {
            let pad = 8 - self.filled;
            self.put(0, pad);
        }
    }
}

/// Bit cost of `rice(u, k)`.
pub(crate) fn rice_bits(u: u64, k: u32) -> u64 {
    let q = u >> k;
    if q < RICE_ESCAPE {
        q + 1 + u64::from(k)
    } else {
        RICE_ESCAPE + 7 + u64::from(64 - u.leading_zeros())
    }
}

/// Bit cost of `exp_golomb(u, k)`.
pub(crate) fn exp_golomb_bits(u: u64, k: u32) -> u64 {
    let m = (u >> k) + 1;
    let len = u64::from(64 - m.leading_zeros());
    2 * len - 1 + u64::from(k)
}

pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    /// Next bit to read, counted from the start of `data`.
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// The next 64 bits from `pos` (at least 57 of them real; zeros past the end).
    fn window(&self) -> u64 {
        let byte = self.pos / 8;
        let word = match self.data.get(byte..byte + 8) {
            Some(eight) => eight.try_into().map_or(0, u64::from_be_bytes),
            None => {
                let mut buf = [0u8; 8];
                let tail = self.data.get(byte..).unwrap_or_default();
                for (b, &v) in buf.iter_mut().zip(tail) {
                    *b = v;
                }
                u64::from_be_bytes(buf)
            }
        };
        word << (self.pos % 8)
    }

    /// Moves on by `n` bits, failing when that passes the end.
    fn advance(&mut self, n: usize) -> Result<(), CodecError> {
        if self.pos + n > self.data.len() * 8 {
            return Err(CodecError::Truncated);
        }
        self.pos += n;
        Ok(())
    }

    /// Reads `n` bits (n <= 64).
    pub(crate) fn get(&mut self, n: u32) -> Result<u64, CodecError> {
        match n {
            0 => Ok(0),
            1..=56 => {
                let v = self.window() >> (64 - n);
                self.advance(n as usize)?;
                Ok(v)
            }
            _ => {
                let high = self.get(n - 32)?;
                Ok((high << 32) | self.get(32)?)
            }
        }
    }

    pub(crate) fn rice(&mut self, k: u32) -> Result<u64, CodecError> {
        let q = u64::from((!self.window()).leading_zeros()).min(RICE_ESCAPE);
        if q < RICE_ESCAPE {
            self.advance(q as usize + 1)?;
            let low = self.get(k)?;
            Ok((q << k) | low)
        } else {
            self.advance(RICE_ESCAPE as usize)?;
            let len = self.get(7)? as u32;
            if len > 64 {
                return Err(CodecError::Corrupt("escaped value longer than 64 bits"));
            }
            self.get(len)
        }
    }

    pub(crate) fn exp_golomb(&mut self, k: u32) -> Result<u64, CodecError> {
        let zeros = self.window().leading_zeros();
        if zeros > 56 {
            return Err(CodecError::Corrupt("Exp-Golomb prefix too long"));
        }
        self.advance(zeros as usize)?;
        let m = self.get(zeros + 1)?;
        let high = m - 1;
        if k > 0 && high.leading_zeros() < k {
            return Err(CodecError::Corrupt("Exp-Golomb value too large"));
        }
        Ok((high << k) | self.get(k)?)
    }

    /// Bits left to read.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() * 8 - self.pos
    }
}
