//! Patient monitor input over HL7 v2 (issue 14): IHE PCD-01 ORU^R01 messages sent to the
//! agent's MLLP port arrive at a gRPC subscriber with the same values, codes and units; a
//! malformed message is NAKed with its reason and the next one is accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::model::frame::Payload;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vehicle_agent::Agent;
use vehicle_agent::config::{Hl7Channel, Hl7Listener, Hl7Waveform, SourceConfig};

const LEADS: [(u32, &str); 3] = [
    (131_329, "MDC_ECG_LEAD_I"),
    (131_330, "MDC_ECG_LEAD_II"),
    (131_331, "MDC_ECG_LEAD_III"),
];
const MESSAGES: usize = 10;
const SAMPLES: usize = 20; // 40 ms at 500 Hz

/// Sample `i` of lead `l` in message `m`, in mV with microvolt resolution.
fn value(m: usize, l: usize, i: usize) -> f64 {
    let uv = ((m * SAMPLES + i) as i64 * 37 + l as i64 * 500) % 3000 - 1500;
    uv as f64 / 1000.0
}

/// A PCD-01 message after the IHE PCD Technical Framework's examples: HR, SpO2 and NIBP
/// systolic as NM, three ECG leads as NA with their sample rate as an attribute OBX.
fn pcd01(m: usize) -> String {
    let mut segs = vec![
        format!(
            "MSH|^~\\&|MONITOR^0012A3FFFE000001^EUI-64|ACME|RELAY|AMB|2026112910{:04}+0000||ORU^R01^ORU_R01|MSG{m:04}|P|2.6|||AL|NE||8859/1|||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO",
            m
        ),
        "PID|||12345^^^Hospital^MR||Doe^John".into(),
        format!(
            "OBR|1||MSG{m:04}^MONITOR|182777000^monitoring of patient^SCT|||2026112910{m:04}+0000"
        ),
        format!(
            "OBX|1|NM|147842^MDC_ECG_HEART_RATE^MDC|1.0.1.1|{}|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||R",
            70 + m
        ),
        format!(
            "OBX|2|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.0.1.2|{}|262688^MDC_DIM_PERCENT^MDC|||||R",
            95.5 + m as f64 / 10.0
        ),
        "OBX|3|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.0.1.3|121|266016^MDC_DIM_MMHG^MDC|||||R"
            .into(),
    ];
    let mut n = 4;
    for (l, (code, name)) in LEADS.iter().enumerate() {
        let values: Vec<String> = (0..SAMPLES)
            .map(|i| format!("{}", value(m, l, i)))
            .collect();
        segs.push(format!(
            "OBX|{n}|NA|{code}^{name}^MDC|1.0.2.{}|{}|266418^MDC_DIM_MILLI_VOLT^MDC|||||R",
            l + 1,
            values.join("^")
        ));
        segs.push(format!(
            "OBX|{}|NM|67981^MDC_ATTR_SAMP_RATE^MDC|1.0.2.{}.1|500|264608^MDC_DIM_PER_SEC^MDC|||||R",
            n + 1,
            l + 1
        ));
        n += 2;
    }
    segs.join("\r")
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    sock: &mut S,
    msg: &str,
) -> String {
    let mut out = vec![0x0b];
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(&[0x1c, 0x0d]);
    sock.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(&[0x1c, 0x0d]) {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte))
            .await
            .expect("an ACK within 10 s")
            .unwrap();
        assert_eq!(n, 1, "the agent closed the connection");
        buf.push(byte[0]);
    }
    assert_eq!(buf[0], 0x0b);
    String::from_utf8(buf[1..buf.len() - 2].to_vec()).unwrap()
}

/// (MSA-1, MSA-2, MSA-3) of an acknowledgement.
fn msa(ack: &str) -> (String, String, String) {
    let seg = ack
        .split('\r')
        .find(|s| s.starts_with("MSA|"))
        .expect("MSA");
    let f: Vec<&str> = seg.split('|').collect();
    let get = |i: usize| f.get(i).copied().unwrap_or("").to_owned();
    (get(1), get(2), get(3))
}

async fn connect_when_listening(listen: SocketAddr) -> TcpStream {
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(listen).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agent's MLLP port {listen} never accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_over_tls_takes_messages_and_refuses_plain_text() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let (_, port) = free_ports();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    // Any certificate the monitor gateway trusts; here the development "localhost" one.
    let monitor = Hl7Listener {
        listen,
        tls_cert: Some(pki.path().join("ingest.pem")),
        tls_key: Some(pki.path().join("ingest.key")),
        max_message_bytes: 64 * 1024,
        waveforms: Vec::new(),
    };
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-2",
        ingest.quic_addr,
        vec![SourceConfig::Hl7Mllp(monitor)],
    ))
    .await
    .unwrap();
    // Plain MLLP to a TLS port: no acknowledgement (at most a TLS alert), then closed.
    let mut plain = connect_when_listening(listen).await;
    let mut frame = vec![0x0b];
    frame.extend_from_slice(pcd01(0).as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    plain.write_all(&frame).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer))
        .await
        .expect("the agent closes a connection that is not TLS");
    assert!(!answer.windows(3).any(|w| w == b"MSA"), "{answer:?}");

    relay_ops::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in relay_ops::pem::load_certs(&pki.path().join("hospital-ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = connect_when_listening(listen).await;
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    for m in 0..3 {
        let (code, control, _) = msa(&exchange(&mut tls, &pcd01(m)).await);
        assert_eq!((code.as_str(), control), ("AA", format!("MSG{m:04}")));
    }
    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(60),
        |c| c.vitals.len() >= 3,
    )
    .await;
    assert_eq!(collected.vitals.len(), 3);
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcd01_messages_from_a_monitor_arrive_with_values_codes_and_units() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let (_, port) = free_ports();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let monitor = Hl7Listener {
        listen,
        tls_cert: None,
        tls_key: None,
        max_message_bytes: 64 * 1024,
        waveforms: vec![Hl7Waveform {
            name: "ecg".into(),
            sample_rate_hz: 500.0,
            unit: "mV".into(),
            gain: 1000.0,
            channels: ["I", "II", "III"]
                .iter()
                .zip(LEADS)
                .map(|(n, (code, _))| Hl7Channel {
                    mdc_code: code,
                    name: (*n).into(),
                })
                .collect(),
        }],
    };
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vec![SourceConfig::Hl7Mllp(monitor)],
    ))
    .await
    .unwrap();
    let mut sock = connect_when_listening(listen).await;

    for m in 0..MESSAGES {
        let (code, control, _) = msa(&exchange(&mut sock, &pcd01(m)).await);
        assert_eq!((code.as_str(), control), ("AA", format!("MSG{m:04}")));
        if m == 3 {
            // A sample that is not a number: AE with the reason, nothing taken.
            let bad = pcd01(99)
                .replace("MSG0099", "BAD1")
                .replacen("^0.", "^zero.", 1);
            let (code, control, reason) = msa(&exchange(&mut sock, &bad).await);
            assert_eq!((code.as_str(), control.as_str()), ("AE", "BAD1"));
            assert!(reason.contains("not a number"), "{reason}");
            // Another message type: AR.
            let adt = "MSH|^~\\&|ADT|H|RELAY|AMB|20261129||ADT^A01|BAD2|P|2.6\rPID|||1";
            let (code, control, reason) = msa(&exchange(&mut sock, adt).await);
            assert_eq!((code.as_str(), control.as_str()), ("AR", "BAD2"));
            // The reason is escaped as HL7 text: ^ is \S\.
            assert!(reason.contains("ADT\\S\\A01"), "{reason}");
            // Garbage inside a block: AR, and the connection goes on.
            let (code, _, _) = msa(&exchange(&mut sock, "not hl7 at all").await);
            assert_eq!(code, "AR");
        }
    }

    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(60),
        |c| {
            c.vitals.len() >= MESSAGES && c.waveform_samples("amb-1") >= (MESSAGES * SAMPLES) as u64
        },
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    assert_eq!(
        collected.vitals.len(),
        MESSAGES,
        "one vitals frame per accepted message"
    );
    let mut vitals: Vec<_> = collected.vitals.iter().map(|a| a.frame.clone()).collect();
    vitals.sort_by_key(|f| f.seq);
    for (m, f) in vitals.iter().enumerate() {
        let Some(Payload::Vitals(v)) = &f.payload else {
            panic!("{f:?}")
        };
        let got: Vec<(u32, &str, f64, &str)> = v
            .values
            .iter()
            .map(|s| (s.mdc_code, s.label.as_str(), s.value, s.unit.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (147_842, "HR", 70.0 + m as f64, "/min"),
                (150_456, "SpO2", 95.5 + m as f64 / 10.0, "%"),
                (150_021, "NIBP-sys", 121.0, "mm[Hg]"),
            ]
        );
    }
    let mut chunks: Vec<_> = collected
        .waveforms
        .iter()
        .map(|a| a.frame.clone())
        .collect();
    chunks.sort_by_key(|f| f.seq);
    assert_eq!(chunks.len(), MESSAGES);
    for (m, f) in chunks.iter().enumerate() {
        let Some(Payload::Waveform(w)) = &f.payload else {
            panic!("{f:?}")
        };
        assert_eq!(w.first_sample_index, (m * SAMPLES) as u64);
        let want: Vec<i32> = (0..SAMPLES)
            .flat_map(|i| (0..3).map(move |l| (value(m, l, i) * 1000.0).round() as i32))
            .collect();
        assert_eq!(w.samples, want, "message {m}");
    }
    // The stream is described with the channels' MDC codes, unit and calibration.
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    let list = client
        .list_vehicles(relay_proto::model::ListVehiclesRequest {})
        .await
        .unwrap()
        .into_inner();
    let v = list
        .vehicles
        .iter()
        .find(|v| v.vehicle_id == "amb-1")
        .unwrap();
    let ecg = v
        .streams
        .iter()
        .find_map(|s| s.descriptor.as_ref().and_then(|d| d.waveform.clone()))
        .unwrap();
    let channels: Vec<(u32, &str, &str, f64)> = ecg
        .channels
        .iter()
        .map(|c| (c.mdc_code, c.name.as_str(), c.unit.as_str(), c.gain))
        .collect();
    assert_eq!(
        channels,
        vec![
            (131_329, "I", "mV", 1000.0),
            (131_330, "II", "mV", 1000.0),
            (131_331, "III", "mV", 1000.0)
        ]
    );
    assert_eq!(ecg.sample_rate_hz, 500.0);
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
