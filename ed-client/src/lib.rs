//! The emergency-department side of the relay, as a client of the public gRPC API: the
//! connection and subscription library ([`client`]), the terminal dashboard ([`view`]) and the
//! monitor loop behind the `ed-monitor` binary ([`monitor`]), and the clinicians' browser view
//! behind `ed-web` ([`web`]). It depends on the API only, never on the ingest's internals, so it
//! runs on any ED machine.
#![warn(missing_docs)]

pub mod client;
pub mod fhir;
pub mod hl7_feed;
pub mod monitor;
pub mod resume;
pub mod view;
pub mod web;
