//! One image across many GPUs.
//!
//! - [`comm`]: the [`comm::Communicator`] interface (all-to-all, all-gather, all-reduce,
//!   broadcast, point-to-point) and the rank layout of a plan ([`comm::Mesh`]);
//! - [`threads`]: the in-process backend (CPU tensors; every strategy runs in CI);
//! - `loopback` (feature `bench`): one rank with stand-in peers (one rank's share of a plan, measured on one GPU);
//! - [`nccl`]: the GPU backend (one thread per GPU, NCCL through cudarc);
//! - [`attention`]: exact sequence parallelism of a transformer's attention: Ulysses, Ring, USP;
//! - [`stream`]: a communicator's side stream, ordered with the compute stream by events;
//! - [`graphs`]: CUDA graphs of a rank's step (one launch per step instead of one per kernel);
//! - [`plan`]: the degrees of a plan, parsing and validation;
//! - [`autotune`]: the measured plan table (fastest plan per image size on this node), on disk;
//! - [`spatial`]: patch parallelism of convolutional models (row bands, halo-exchanged
//!   convolutions, global GroupNorm statistics, attention over gathered K/V), behind
//!   [`crate::nn::spatial::SpatialOps`];
//! - [`vae`]: patch-parallel VAE decode (a decoder run on [`spatial::Bands`]);
//! - [`cfg`]: CFG parallel (the two guidance branches on two ranks, combined by an all-gather);
//! - [`health`]: device health beyond CUDA/NCCL errors (NVML: lost GPU, critical Xid, ECC);
//! - [`resilient`]: GPU isolation (quarantine a failing device, rebuild on the rest, retry);
//! - [`rank`]: what every rank thread shares (cancel gate, progress, checkpoint parts) and the
//!   interface a model family implements to run on them ([`rank::ParallelLeader`],
//!   [`rank::RankWork`]);
//! - [`pipeline`]: [`pipeline::ParallelPipeline`], the multi-GPU [`crate::Engine`] that owns the
//!   rank threads (data parallel over groups).
//!
//! Nothing here imports a model: a family states what it can split ([`plan::Splits`]) and runs
//! its own per-rank loop (Flux: `crate::flux::parallel`; SDXL: `crate::models::sdxl::parallel`).

pub mod attention;
pub mod autotune;
pub mod cfg;
pub mod comm;
pub mod graphs;
pub mod health;
#[cfg(feature = "bench")]
pub mod loopback;
pub mod nccl;
pub mod pipeline;
pub mod plan;
pub mod rank;
pub mod resilient;
pub mod spatial;
pub mod stream;
pub mod threads;
pub mod vae;

pub use attention::{SeqLayout, TextMode, UspAttention};
pub use autotune::{PlanTable, autotune};
pub use comm::{CommError, CommFactory, Communicator, Mesh, RankComms};
#[cfg(feature = "bench")]
pub use loopback::LoopbackComm;
pub use nccl::{NcclComm, NcclFactory};
pub use pipeline::ParallelPipeline;
pub use plan::Plan;
pub use resilient::{InjectedFault, ResilientParallel};
pub use threads::{ThreadComm, ThreadsFactory};
pub use vae::decode_patch_parallel;

/// Whether plans with PipeFusion stages can run (see [`plan::Plan::validate`]).
pub const PIPEFUSION_AVAILABLE: bool = true;
