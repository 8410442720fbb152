use proptest::prelude::*;

use super::*;

fn round_trip(interleaved: &[i32], centers: &[i32]) -> Vec<u8> {
    let mut enc = Encoder::new(centers).unwrap_or_else(|e| panic!("encoder: {e}"));
    let mut bytes = Vec::new();
    enc.encode(interleaved, &mut bytes)
        .unwrap_or_else(|e| panic!("encode: {e}"));
    let mut back = Vec::new();
    decode(
        &bytes,
        centers,
        interleaved.len() / centers.len(),
        &mut back,
    )
    .unwrap_or_else(|e| panic!("decode: {e}"));
    assert_eq!(back, interleaved);
    bytes
}

#[test]
fn flat_lines_and_leads_off_cost_almost_nothing() {
    // Two channels stuck at the ADC rails (leads off), one at its baseline, 20 samples.
    let frame: Vec<i32> = (0..20).flat_map(|_| [i32::MIN, i32::MAX, 0]).collect();
    let bytes = round_trip(&frame, &[0, 0, 0]);
    // Headers (9 bits each) plus the first samples' distance from the centre.
    assert!(bytes.len() <= 25, "{} bytes", bytes.len());
}

#[test]
fn extreme_values_and_steps_round_trip() {
    let frame = [
        i32::MIN,
        i32::MAX,
        i32::MAX,
        i32::MIN,
        0,
        -1,
        i32::MIN,
        i32::MIN,
        1,
        i32::MAX,
        i32::MIN + 1,
        7,
    ];
    round_trip(&frame, &[i32::MAX, i32::MIN]);
    round_trip(&frame, &[0, 0, 0, 0]);
    round_trip(&frame, &[5; 12]);
}

#[test]
fn derived_limb_leads_are_coded_from_i_and_ii() {
    // I and II independent noise-like signals; III = II - I, aVR = -(I + II) / 2 rounded.
    let mut state = 12345u32;
    let mut next = || {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        ((state >> 16) % 2001) as i32 - 1000
    };
    let mut frame = Vec::new();
    for _ in 0..40 {
        let (i, ii) = (next(), next());
        frame.extend([i, ii, ii - i, (-(i + ii) as f64 / 2.0).round() as i32]);
    }
    let two = round_trip(
        &frame
            .chunks(4)
            .flat_map(|c| [c[0], c[1]])
            .collect::<Vec<_>>(),
        &[0, 0],
    );
    let four = round_trip(&frame, &[0, 0, 0, 0]);
    // III is free, aVR costs about a bit a sample.
    assert!(
        four.len() < two.len() + 2 * 40 / 8 + 8,
        "{} vs {}",
        four.len(),
        two.len()
    );
}

#[test]
fn corrupt_or_truncated_input_is_an_error_not_a_panic() {
    let frame: Vec<i32> = (0..40).map(|i| (i * 37 % 101) - 50).collect();
    let bytes = round_trip(&frame, &[0, 0]);
    let mut out = Vec::new();
    for cut in 0..bytes.len() {
        assert!(decode(&bytes[..cut], &[0, 0], 20, &mut out).is_err());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        decode(&longer, &[0, 0], 20, &mut out),
        Err(CodecError::TrailingBytes(1))
    );
    // A count larger than the encoded one runs out of bits.
    assert!(decode(&bytes, &[0, 0], 21, &mut out).is_err());
    assert!(decode(&bytes, &[], 20, &mut out).is_err());
}

#[test]
fn real_records_round_trip_frame_by_frame() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ecg");
    for name in ["100", "s0010_re"] {
        let record = relay_wfdb::read_record(&std::path::Path::new(dir).join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let channels = record.header.signals.len();
        let centers: Vec<i32> = record.header.signals.iter().map(|s| s.baseline).collect();
        let per_frame = (record.header.sampling_frequency * 0.040).round() as usize;
        let mut enc = Encoder::new(&centers).unwrap_or_else(|e| panic!("{e}"));
        let (mut raw, mut packed, mut out, mut bytes) = (0, 0, Vec::new(), Vec::new());
        for frame in record.samples.chunks(per_frame * channels).take(2000) {
            bytes.clear();
            enc.encode(frame, &mut bytes)
                .unwrap_or_else(|e| panic!("{e}"));
            out.clear();
            decode(&bytes, &centers, frame.len() / channels, &mut out)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(out, frame, "{name}");
            raw += frame.len() * 2;
            packed += bytes.len();
        }
        // Far below the 16-bit size (the exact ratios are in the loadtest codec report).
        assert!(packed * 2 < raw, "{name}: {packed} of {raw}");
    }
}

fn signal() -> impl Strategy<Value = (usize, Vec<i32>, Vec<i32>)> {
    (1usize..8, 1usize..64).prop_flat_map(|(channels, n)| {
        let sample = prop_oneof![
            4 => -2048i32..2048,
            1 => any::<i32>(),
            1 => Just(i32::MIN),
            1 => Just(i32::MAX),
            1 => Just(0),
        ];
        (
            Just(channels),
            proptest::collection::vec(any::<i32>(), channels),
            proptest::collection::vec(sample, channels * n),
        )
    })
}

proptest! {
    #[test]
    fn any_frame_round_trips((_, centers, samples) in signal()) {
        round_trip(&samples, &centers);
    }

    #[test]
    fn smooth_and_related_channels_round_trip(
        start in -30_000i32..30_000,
        slope in -200i32..200,
        noise in proptest::collection::vec(-3i32..=3, 1..200),
        clip in 0i32..30_000,
    ) {
        // A ramp with noise, clipped (an amplifier at its rail), a derived second and third
        // lead: what the inter-lead search and the order search see on real monitors.
        let mut frame = Vec::new();
        for (t, e) in noise.iter().enumerate() {
            let a = (start + slope * t as i32 + e).clamp(-clip, clip);
            let b = a / 2 + e;
            frame.extend([a, b, b - a, -(a + b) / 2]);
        }
        round_trip(&frame, &[0, 0, 0, 0]);
    }

    #[test]
    fn random_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        channels in 1usize..6,
        count in 0usize..50,
    ) {
        let mut out = Vec::new();
        let _ = decode(&data, &vec![0; channels], count, &mut out);
        prop_assert!(out.is_empty() || out.len() == channels * count);
    }
}
