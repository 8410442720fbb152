//! Wire protocol (agent <-> ingest) and public gRPC API (ingest -> emergency departments).
//!
//! Generated from `proto/` with protox + tonic-prost-build; this crate adds the constants both
//! sides must agree on and the small pure helpers and tables around them: sequence ranges
//! ([`seq`]), the clock offset estimate ([`clock`]), close codes, the delivery [`Class`] of a stream kind, the MDC/UCUM code
//! table ([`codes`]) and waveform chunk packing ([`waveform`]). Nothing else lives here, so every crate can depend on it cheaply.
#![warn(missing_docs)]
#![allow(clippy::doc_lazy_continuation)]

/// Generated types of the public API and the shared data model.
pub mod telemetry {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("ambulance.telemetry.v1");
    }
}

/// Generated types of the agent <-> ingest protocol.
pub mod wire {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("ambulance.wire.v1");
    }
}

/// Generated types between ingest nodes sharing one log (not a public interface).
pub mod cluster {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("ambulance.cluster.v1");
    }
}

pub mod class;
pub mod clock;
pub mod codes;
pub mod seq;
pub mod waveform;

pub use class::Class;

pub use telemetry::v1 as model;

/// Encoded `FileDescriptorSet` of every .proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// ALPN protocol id of the agent <-> ingest protocol; the version is part of the id so an
/// incompatible peer fails the handshake instead of misreading frames.
pub const ALPN: &[u8] = b"ambulance-relay/1";

/// Version carried in Hello/HelloAck.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest encoded frame either side accepts (one frame per QUIC stream).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;

/// Largest control message (Hello with many stream descriptors, Acks).
pub const MAX_CONTROL_MESSAGE_BYTES: usize = 1024 * 1024;

/// QUIC application error codes the ingest uses when it closes a connection. They travel to the
/// agent, which logs them, so each names one cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal = 0,
    /// A frame or control message could not be decoded or is inconsistent.
    Malformed = 1,
    /// A frame exceeded the size bound.
    FrameTooLarge = 2,
    /// Hello missing, late or of an unsupported protocol version.
    BadHandshake = 3,
    /// The Hello claimed another vehicle than the certificate names.
    IdentityMismatch = 4,
    /// The certificate carries no usable vehicle id.
    BadIdentity = 5,
    /// The ingest is shutting down.
    ServerShutdown = 6,
    /// The ingest cannot store right now.
    Overloaded = 7,
    /// The Hello redeclared a known session with other streams or descriptors (a session's
    /// descriptors are fixed at its first Hello).
    SessionMismatch = 8,
    /// The vehicle is over a quota (connections at once, new sessions per hour).
    QuotaExceeded = 9,
    /// The peer's certificate was revoked.
    Revoked = 10,
}

impl CloseCode {
    /// The code as carried in a QUIC CONNECTION_CLOSE frame.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code a peer sent, if it is one we know.
    pub fn from_u64(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::Malformed,
            2 => Self::FrameTooLarge,
            3 => Self::BadHandshake,
            4 => Self::IdentityMismatch,
            5 => Self::BadIdentity,
            6 => Self::ServerShutdown,
            7 => Self::Overloaded,
            8 => Self::SessionMismatch,
            9 => Self::QuotaExceeded,
            10 => Self::Revoked,
            _ => return None,
        })
    }

    /// Short snake_case name, used as a bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Malformed => "malformed",
            Self::FrameTooLarge => "frame_too_large",
            Self::BadHandshake => "bad_handshake",
            Self::IdentityMismatch => "identity_mismatch",
            Self::BadIdentity => "bad_identity",
            Self::ServerShutdown => "server_shutdown",
            Self::Overloaded => "overloaded",
            Self::SessionMismatch => "session_mismatch",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Revoked => "revoked",
        }
    }
}

/// Bounded metric label for a stream kind (the raw i32 may come from the network).
pub fn kind_label(kind: i32) -> &'static str {
    match model::StreamKind::try_from(kind) {
        Ok(model::StreamKind::Events) => "events",
        Ok(model::StreamKind::Waveform) => "waveform",
        Ok(model::StreamKind::Vitals) => "vitals",
        Ok(model::StreamKind::Location) => "location",
        _ => "other",
    }
}

/// Whether `id` is acceptable as a vehicle id: it becomes a metric label, a file name and a key,
/// so it is short and plain.
pub fn is_valid_vehicle_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn close_codes_round_trip() {
        for code in 0..11u64 {
            let c = CloseCode::from_u64(code).unwrap();
            assert_eq!(c.as_u32() as u64, code);
        }
        assert_eq!(CloseCode::from_u64(99), None);
    }

    #[test]
    fn vehicle_ids() {
        assert!(is_valid_vehicle_id("amb-17.north_2"));
        assert!(!is_valid_vehicle_id(""));
        assert!(!is_valid_vehicle_id("a b"));
        assert!(!is_valid_vehicle_id("x/../y"));
        assert!(!is_valid_vehicle_id(&"a".repeat(65)));
    }

    #[test]
    fn descriptor_set_contains_services() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<&str> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().filter_map(|s| s.name.as_deref()))
            .collect();
        assert_eq!(services, vec!["Telemetry"]);
    }

    #[test]
    fn frame_round_trip() {
        let frame = model::Frame {
            stream_id: 3,
            seq: 41,
            capture_time_ns: 1_700_000_000_000_000_000,
            payload: Some(model::frame::Payload::Waveform(model::WaveformChunk {
                first_sample_index: 14_400,
                sample_count: 2,
                samples: vec![995, 1011, -3, 32767],
                ..Default::default()
            })),
        };
        let bytes = frame.encode_to_vec();
        assert_eq!(model::Frame::decode(bytes.as_slice()).unwrap(), frame);
    }
}
