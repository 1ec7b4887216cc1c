//! The benchmark programs' shared parts. Benchmarks are programs (in
//! `examples/`), not tests: these modules print nothing and decide nothing,
//! they measure.
//!
//! - [`child`]: a server in a child process, the control requests to it,
//!   and the command line's numbers;
//! - [`load_clients`]: N minimal WebSocket clients on one thread, with the
//!   counters they share (the fan-out benchmark's load);
//! - [`payload`]: the fan-out benchmark's 64-byte broadcast and its parser;
//! - [`histogram`]: a fixed-footprint latency histogram;
//! - [`naive_hub`]: the baseline server, written as the actix chat example
//!   writes one;
//! - [`peers`]: where the peer servers (Bun, Node `ws`) in `examples/peers/`
//!   are, and how to install them when they are not;
//! - [`proc_stats`]: CPU time, memory and load from `/proc`;
//! - [`syscalls`]: a process's system calls counted by `perf stat`;
//! - [`median`]: how every benchmark reduces its repeated runs.

pub mod child;
pub mod histogram;
pub mod load_clients;
pub mod naive_hub;
pub mod payload;
pub mod peers;
pub mod proc_stats;
pub mod syscalls;

/// The median of the figures that are numbers (a run that could not
/// measure a figure reports NaN, and is left out); NaN if none is.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_leaves_out_what_was_not_measured() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, f64::NAN, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([f64::NAN]).is_nan());
        assert!(median(Vec::new()).is_nan());
    }
}
