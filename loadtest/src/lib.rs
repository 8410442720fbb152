//! Demo runner, trace-driven link emulator and load generator.

pub mod demo;
pub mod emulator;
