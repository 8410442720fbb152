//! Sans-IO Hello handshake of one bearer connection, agent side: after the QUIC handshake the
//! agent opens the control stream and sends its Hello (vehicle id, session, stream
//! descriptors); the ingest answers HelloAck with the protocol version. The whole exchange,
//! QUIC handshake included, has one deadline.
//!
//! The shell writes what [`ClientHandshake::poll_transmit`] returns, feeds the first control
//! message to [`ClientHandshake::handle_message`], and gives up at
//! [`ClientHandshake::poll_timeout`].

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::PROTOCOL_VERSION;
use relay_proto::wire::v1::{ControlMessage, Hello, HelloAck, control_message::Body};
use tokio::time::Instant;

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The deadline passed before the HelloAck arrived (a silent path).
    #[error("handshake timed out")]
    Timeout,
    /// The ingest's first control message did not decode.
    #[error("undecodable reply to Hello: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// The ingest's first control message was not a HelloAck.
    #[error("expected HelloAck, got {0}")]
    Unexpected(&'static str),
    /// The ingest speaks another protocol version.
    #[error("ingest speaks protocol version {theirs}, we speak {ours}")]
    Version {
        /// Ours, [`PROTOCOL_VERSION`].
        ours: u32,
        /// What the HelloAck carried.
        theirs: u32,
    },
}

/// Name of a control message body, for errors.
pub fn body_name(body: Option<&Body>) -> &'static str {
    match body {
        Some(Body::Hello(_)) => "Hello",
        Some(Body::HelloAck(_)) => "HelloAck",
        Some(Body::Ack(_)) => "Ack",
        Some(Body::Ping(_)) => "Ping",
        Some(Body::Pong(_)) => "Pong",
        Some(Body::EventAck(_)) => "EventAck",
        None => "an empty message",
    }
}

/// One handshake in progress.
#[derive(Debug)]
pub struct ClientHandshake {
    hello: Option<Hello>,
    deadline: Instant,
}

impl ClientHandshake {
    /// Starts a handshake at `now` that must complete within `timeout`.
    pub fn new(hello: &Hello, now: Instant, timeout: Duration) -> Self {
        Self {
            hello: Some(hello.clone()),
            deadline: now + timeout,
        }
    }

    /// The Hello to write on the control stream, once, stamped with our clock `wall_ns` (the
    /// start of the first clock exchange).
    pub fn poll_transmit(&mut self, wall_ns: i64) -> Option<Bytes> {
        let mut hello = self.hello.take()?;
        hello.agent_time_ns = wall_ns;
        let msg = ControlMessage {
            body: Some(Body::Hello(hello)),
        };
        Some(Bytes::from(msg.encode_to_vec()))
    }

    /// The first control message from the ingest: the handshake is done or failed.
    pub fn handle_message(&mut self, msg: &[u8]) -> Result<HelloAck, HandshakeError> {
        let msg = ControlMessage::decode(msg).map_err(HandshakeError::Undecodable)?;
        match msg.body {
            Some(Body::HelloAck(ack)) if ack.protocol_version == PROTOCOL_VERSION => Ok(ack),
            Some(Body::HelloAck(ack)) => Err(HandshakeError::Version {
                ours: PROTOCOL_VERSION,
                theirs: ack.protocol_version,
            }),
            other => Err(HandshakeError::Unexpected(body_name(other.as_ref()))),
        }
    }

    /// Fails the handshake once its deadline has passed.
    pub fn handle_timeout(&self, now: Instant) -> Result<(), HandshakeError> {
        if now >= self.deadline {
            Err(HandshakeError::Timeout)
        } else {
            Ok(())
        }
    }

    /// The deadline of the whole exchange.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::wire::v1::Ack;

    fn reply(body: Body) -> Vec<u8> {
        ControlMessage { body: Some(body) }.encode_to_vec()
    }

    #[test]
    fn sends_hello_once_and_accepts_a_matching_hello_ack() {
        let t0 = Instant::now();
        let hello = Hello {
            vehicle_id: "amb-1".into(),
            session_id: 7,
            protocol_version: PROTOCOL_VERSION,
            ..Hello::default()
        };
        let mut hs = ClientHandshake::new(&hello, t0, Duration::from_secs(5));
        let sent = ControlMessage::decode(hs.poll_transmit(7).unwrap()).unwrap();
        let stamped = Hello {
            agent_time_ns: 7,
            ..hello
        };
        assert_eq!(sent.body, Some(Body::Hello(stamped)));
        assert!(hs.poll_transmit(8).is_none());
        let ack = hs
            .handle_message(&reply(Body::HelloAck(HelloAck {
                protocol_version: PROTOCOL_VERSION,
                ingest_time_ns: 42,
                hello_received_ns: 41,
                ..Default::default()
            })))
            .unwrap();
        assert_eq!(ack.ingest_time_ns, 42);
    }

    #[test]
    fn refuses_other_versions_other_messages_garbage_and_lateness() {
        let t0 = Instant::now();
        let mut hs = ClientHandshake::new(&Hello::default(), t0, Duration::from_secs(5));
        let v = hs.handle_message(&reply(Body::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION + 1,
            ..HelloAck::default()
        })));
        assert!(matches!(v, Err(HandshakeError::Version { .. })), "{v:?}");
        let u = hs.handle_message(&reply(Body::Ack(Ack::default())));
        assert!(matches!(u, Err(HandshakeError::Unexpected("Ack"))), "{u:?}");
        let g = hs.handle_message(&[0xff, 0xff, 0xff]);
        assert!(matches!(g, Err(HandshakeError::Undecodable(_))), "{g:?}");
        assert!(hs.handle_timeout(t0 + Duration::from_millis(4999)).is_ok());
        assert!(matches!(
            hs.handle_timeout(t0 + Duration::from_secs(5)),
            Err(HandshakeError::Timeout)
        ));
    }
}
