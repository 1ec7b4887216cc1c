//! The example programs' global allocator, chosen at build time so that the
//! demo server and the benchmarks can be measured under each of the three
//! allocators the field uses, from one source: jemalloc (the default),
//! the system allocator (`--features testkit/alloc-system`) or mimalloc
//! (`--features testkit/alloc-mimalloc`). The library sets none: choosing
//! an allocator is the application's call.
//!
//! Each program declares it once:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;
//! ```
//!
//! and prints [`NAME`] in its header, so a figure always says which
//! allocator produced it.

#[cfg(feature = "alloc-mimalloc")]
mod chosen {
    pub(super) type Chosen = mimalloc::MiMalloc;
    pub(super) const CHOSEN: Chosen = mimalloc::MiMalloc;
    pub(super) const NAME: &str = "mimalloc";
}

#[cfg(all(feature = "alloc-system", not(feature = "alloc-mimalloc")))]
mod chosen {
    pub(super) type Chosen = std::alloc::System;
    pub(super) const CHOSEN: Chosen = std::alloc::System;
    pub(super) const NAME: &str = "system (glibc malloc)";
}

#[cfg(not(any(feature = "alloc-system", feature = "alloc-mimalloc")))]
mod chosen {
    pub(super) type Chosen = tikv_jemallocator::Jemalloc;
    pub(super) const CHOSEN: Chosen = tikv_jemallocator::Jemalloc;
    pub(super) const NAME: &str = "jemalloc";
}

/// The allocator type this build chose.
pub type Chosen = chosen::Chosen;
/// The value to declare `#[global_allocator]` with.
pub const CHOSEN: Chosen = chosen::CHOSEN;
/// The allocator's name, for a program's header.
pub const NAME: &str = chosen::NAME;
