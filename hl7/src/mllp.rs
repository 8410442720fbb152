//! MLLP (HL7 Minimal Lower Layer Protocol): each message is `0x0B message 0x1C 0x0D`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Start of block.
pub const START: u8 = 0x0b;
/// End of block, followed by a carriage return.
pub const END: [u8; 2] = [0x1c, 0x0d];

/// Why a frame was refused. After an error the decoder has skipped to the next start byte, so
/// the connection can go on (a stream of garbage never grows the buffer past the bound).
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    /// A message longer than the bound.
    #[error("MLLP message longer than {0} bytes")]
    TooLong(usize),
    /// Bytes outside a block (before a start byte).
    #[error("{0} bytes outside an MLLP block")]
    OutsideBlock(usize),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Frames and unframes MLLP blocks of at most `max_bytes` (the message, without framing).
#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_bytes: usize,
    /// Inside an over-long message: drop bytes until its end.
    discarding: bool,
}

impl MllpCodec {
    /// A codec refusing messages longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            discarding: false,
        }
    }
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == END)
}

impl Decoder for MllpCodec {
    type Item = Bytes;
    type Error = MllpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        if self.discarding {
            match find_end(src) {
                Some(end) => {
                    src.advance(end + 2);
                    self.discarding = false;
                }
                None => {
                    // Keep a last 0x1C: the 0x0D may come in the next read.
                    let keep = usize::from(src.last() == Some(&END[0]));
                    src.advance(src.len() - keep);
                    return Ok(None);
                }
            }
        }
        // Line breaks between blocks are tolerated (some senders add them); anything else is
        // reported once and skipped.
        let junk = src.iter().position(|&b| b == START).unwrap_or(src.len());
        if junk > 0 {
            let is_whitespace = src[..junk].iter().all(|b| b.is_ascii_whitespace());
            src.advance(junk);
            if !is_whitespace {
                return Err(MllpError::OutsideBlock(junk));
            }
        }
        if src.is_empty() {
            return Ok(None);
        }
        match find_end(&src[1..]) {
            Some(end) if end > self.max_bytes => {
                src.advance(1 + end + 2);
                Err(MllpError::TooLong(self.max_bytes))
            }
            Some(end) => {
                src.advance(1);
                let msg = src.split_to(end).freeze();
                src.advance(2);
                Ok(Some(msg))
            }
            None if src.len() > self.max_bytes + 2 => {
                self.discarding = true;
                src.clear();
                Err(MllpError::TooLong(self.max_bytes))
            }
            None => Ok(None),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, msg: T, dst: &mut BytesMut) -> Result<(), MllpError> {
        let msg = msg.as_ref();
        dst.reserve(msg.len() + 3);
        dst.put_u8(START);
        dst.put_slice(msg);
        dst.put_slice(&END);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(m: &[u8]) -> Vec<u8> {
        let mut v = vec![START];
        v.extend_from_slice(m);
        v.extend_from_slice(&END);
        v
    }

    #[test]
    fn frames_split_anywhere_come_back_whole() {
        let mut wire = frame(b"MSH|one");
        wire.extend(b"\r\n");
        wire.extend(frame(b"MSH|two"));
        for cut in 0..wire.len() {
            let mut c = MllpCodec::new(64);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(m) = c.decode(&mut buf).unwrap() {
                got.push(m);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(m) = c.decode(&mut buf).unwrap() {
                got.push(m);
            }
            assert_eq!(
                got,
                vec![Bytes::from("MSH|one"), Bytes::from("MSH|two")],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn too_long_and_junk_are_errors_and_the_next_frame_still_decodes() {
        let mut c = MllpCodec::new(8);
        let mut buf = BytesMut::from(&frame(b"0123456789")[..]);
        buf.extend_from_slice(b"junk");
        buf.extend_from_slice(&frame(b"ok"));
        assert!(matches!(c.decode(&mut buf), Err(MllpError::TooLong(8))));
        assert!(matches!(
            c.decode(&mut buf),
            Err(MllpError::OutsideBlock(4))
        ));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Bytes::from("ok")));
        // An unterminated flood is dropped as it comes, never buffered past the bound.
        let mut buf = BytesMut::new();
        buf.put_u8(START);
        buf.extend_from_slice(&[b'x'; 100]);
        assert!(matches!(c.decode(&mut buf), Err(MllpError::TooLong(8))));
        buf.extend_from_slice(&[b'x'; 100]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(&END);
        buf.extend_from_slice(&frame(b"next"));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Bytes::from("next")));
        let mut out = BytesMut::new();
        c.encode("abc", &mut out).unwrap();
        assert_eq!(&out[..], &frame(b"abc")[..]);
    }
}
