//! One image across many GPUs.
//!
//! - [`comm`]: the [`comm::Communicator`] interface (all-to-all, all-gather, all-reduce,
//!   broadcast, point-to-point) and the rank layout of a plan ([`comm::Mesh`]);
//! - [`threads`]: the in-process backend (CPU tensors; every strategy runs in CI);
//! - [`loopback`]: one rank with stand-in peers (one rank's share of a plan, measured on one GPU);
//! - [`nccl`]: the GPU backend (one thread per GPU, NCCL through cudarc);
//! - [`attention`]: exact sequence parallelism of Flux's joint attention: Ulysses, Ring, USP;
//! - [`stream`]: a communicator's side stream, ordered with the compute stream by events;
//! - [`graphs`]: CUDA graphs of a rank's step (one launch per step instead of one per kernel);
//! - [`pipefusion`]: PipeFusion (stages of blocks, patches of the image, one-step-stale K/V;
//!   approximate after its warm-up steps);
//! - [`plan`]: the degrees of a plan, parsing and validation;
//! - [`autotune`]: the measured plan table (fastest plan per image size on this node), on disk;
//! - [`vae`]: patch-parallel VAE decode (row bands, halo exchange, global GroupNorm statistics);
//! - [`health`]: device health beyond CUDA/NCCL errors (NVML: lost GPU, critical Xid, ECC);
//! - [`resilient`]: GPU isolation (quarantine a failing device, rebuild on the rest, retry);
//! - [`runner`]: the per-rank denoising loop (sequence and CFG parallel);
//! - [`pipeline`]: [`pipeline::ParallelPipeline`], the multi-GPU [`crate::Engine`] that owns the
//!   rank threads (data parallel over groups).

pub mod attention;
pub mod autotune;
pub mod comm;
pub mod graphs;
pub mod health;
pub mod loopback;
pub mod nccl;
pub mod pipefusion;
pub mod pipeline;
pub mod plan;
pub mod resilient;
pub mod runner;
pub mod stream;
pub mod threads;
pub mod vae;

pub use attention::{SeqLayout, TextMode, UspAttention};
pub use autotune::{PlanTable, autotune};
pub use comm::{CommError, CommFactory, Communicator, Mesh, RankComms};
pub use loopback::LoopbackComm;
pub use nccl::{NcclComm, NcclFactory};
pub use pipeline::ParallelPipeline;
pub use plan::Plan;
pub use resilient::{InjectedFault, ResilientParallel};
pub use threads::{ThreadComm, ThreadsFactory};
pub use vae::decode_patch_parallel;

/// Whether plans with PipeFusion stages can run (see [`plan::Plan::validate`]).
pub const PIPEFUSION_AVAILABLE: bool = true;
