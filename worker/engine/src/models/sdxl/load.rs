//! Building an [`SdxlPipeline`]: from a diffusers SDXL folder (its own component weights, or the
//! original single-file checkpoint beside its configs), or the tiny random-weight config.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use super::Weights;
use super::fast::Perf;
use super::pipeline::{Devices, MODEL, PipelineOptions, SCHEDULERS, SdxlPipeline};
use super::text::TextEncoders;
use super::unet::{self, Unet};
use super::vae::{self, Vae};
use crate::flux::clip::{self, Activation, ClipTextModel};
use crate::flux::pipeline::device_name;
use crate::flux::tokenizer::PromptTokenizer;
use crate::flux::vae::Decoder;
use crate::lora::sdxl::SdxlLora;
use crate::lora::{LoraHub, LoraSlot};
use crate::{EngineError, EngineInfo};

/// stable-diffusion-xl-base-1.0's `scheduler/scheduler_config.json` (for pipelines built without
/// a folder, such as [`SdxlPipeline::tiny_random`]).
const SDXL_BASE_SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}"#;

/// The weights layout of a diffusers SDXL folder: its own component folders when `unet/` holds
/// weights, else the one `.safetensors` file at its top level (the original single-file
/// checkpoint, with the folder giving configs and tokenizers).
pub fn detect_weights(dir: &Path) -> Result<Weights, EngineError> {
    let unet = dir.join("unet");
    let diffusers = ["diffusion_pytorch_model", "diffusion_pytorch_model.fp16"]
        .iter()
        .any(|s| {
            unet.join(format!("{s}.safetensors")).exists()
                || unet.join(format!("{s}.safetensors.index.json")).exists()
        });
    if diffusers {
        return Ok(Weights::Diffusers);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Load(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(Weights::SingleFile(files.remove(0))),
        0 => Err(EngineError::Load(format!(
            "{}: unet/ holds no diffusion_pytorch_model weights and there is no single-file \
             .safetensors checkpoint beside the configs",
            dir.display()
        ))),
        _ => Err(EngineError::Load(format!(
            "{}: unet/ holds no weights and several .safetensors files could be the single-file \
             checkpoint ({})",
            dir.display(),
            files
                .iter()
                .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

impl SdxlPipeline {
    /// Loads a diffusers SDXL folder (`model_index.json` of a `StableDiffusionXLPipeline`,
    /// `unet/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `vae/`,
    /// `scheduler/`), with the weights [`detect_weights`] finds.
    pub fn load(dir: &Path, options: PipelineOptions) -> Result<Self, EngineError> {
        let weights = detect_weights(dir)?;
        Self::load_with(dir, &weights, options)
    }

    /// [`SdxlPipeline::load`] with the weights' layout given: configs, tokenizers and the
    /// scheduler config always come from `dir`.
    pub fn load_with(dir: &Path, weights: &Weights, options: PipelineOptions) -> Result<Self, EngineError> {
        let index = dir.join("model_index.json");
        if !index.exists() {
            return Err(EngineError::Load(format!(
                "{} has no model_index.json",
                dir.display()
            )));
        }
        let class = crate::flux::read_json(&index)?
            .get("_class_name")
            .and_then(|c| c.as_str())
            .map(str::to_string);
        if class.as_deref() != Some("StableDiffusionXLPipeline") {
            return Err(EngineError::Load(format!(
                "{}: _class_name is {class:?}, not \"StableDiffusionXLPipeline\"",
                index.display()
            )));
        }
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_config = std::fs::read_to_string(&scheduler_path)
            .map_err(|e| EngineError::Load(format!("cannot read {}: {e}", scheduler_path.display())))?;
        let ucfg = unet::Config::from_json(&dir.join("unet/config.json"))?;
        let d = options.devices;
        let _guard = tch::no_grad_guard();
        let text = TextEncoders::load(dir, weights, d.text_encoders, options.text_encoder_kind)?;
        let vae = Vae::load(dir, weights, d.vae, options.vae_kind)?;
        let unet = match weights {
            Weights::Diffusers => Unet::load(&ucfg, &dir.join("unet"), d.unet, options.kind)?,
            Weights::SingleFile(file) => Unet::load(&ucfg, file, d.unet, options.kind)?,
        };
        let version = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "local".into());
        let layout = match weights {
            Weights::Diffusers => "diffusers folder".to_string(),
            Weights::SingleFile(f) => format!("single file {}", f.display()),
        };
        let perf = options.perf;
        let info = EngineInfo {
            kind: "sdxl".into(),
            models: vec![MODEL.into()],
            model_versions: vec![format!("{MODEL}@{version}")],
            devices: device_list(&d),
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: format!(
                "SDXL from {} ({layout}; UNet {:?}, VAE decodes in {:?}; fast paths {})",
                dir.display(),
                options.kind,
                vae.kind(),
                perf.name()
            ),
        };
        let lora = lora_slot(&unet, &text, d.unet);
        let mut pipeline = Self {
            unet,
            text,
            vae,
            scheduler_config,
            scheduler_source: scheduler_path.display().to_string(),
            options: PipelineOptions {
                perf: Perf::REFERENCE,
                ..options
            },
            info,
            graphs: Default::default(),
            lora,
        };
        pipeline.check_dims()?;
        pipeline.set_perf(perf)?;
        // The default sampler must build from the folder's config; a request for another one
        // that cannot is refused when it comes.
        pipeline.build_scheduler(SCHEDULERS[0])?;
        Ok(pipeline)
    }

    /// A TINY randomly-initialised pipeline with SDXL's architecture ([`unet::Config::tiny`],
    /// two 2-layer CLIP encoders of width 16 (quick-GELU, and GELU with a projection), a 4-level
    /// VAE decoder of width <= 32, byte-level tokenizers built in code, SDXL base's scheduler
    /// config), fp32 on CPU. NOT a trained model: its images are structured noise. The same seed
    /// always builds the same weights.
    pub fn tiny_random(seed: u64) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let _lock = crate::flux::rng_lock();
        tch::manual_seed(seed as i64);
        let (device, kind) = (Device::Cpu, Kind::Float);
        let ucfg = unet::Config::tiny();
        let te = clip::Config {
            vocab_size: PromptTokenizer::TINY_VOCAB,
            hidden_size: 16,
            intermediate_size: 32,
            num_attention_heads: 2,
            ..clip::Config::tiny()
        };
        let te2 = clip::Config {
            hidden_size: ucfg.cross_attention_dim - te.hidden_size,
            hidden_act: Activation::Gelu,
            projection_dim: Some(ucfg.text_embeds_dim()),
            ..te.clone()
        };
        let text = TextEncoders {
            tokenizer: PromptTokenizer::tiny_clip(77)?,
            tokenizer_2: PromptTokenizer::tiny_clip(77)?,
            text_encoder: ClipTextModel::new(&te, device, kind)?,
            text_encoder_2: ClipTextModel::new(&te2, device, kind)?,
            force_zeros_for_empty_prompt: true,
        };
        let vcfg = crate::flux::vae::Config {
            block_out_channels: vec![16, 16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..vae::config()
        };
        let vae = Vae {
            decoder: Decoder::new(&vcfg, device, kind)?,
        };
        let unet = Unet::new(&ucfg, device, kind)?;
        let info = EngineInfo {
            kind: "sdxl-tiny-random".into(),
            models: vec![MODEL.into()],
            model_versions: vec![format!("{MODEL}@tiny-random-{seed}")],
            devices: vec!["cpu".into()],
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: "tiny random-weight SDXL config, not a trained model (images are noise)".into(),
        };
        let lora = lora_slot(&unet, &text, device);
        let pipeline = Self {
            unet,
            text,
            vae,
            scheduler_config: SDXL_BASE_SCHEDULER.into(),
            scheduler_source: "SDXL base scheduler config".into(),
            options: PipelineOptions::new(device, kind),
            info,
            graphs: Default::default(),
            lora,
        };
        pipeline.check_dims()?;
        Ok(pipeline)
    }

    /// A randomly-initialised pipeline of SDXL base's real shapes, for benchmarks: the 2.57 B
    /// UNet ([`unet::Config::sdxl_base`]), CLIP ViT-L and OpenCLIP ViT-bigG text encoders, the
    /// VAE decoder, on `options`' devices in its kinds, with its fast paths. NOT a trained model,
    /// and the tokenizers are the tiny byte-level ones (tokenizing is not what is measured; the
    /// encoders run on 77 tokens as with the real ones). The same seed builds the same weights on
    /// the same devices.
    pub fn random_base(options: PipelineOptions, seed: u64) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let _lock = crate::flux::rng_lock();
        tch::manual_seed(seed as i64);
        let d = options.devices;
        let ucfg = unet::Config::sdxl_base();
        let te = options.text_encoder_kind;
        let text = TextEncoders {
            tokenizer: PromptTokenizer::tiny_clip(77)?,
            tokenizer_2: PromptTokenizer::tiny_clip(77)?,
            text_encoder: ClipTextModel::new(&clip::Config::large(), d.text_encoders, te)?,
            text_encoder_2: ClipTextModel::new(&clip::Config::big_g(), d.text_encoders, te)?,
            force_zeros_for_empty_prompt: true,
        };
        let vae = Vae {
            decoder: Decoder::new(&vae::config(), d.vae, options.vae_kind)?,
        };
        let unet = Unet::new(&ucfg, d.unet, options.kind)?;
        let perf = options.perf;
        let info = EngineInfo {
            kind: "sdxl-base-random".into(),
            models: vec![MODEL.into()],
            model_versions: vec![format!("{MODEL}@random-{seed}")],
            devices: device_list(&d),
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: format!(
                "SDXL base shapes with random weights, not a trained model (fast paths {})",
                perf.name()
            ),
        };
        let lora = lora_slot(&unet, &text, d.unet);
        let mut pipeline = Self {
            unet,
            text,
            vae,
            scheduler_config: SDXL_BASE_SCHEDULER.into(),
            scheduler_source: "SDXL base scheduler config".into(),
            options: PipelineOptions {
                perf: Perf::REFERENCE,
                ..options
            },
            info,
            graphs: Default::default(),
            lora,
        };
        pipeline.check_dims()?;
        pipeline.set_perf(perf)?;
        Ok(pipeline)
    }
}

/// The LoRA slot of a pipeline: SDXL's mapping for its UNet and both text encoders, with a
/// cache sized by the engine settings.
fn lora_slot(unet: &Unet, text: &TextEncoders, device: Device) -> LoraSlot {
    let family = SdxlLora::new(unet, &text.text_encoder.config, &text.text_encoder_2.config);
    LoraSlot::new(LoraHub::from_settings(device), std::sync::Arc::new(family))
}

fn device_list(d: &Devices) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in [d.unet, d.text_encoders, d.vae] {
        let n = device_name(x);
        if !v.contains(&n) {
            v.push(n);
        }
    }
    v
}
