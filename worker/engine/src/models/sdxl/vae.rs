//! SDXL's VAE decoder: diffusers' `AutoencoderKL` with 4 latent channels, a post-quant conv,
//! scaling factor 0.13025 and no shift (Flux's decoder, [`crate::flux::vae::Decoder`], configured
//! for it).
//!
//! Precision: SDXL's VAE overflows in fp16 (its config sets `force_upcast`, and diffusers
//! decodes such a VAE in fp32 when the pipeline runs in fp16). Here the decode runs in the kind
//! it is loaded in: bf16 on a GPU by default ([`default_kind`]), fp32 as the reference (and on
//! the CPU); fp16 is upcast to fp32 as diffusers does.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::Weights;
use super::fast::{self, AttnKernel, LocalOps, Perf};
use super::keys;
use crate::EngineError;
use crate::flux::layers::Res;
use crate::flux::vae::{Config, Decoder};
use crate::flux::weights::{Checkpoint, Source};
use crate::nn::spatial::SpatialDecoder;

/// stable-diffusion-xl-base-1.0's `vae/config.json`.
pub fn config() -> Config {
    Config {
        latent_channels: 4,
        out_channels: 3,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        scaling_factor: 0.13025,
        shift_factor: 0.0,
        post_quant_conv: true,
    }
}

/// The kind a decode runs in unless asked otherwise: bf16 on a GPU (fp16 overflows, fp32 costs
/// twice the memory and time), fp32 on the CPU.
pub fn default_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

#[derive(Debug)]
pub struct Vae {
    pub decoder: Decoder,
}

impl Vae {
    /// Loads the decoder from a diffusers SDXL folder `dir` (config from `vae/config.json`) with
    /// the weights from `weights`, strictly. `kind` fp16 becomes fp32 when the config asks for
    /// `force_upcast` (diffusers' default).
    pub fn load(dir: &Path, weights: &Weights, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let config_path = dir.join("vae/config.json");
        let c = Config::from_json(&config_path)?;
        let force_upcast = crate::flux::read_json(&config_path)?
            .get("force_upcast")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let kind = if kind == Kind::Half && force_upcast {
            Kind::Float
        } else {
            kind
        };
        let decoder = match weights {
            Weights::Diffusers => Decoder::load(&c, &dir.join("vae"), device, kind)?,
            Weights::SingleFile(file) => {
                let ck = Checkpoint::open_file(file)?;
                let n_blocks = c.block_out_channels.len();
                Decoder::load_from(
                    &c,
                    &ck,
                    "sdxl vae decoder (first_stage_model)",
                    &|n: &str| -> Source { keys::vae(n, n_blocks) },
                    &keys::vae_decoder_ignored,
                    device,
                    kind,
                )?
            }
        };
        Ok(Self { decoder })
    }

    /// The kind the decode runs in.
    /// A copy of the decoder on `device` (a rank of a patch-parallel decode).
    pub fn replicate(&self, device: Device) -> Result<Self, EngineError> {
        Ok(Self {
            decoder: self.decoder.replicate(device)?,
        })
    }

    pub fn kind(&self) -> Kind {
        self.decoder.conv_in.weight.kind()
    }

    /// Latents as the UNet leaves them `(b, 4, h, w)` (any kind) -> image in [-1, 1]
    /// `(b, 3, 8h, 8w)` in [`Vae::kind`]: `decoder(post_quant_conv(latents / scaling_factor))`.
    pub fn decode(&self, latents: &Tensor) -> Res<Tensor> {
        let _g = tch::no_grad_guard();
        let z = latents
            .f_to_device(self.decoder.conv_in.weight.device())?
            .f_to_kind(self.kind())?;
        self.decoder.decode(&z)
    }

    /// [`Vae::decode`] with the fast paths of `perf`: channels-last activations from the first
    /// convolution on (the weights must have been converted with
    /// [`fast::set_conv_layout`]`(&self.decoder.vs, true)` for the convolutions to run NHWC), the
    /// fused GroupNorm. Attention stays ATen's pick (the mid block's single head is 512 wide,
    /// beyond the flash and cuDNN kernels). The image comes back contiguous.
    pub fn decode_fast(&self, latents: &Tensor, perf: &Perf) -> Res<Tensor> {
        let _g = tch::no_grad_guard();
        let z = latents
            .f_to_device(self.decoder.conv_in.weight.device())?
            .f_to_kind(self.kind())?;
        let z = if perf.channels_last {
            fast::to_channels_last(&z)?
        } else {
            z
        };
        let ops = LocalOps {
            fused: perf.fused,
            cbias: perf.cbias,
            attention: AttnKernel::Sdpa,
        };
        self.decoder.decode_with(&z, &ops)?.f_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stable-diffusion-xl-base-1.0's `vae/config.json` (no `shift_factor`, no
    /// `use_post_quant_conv`: diffusers' defaults, no shift and a post-quant conv) parses to
    /// [`config`].
    #[test]
    fn sdxl_base_vae_config_parses_to_the_preset_with_post_quant_conv_and_no_shift() {
        let path = std::env::temp_dir().join(format!("ditfleet-sdxl-vae-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        let c = Config::from_json(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.unwrap(), config());
    }
}
