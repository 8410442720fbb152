//! Sans-IO Hello handshake, ingest side: the first control message of a bearer connection must
//! be a Hello, arrive within the deadline, name the vehicle of the certificate and declare
//! streams within our bounds; the answer is a HelloAck carrying our protocol version and clock.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::wire::v1::{ControlMessage, Hello, HelloAck, control_message::Body};
use relay_proto::{CloseCode, PROTOCOL_VERSION};
use tokio::time::Instant;

use super::validate::validate_hello;
use super::{Refusal, refuse};

/// One Hello exchange in progress.
#[derive(Debug, Clone, Copy)]
pub struct ServerHandshake {
    deadline: Instant,
}

impl ServerHandshake {
    /// The peer has until `now + timeout` to open its control stream and say Hello.
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Self {
            deadline: now + timeout,
        }
    }

    /// The deadline.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// The deadline passed without a Hello (`what` names what was missing).
    pub fn handle_timeout(&self, what: &str) -> Refusal {
        refuse(CloseCode::BadHandshake, format!("no {what} in time"))
    }

    /// The control stream ended (`None`) or failed before a Hello.
    pub fn handle_end(&self, error: Option<std::io::Error>) -> Refusal {
        match error {
            Some(e) => refuse(CloseCode::Malformed, format!("control stream: {e}")),
            None => refuse(
                CloseCode::BadHandshake,
                "control stream closed before hello",
            ),
        }
    }

    /// The first control message, from a peer whose certificate names `vehicle`.
    pub fn handle_message(&self, msg: &[u8], vehicle: &str) -> Result<Hello, Refusal> {
        let hello = match ControlMessage::decode(msg) {
            Ok(ControlMessage {
                body: Some(Body::Hello(h)),
            }) => h,
            Ok(_) => {
                return Err(refuse(
                    CloseCode::BadHandshake,
                    "first control message is not a hello",
                ));
            }
            Err(e) => {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("undecodable hello: {e}"),
                ));
            }
        };
        validate_hello(&hello, vehicle)?;
        Ok(hello)
    }

    /// The answer to an accepted Hello that arrived at `hello_received_ns`, sent at
    /// `ingest_time_ns` (our clock: the middle of the first clock exchange).
    /// `waveform_codec`: whether packed waveform frames are decoded here.
    pub fn hello_ack(hello_received_ns: i64, ingest_time_ns: i64, waveform_codec: bool) -> Bytes {
        let msg = ControlMessage {
            body: Some(Body::HelloAck(HelloAck {
                protocol_version: PROTOCOL_VERSION,
                ingest_time_ns,
                hello_received_ns,
                waveform_encodings: if waveform_codec {
                    vec![relay_proto::model::WaveformEncoding::Lpc1 as i32]
                } else {
                    Vec::new()
                },
            })),
        };
        Bytes::from(msg.encode_to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{StreamDescriptor, StreamKind};
    use relay_proto::wire::v1::Ack;

    fn hello(vehicle: &str) -> Vec<u8> {
        ControlMessage {
            body: Some(Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                vehicle_id: vehicle.into(),
                session_id: 1,
                streams: vec![StreamDescriptor {
                    stream_id: 0,
                    kind: StreamKind::Vitals as i32,
                    name: "vitals".into(),
                    waveform: None,
                }],
                agent_version: "test".into(),
                agent_time_ns: 0,
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_hello_ack_lists_the_codec_only_when_it_is_decoded() {
        let ack = ControlMessage::decode(ServerHandshake::hello_ack(8, 9, false)).unwrap();
        let Some(Body::HelloAck(ack)) = ack.body else {
            panic!("not a HelloAck");
        };
        assert!(ack.waveform_encodings.is_empty());
    }

    #[test]
    fn accepts_a_valid_hello_and_answers_with_our_version() {
        let hs = ServerHandshake::new(Instant::now(), Duration::from_secs(5));
        let h = hs.handle_message(&hello("amb-1"), "amb-1").unwrap();
        assert_eq!(h.session_id, 1);
        let ack = ControlMessage::decode(ServerHandshake::hello_ack(8, 9, true)).unwrap();
        assert_eq!(
            ack.body,
            Some(Body::HelloAck(HelloAck {
                protocol_version: PROTOCOL_VERSION,
                ingest_time_ns: 9,
                hello_received_ns: 8,
                waveform_encodings: vec![relay_proto::model::WaveformEncoding::Lpc1 as i32],
            }))
        );
    }

    #[test]
    fn refuses_other_identities_other_messages_garbage_and_silence() {
        let hs = ServerHandshake::new(Instant::now(), Duration::from_secs(5));
        let code = |r: Result<Hello, Refusal>| r.map(|_| ()).unwrap_err().code;
        assert_eq!(
            code(hs.handle_message(&hello("amb-2"), "amb-1")),
            CloseCode::IdentityMismatch
        );
        let ack = ControlMessage {
            body: Some(Body::Ack(Ack::default())),
        }
        .encode_to_vec();
        assert_eq!(
            code(hs.handle_message(&ack, "amb-1")),
            CloseCode::BadHandshake
        );
        assert_eq!(
            code(hs.handle_message(&[0xff, 0xff], "amb-1")),
            CloseCode::Malformed
        );
        assert_eq!(hs.handle_timeout("hello").code, CloseCode::BadHandshake);
        assert_eq!(hs.handle_end(None).code, CloseCode::BadHandshake);
    }
}
