//! Demo runner and load generator (the link emulator is the `relay-emulator` crate).
#![warn(missing_docs)]

pub mod blast;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod loadgen;
pub mod nats;
pub mod report;
pub mod seqset;
pub mod versus;
