//! Stable Diffusion XL (stable-diffusion-xl-base-1.0's architecture) on libtorch: the UNet
//! ([`unet`], its blocks in [`unet_blocks`], the original layout's key names in [`unet_keys`]),
//! the two CLIP text encoders and their tokenizers ([`text`]), the VAE decoder ([`vae`]), the
//! mapping from the original single-file checkpoint's key names ([`keys`]), the text-to-image
//! [`pipeline`] (built by [`load`]) that ties them together behind the engine's model seam, its
//! fast paths on one GPU ([`fast`]: CUDA graphs of the step, channels-last convolutions, fused
//! GroupNorm and GEGLU kernels, stacked attention projections), and
//! the exact multi-GPU pieces: patch-parallel UNet, CFG parallel, patch-parallel decode
//! ([`parallel`]). The CLIP, VAE and weight-loading code is Flux's (`crate::flux::{clip, vae,
//! weights, tokenizer}`), configured for SDXL.

pub mod fast;
pub mod keys;
pub mod load;
pub mod parallel;
pub mod pipeline;
pub mod rank;
pub mod text;
pub mod unet;
pub mod unet_blocks;
pub(crate) mod unet_config;
pub mod unet_keys;
pub mod vae;

use std::path::PathBuf;

pub use pipeline::{PipelineOptions, SdxlPipeline};

/// Where a component's weights are read from. Configs and tokenizers always come from a
/// diffusers folder, as diffusers' `from_single_file(..., config=<folder>)` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// The diffusers folder's own component folders (`text_encoder/model.safetensors`,
    /// `vae/diffusion_pytorch_model.safetensors`, or their sharded indexes).
    Diffusers,
    /// The original single-file checkpoint (`sd_xl_base_1.0.safetensors`: `conditioner.*`,
    /// `first_stage_model.*`, `model.diffusion_model.*`).
    SingleFile(PathBuf),
}
