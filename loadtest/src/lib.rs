//! Demo runner, trace-driven link emulator and load generator.

pub mod cli;
pub mod demo;
pub mod emulator;
pub mod loadgen;
pub mod report;
pub mod seqset;
