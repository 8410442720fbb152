//! Waveform chunks on the wire: packing samples with the stream's encoding and unpacking them.

use crate::model::{WaveformChunk, WaveformEncoding, WaveformInfo};
pub use relay_codec::{CodecError, Encoder};

/// Why a packed chunk could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The stream's encoding is not one this build decodes.
    #[error("waveform encoding {0} not supported")]
    Unsupported(i32),
    /// A packed chunk on a stream declared as plain samples, or both forms at once.
    #[error("chunk form does not match the stream's encoding")]
    Form,
    /// More samples than `max_samples` (a small packed chunk could otherwise expand into
    /// any amount of memory).
    #[error("{0} samples exceed the bound of {1}")]
    TooMany(usize, usize),
    /// The packed bytes do not decode to the chunk's samples.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The values the codec predicts each channel's first sample by: its baselines.
pub fn centers(info: &WaveformInfo) -> Vec<i32> {
    info.channels.iter().map(|c| c.baseline).collect()
}

/// An encoder for a stream whose descriptor asks for a codec, None for plain samples.
pub fn encoder_for(info: &WaveformInfo) -> Result<Option<Encoder>, CodecError> {
    match info.encoding() {
        WaveformEncoding::Samples => Ok(None),
        WaveformEncoding::Lpc1 => Encoder::new(&centers(info)).map(Some),
    }
}

/// Moves the chunk's samples into `packed` with `encoder`.
pub fn pack(chunk: &mut WaveformChunk, encoder: &mut Encoder) -> Result<(), CodecError> {
    let mut packed = Vec::new();
    encoder.encode(&chunk.samples, &mut packed)?;
    chunk.packed = packed;
    chunk.samples = Vec::new();
    Ok(())
}

/// Turns a chunk of a stream described by `info` into plain samples (a chunk already plain is
/// left as it is), holding at most `max_samples` samples.
pub fn unpack(
    chunk: &mut WaveformChunk,
    info: &WaveformInfo,
    max_samples: usize,
) -> Result<(), UnpackError> {
    let encoding = WaveformEncoding::try_from(info.encoding)
        .map_err(|_| UnpackError::Unsupported(info.encoding))?;
    match encoding {
        WaveformEncoding::Samples if chunk.packed.is_empty() => Ok(()),
        WaveformEncoding::Samples => Err(UnpackError::Form),
        WaveformEncoding::Lpc1 => {
            if !chunk.samples.is_empty() {
                return Err(UnpackError::Form);
            }
            let count = chunk.sample_count as usize;
            let total = count.saturating_mul(info.channels.len());
            if total > max_samples {
                return Err(UnpackError::TooMany(total, max_samples));
            }
            let mut samples = Vec::new();
            relay_codec::decode(&chunk.packed, &centers(info), count, &mut samples)?;
            chunk.samples = samples;
            chunk.packed = Vec::new();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChannelInfo;

    fn info(encoding: WaveformEncoding) -> WaveformInfo {
        WaveformInfo {
            sample_rate_hz: 500.0,
            channels: vec![
                ChannelInfo {
                    baseline: 1024,
                    gain: 200.0,
                    ..ChannelInfo::default()
                };
                2
            ],
            encoding: encoding as i32,
            ..WaveformInfo::default()
        }
    }

    #[test]
    fn packed_chunks_unpack_to_the_same_samples_within_bounds() {
        let lpc = info(WaveformEncoding::Lpc1);
        let samples: Vec<i32> = (0..40).map(|i| 1024 + (i * 7) % 23).collect();
        let plain = WaveformChunk {
            first_sample_index: 20,
            sample_count: 20,
            samples: samples.clone(),
            ..WaveformChunk::default()
        };
        let mut chunk = plain.clone();
        let mut encoder = encoder_for(&lpc).ok().flatten();
        let Some(encoder) = encoder.as_mut() else {
            panic!("LPC1 streams get an encoder");
        };
        pack(&mut chunk, encoder).unwrap_or_else(|e| panic!("{e}"));
        assert!(chunk.samples.is_empty() && !chunk.packed.is_empty());
        assert!(matches!(
            unpack(&mut chunk.clone(), &lpc, 39),
            Err(UnpackError::TooMany(40, 39))
        ));
        assert!(matches!(
            unpack(&mut chunk.clone(), &info(WaveformEncoding::Samples), 1000),
            Err(UnpackError::Form)
        ));
        unpack(&mut chunk, &lpc, 40).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(chunk, plain);
        // Plain chunks of a plain stream pass untouched; on a packed stream they are refused.
        let mut same = plain.clone();
        unpack(&mut same, &info(WaveformEncoding::Samples), 40).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(same, plain);
        assert!(matches!(
            unpack(&mut same, &lpc, 40),
            Err(UnpackError::Form)
        ));
        let mut unknown = info(WaveformEncoding::Lpc1);
        unknown.encoding = 99;
        assert!(matches!(
            unpack(&mut chunk, &unknown, 40),
            Err(UnpackError::Unsupported(99))
        ));
    }
}
