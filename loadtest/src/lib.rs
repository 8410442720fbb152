//! Demo runner (this file) and, later, the trace-driven link emulator and load generator.

pub mod demo;
