//! The benchmark programs' shared parts. Benchmarks are programs (in
//! `examples/`), not tests: these modules print nothing and decide nothing,
//! they measure.
//!
//! - [`load_clients`]: N minimal WebSocket clients on one thread, with the
//!   counters they share (the fan-out benchmark's load);
//! - [`payload`]: the fan-out benchmark's 64-byte broadcast and its parser;
//! - [`histogram`]: a fixed-footprint latency histogram;
//! - [`naive_hub`]: the baseline server, written as the actix chat example
//!   writes one;
//! - [`proc_stats`]: CPU time, memory and load from `/proc`.

pub mod histogram;
pub mod load_clients;
pub mod naive_hub;
pub mod payload;
pub mod proc_stats;
