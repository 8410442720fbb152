//! HL7 v2 for the relay. Patient monitors and monitor gateways export observations as IHE PCD-01
//! `ORU^R01` messages over MLLP; integration engines in hospitals take the same. This crate
//! holds what both ends need and no I/O: the MLLP frame codec (bounded), parsing a PCD-01
//! message into numerics and waveform channels (IHE Waveform Content Module: one `NA` OBX per
//! channel, sample rate and resolution as attribute OBXs below it), acknowledgements, and
//! building PCD-01 messages. Parsing of the HL7 structure itself is the `hl7-parser` crate's.
#![warn(missing_docs)]

pub mod mllp;
pub mod pcd01;

pub use mllp::{MllpCodec, MllpError};
pub use pcd01::{AckCode, Numeric, Observations, Pcd01Error, WaveChannel, ack, escape, parse_oru};
