//! Sans-IO framer: turns a stream of interleaved samples into numbered, timestamped frames.

use std::time::Duration;

use relay_proto::model::{Frame, WaveformChunk, frame::Payload};

/// Chunks one waveform group. Frame `n` carries samples `[n*spf, (n+1)*spf)`; its capture time
/// follows from the sample index and the rate, so timestamps never drift with scheduling.
#[derive(Debug, Clone)]
pub struct WaveformFramer {
    stream_id: u32,
    channels: usize,
    rate_hz: f64,
    samples_per_frame: usize,
    epoch_ns: i64,
    next_seq: u64,
    next_sample: u64,
}

impl WaveformFramer {
    /// `epoch_ns`: capture time of sample 0 (UTC ns).
    pub fn new(
        stream_id: u32,
        channels: usize,
        rate_hz: f64,
        frame: Duration,
        epoch_ns: i64,
    ) -> Self {
        let samples_per_frame = ((rate_hz * frame.as_secs_f64()).round() as usize).max(1);
        Self {
            stream_id,
            channels: channels.max(1),
            rate_hz,
            samples_per_frame,
            epoch_ns,
            next_seq: 0,
            next_sample: 0,
        }
    }

    /// Samples per channel in one frame.
    pub fn samples_per_frame(&self) -> usize {
        self.samples_per_frame
    }

    /// Index of the first sample of the next frame.
    pub fn next_sample_index(&self) -> u64 {
        self.next_sample
    }

    /// Seconds of signal from sample 0 to the end of the next frame of `count` samples: the
    /// earliest moment (in signal time) that frame can exist.
    pub fn signal_time_after(&self, count: usize) -> f64 {
        (self.next_sample + count as u64) as f64 / self.rate_hz
    }

    /// Capture time of sample `sample_index` (UTC ns).
    pub fn capture_time_ns(&self, sample_index: u64) -> i64 {
        self.epoch_ns
            .saturating_add((sample_index as f64 * 1e9 / self.rate_hz).round() as i64)
    }

    /// Builds the next frame from `interleaved` (a multiple of the channel count).
    pub fn frame(&mut self, interleaved: Vec<i32>) -> Frame {
        let count = interleaved.len() / self.channels;
        let frame = Frame {
            stream_id: self.stream_id,
            seq: self.next_seq,
            capture_time_ns: self.capture_time_ns(self.next_sample),
            payload: Some(Payload::Waveform(WaveformChunk {
                first_sample_index: self.next_sample,
                sample_count: count as u32,
                samples: interleaved,
                ..WaveformChunk::default()
            })),
        };
        self.next_seq += 1;
        self.next_sample += count as u64;
        frame
    }
}

/// Numbers frames of a non-waveform stream (vitals, location, events).
#[derive(Debug, Clone)]
pub struct SequenceCounter {
    stream_id: u32,
    next_seq: u64,
}

impl SequenceCounter {
    /// Numbers the frames of stream `stream_id` from 0.
    pub fn new(stream_id: u32) -> Self {
        Self {
            stream_id,
            next_seq: 0,
        }
    }

    /// The next frame, captured at `capture_time_ns`.
    pub fn frame(&mut self, capture_time_ns: i64, payload: Payload) -> Frame {
        let f = Frame {
            stream_id: self.stream_id,
            seq: self.next_seq,
            capture_time_ns,
            payload: Some(payload),
        };
        self.next_seq += 1;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_numbered_and_timestamped_from_sample_index() {
        let mut f = WaveformFramer::new(2, 2, 360.0, Duration::from_millis(40), 1_000_000_000);
        assert_eq!(f.samples_per_frame(), 14);
        let a = f.frame(vec![0; 28]);
        let b = f.frame(vec![0; 28]);
        let c = f.frame(vec![0; 6]); // a short last frame
        assert_eq!((a.seq, b.seq, c.seq), (0, 1, 2));
        assert_eq!(a.capture_time_ns, 1_000_000_000);
        // 14 samples at 360 Hz = 38.888... ms
        assert_eq!(b.capture_time_ns, 1_000_000_000 + 38_888_889);
        match c.payload {
            Some(Payload::Waveform(w)) => {
                assert_eq!(w.first_sample_index, 28);
                assert_eq!(w.sample_count, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(f.next_sample_index(), 31);
    }

    #[test]
    fn at_least_one_sample_per_frame() {
        assert_eq!(
            WaveformFramer::new(0, 1, 10.0, Duration::from_millis(1), 0).samples_per_frame(),
            1
        );
    }
}
