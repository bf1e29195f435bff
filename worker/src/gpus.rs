//! GPU inventory and metrics: the `ditfleet-gpu` crate (NVML only, no libtorch).

pub use ditfleet_gpu::*;
