//! The Flux.1 text-to-image pipeline behind [`Engine`]: encode the prompt (CLIP-L pooled + T5-XXL
//! tokens), denoise packed latents with the flow-matching Euler sampler, decode with the VAE.
//! Mirrors diffusers' `FluxPipeline` step by step (see [`super::sampling`]).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::clip::{self, ClipTextModel};
use super::sampling::{self, SchedulerConfig};
use super::t5::{self, T5Encoder};
use super::tokenizer::PromptTokenizer;
use super::transformer::{self, Flux};
use super::vae::{self, Decoder};
use crate::lora::{LoraHub, LoraSlot, flux::FluxLora};
use crate::models::DiffusionModel;
use crate::schedulers::{FlowMatchEulerDiscreteScheduler, Scheduler};
use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StepCheckpoint, StepEvent,
};

/// Where each component computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Devices {
    pub transformer: Device,
    /// CLIP and T5 (e.g. a second GPU, or the CPU to save GPU memory).
    pub text_encoders: Device,
    pub vae: Device,
}

impl Devices {
    pub fn all(device: Device) -> Self {
        Self {
            transformer: device,
            text_encoders: device,
            vae: device,
        }
    }
}

/// Load-time options.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOptions {
    pub devices: Devices,
    /// Weight and activation dtype of the transformer and VAE (bf16 on GPUs, fp32 on CPU).
    pub kind: Kind,
    /// Dtype of the text encoders (defaults to `kind`).
    pub text_encoder_kind: Kind,
    /// Low-memory mode: the text encoders are not kept resident but loaded for each request and
    /// freed right after encoding.
    pub free_text_encoders: bool,
    /// The transformer blocks' numeric format; a pre-quantised checkpoint
    /// (`transformer/ditfleet-fp8.safetensors`) is FP8 whatever this says.
    pub precision: crate::Precision,
}

impl PipelineOptions {
    pub fn new(device: Device, kind: Kind) -> Self {
        Self {
            devices: Devices::all(device),
            kind,
            text_encoder_kind: kind,
            free_text_encoders: false,
            precision: crate::Precision::Bf16,
        }
    }
}

/// The text encoders, resident or loaded on demand. One per pipeline, never moved on a hot path:
/// the resident variant's size does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum TextEncoders {
    Resident {
        clip: ClipTextModel,
        t5: T5Encoder,
    },
    OnDemand {
        dir: PathBuf,
        clip: clip::Config,
        t5: t5::Config,
    },
}

/// See the module docs.
#[derive(Debug)]
pub struct Pipeline {
    /// `flux-dev` or `flux-schnell`.
    pub model: String,
    pub transformer: Flux,
    pub vae: Decoder,
    pub scheduler: SchedulerConfig,
    pub clip_tokenizer: PromptTokenizer,
    pub t5_tokenizer: PromptTokenizer,
    encoders: TextEncoders,
    options: PipelineOptions,
    info: EngineInfo,
    /// The LoRA stack merged into the transformer and the resident CLIP encoder.
    lora: LoraSlot,
}

pub(crate) use crate::device::{device_name, sync_on};

impl Pipeline {
    /// Loads a diffusers FLUX.1 folder (`model_index.json`, `transformer/`, `text_encoder/`,
    /// `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `vae/`, `scheduler/`). dev vs schnell is
    /// read from `transformer/config.json` (`guidance_embeds`).
    pub fn load(dir: &Path, options: PipelineOptions) -> Result<Self, EngineError> {
        if !dir.join("model_index.json").exists() {
            return Err(EngineError::Load(format!(
                "{} has no model_index.json",
                dir.display()
            )));
        }
        let tcfg = transformer::Config::from_diffusers_json(&dir.join("transformer/config.json"))?;
        let (model, t5_len) = if tcfg.guidance_embed {
            ("flux-dev", 512)
        } else {
            ("flux-schnell", 256)
        };
        let clip_cfg = clip::Config::from_json(&dir.join("text_encoder/config.json"))?;
        let t5_cfg = t5::Config::from_json(&dir.join("text_encoder_2/config.json"))?;
        let vae_cfg = vae::Config::from_json(&dir.join("vae/config.json"))?;
        let scheduler = SchedulerConfig::from_json(&dir.join("scheduler/scheduler_config.json"))?;
        let clip_tokenizer = PromptTokenizer::clip_from_dir(
            &dir.join("tokenizer"),
            clip_cfg.max_position_embeddings as usize,
        )?;
        let t5_tokenizer = PromptTokenizer::t5_from_dir(&dir.join("tokenizer_2"), t5_len)?;
        let d = options.devices;
        let _guard = tch::no_grad_guard();
        let fp8_file = dir.join("transformer").join(super::fp8::FP8_CHECKPOINT);
        let transformer = if fp8_file.is_file() {
            let t = Flux::load(&tcfg, &fp8_file, d.transformer, options.kind)?;
            if options.precision != crate::Precision::Fp8 {
                tracing::info!(path = %fp8_file.display(), "the transformer checkpoint is pre-quantised: loading it as fp8");
            }
            t
        } else {
            let mut t = Flux::load(&tcfg, &dir.join("transformer"), d.transformer, options.kind)?;
            if options.precision == crate::Precision::Fp8 {
                t.quantize_fp8()?;
            }
            t
        };
        let precision = if transformer.is_fp8() {
            crate::Precision::Fp8
        } else {
            crate::Precision::Bf16
        };
        let vae = Decoder::load(&vae_cfg, &dir.join("vae"), d.vae, options.kind)?;
        let encoders = if options.free_text_encoders {
            // Load once now so a broken checkpoint fails at load time, then drop.
            Self::load_encoders(dir, &clip_cfg, &t5_cfg, &options)?;
            TextEncoders::OnDemand {
                dir: dir.to_path_buf(),
                clip: clip_cfg,
                t5: t5_cfg,
            }
        } else {
            let (clip, t5) = Self::load_encoders(dir, &clip_cfg, &t5_cfg, &options)?;
            TextEncoders::Resident { clip, t5 }
        };
        let version = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "local".into());
        let info = EngineInfo {
            kind: "flux".into(),
            models: vec![model.into()],
            model_versions: vec![format!("{model}@{version}")],
            devices: Self::device_list(&d),
            parallel_degree: 1,
            precision,
            note: format!(
                "Flux.1 {} from {} ({:?}, {precision})",
                &model[5..],
                dir.display(),
                options.kind
            ),
        };
        let lora = Self::lora_slot(&transformer, &encoders, d.transformer);
        let options = PipelineOptions { precision, ..options };
        Ok(Self {
            model: model.into(),
            transformer,
            vae,
            scheduler,
            clip_tokenizer,
            t5_tokenizer,
            encoders,
            options,
            info,
            lora,
        })
    }

    /// The LoRA slot of a pipeline: Flux's mapping for its transformer and, when resident, its
    /// CLIP encoder (a low-memory pipeline loads CLIP per job: text-encoder modules are refused
    /// as matching nothing), with a cache sized by the engine settings.
    fn lora_slot(transformer: &Flux, encoders: &TextEncoders, device: Device) -> LoraSlot {
        let clip = match encoders {
            TextEncoders::Resident { clip, .. } => Some(&clip.config),
            TextEncoders::OnDemand { .. } => None,
        };
        LoraSlot::new(
            LoraHub::from_settings(device),
            std::sync::Arc::new(FluxLora::new(&transformer.config, clip)),
        )
    }

    /// The LoRA slot (the stack merged now; the adapters cache).
    pub fn lora(&self) -> &LoraSlot {
        &self.lora
    }

    pub fn lora_mut(&mut self) -> &mut LoraSlot {
        &mut self.lora
    }

    /// Merges the request's LoRA stack into the weights (free when it is the one applied; on
    /// any failure the base weights are back and the job fails with the reason).
    pub fn apply_loras(&mut self, request: &GenerateRequest) -> Result<(), EngineError> {
        super::fp8::refuse_loras(&request.loras, &self.transformer)?;
        let clip = match &self.encoders {
            TextEncoders::Resident { clip, .. } => Some(clip),
            TextEncoders::OnDemand { .. } => None,
        };
        let transformer = &self.transformer;
        self.lora
            .prepare(&request.loras, || crate::lora::flux::weights(transformer, clip))?;
        Ok(())
    }

    fn device_list(d: &Devices) -> Vec<String> {
        let mut v: Vec<String> = vec![device_name(d.transformer)];
        for x in [d.text_encoders, d.vae] {
            let n = device_name(x);
            if !v.contains(&n) {
                v.push(n);
            }
        }
        v
    }

    fn load_encoders(
        dir: &Path,
        clip_cfg: &clip::Config,
        t5_cfg: &t5::Config,
        o: &PipelineOptions,
    ) -> Result<(ClipTextModel, T5Encoder), EngineError> {
        let dev = o.devices.text_encoders;
        let clip = ClipTextModel::load(clip_cfg, &dir.join("text_encoder"), dev, o.text_encoder_kind)?;
        let t5 = T5Encoder::load(t5_cfg, &dir.join("text_encoder_2"), dev, o.text_encoder_kind)?;
        Ok((clip, t5))
    }

    /// A TINY randomly-initialised pipeline with the Flux architecture (1 double + 2 single
    /// blocks of width 64, 2-layer CLIP/T5 of width 32, a 4-level VAE decoder of width <= 32,
    /// byte-level tokenizers built in code), fp32 on CPU. NOT a trained model: its images are
    /// structured noise. Serves `flux-dev` (with guidance embedding, 64 T5 tokens); the same
    /// seed always builds the same weights.
    pub fn tiny_random(seed: u64) -> Result<Self, EngineError> {
        Self::tiny_random_with(&transformer::Config::tiny(), 64, seed)
    }

    /// [`Pipeline::tiny_random`] at `precision` (FP8: the same random weights quantised, the FP8
    /// arithmetic emulated in fp32 on the CPU); its version is `tiny-random-<seed>-fp8`.
    pub fn tiny_random_precision(seed: u64, precision: crate::Precision) -> Result<Self, EngineError> {
        let mut p = Self::tiny_random(seed)?;
        if precision == crate::Precision::Fp8 {
            p.quantize_fp8()?;
            p.info.model_versions = vec![format!("flux-dev@tiny-random-{seed}-fp8")];
        }
        Ok(p)
    }

    /// Makes the transformer's blocks FP8 ([`Flux::quantize_fp8`]); refused while a LoRA stack is
    /// merged into the weights.
    pub fn quantize_fp8(&mut self) -> Result<(), EngineError> {
        if !self.lora.applied().is_empty() {
            return Err(EngineError::Load(
                "cannot quantise to fp8 while a LoRA stack is merged".into(),
            ));
        }
        self.transformer.quantize_fp8()?;
        self.options.precision = crate::Precision::Fp8;
        self.info.precision = crate::Precision::Fp8;
        Ok(())
    }

    /// The transformer's numeric format.
    pub fn precision(&self) -> crate::Precision {
        self.info.precision
    }

    /// [`Pipeline::tiny_random`] with another transformer config (e.g. more heads, to test
    /// parallel plans) and `t5_len` text tokens.
    pub fn tiny_random_with(
        tcfg: &transformer::Config,
        t5_len: usize,
        seed: u64,
    ) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let _lock = super::rng_lock();
        tch::manual_seed(seed as i64);
        let kind = Kind::Float;
        let device = Device::Cpu;
        let vocab = PromptTokenizer::TINY_VOCAB;
        let transformer = Flux::new(tcfg, device, kind)?;
        let vae = Decoder::new(&vae::Config::tiny(), device, kind)?;
        let clip = ClipTextModel::new(
            &clip::Config {
                vocab_size: vocab,
                ..clip::Config::tiny()
            },
            device,
            kind,
        )?;
        let t5 = T5Encoder::new(
            &t5::Config {
                vocab_size: vocab,
                ..t5::Config::tiny()
            },
            device,
            kind,
        )?;
        let info = EngineInfo {
            kind: "flux-tiny-random".into(),
            models: vec!["flux-dev".into()],
            model_versions: vec![format!("flux-dev@tiny-random-{seed}")],
            devices: vec!["cpu".into()],
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: "tiny random-weight Flux config, not a trained model (images are noise)".into(),
        };
        let encoders = TextEncoders::Resident { clip, t5 };
        let lora = Self::lora_slot(&transformer, &encoders, device);
        Ok(Self {
            model: "flux-dev".into(),
            transformer,
            vae,
            scheduler: SchedulerConfig::dev(),
            clip_tokenizer: PromptTokenizer::tiny_clip(77)?,
            t5_tokenizer: PromptTokenizer::tiny_t5(t5_len)?,
            encoders,
            options: PipelineOptions::new(device, kind),
            info,
            lora,
        })
    }

    /// A pipeline with Flux.1-dev's FULL shapes (transformer, T5-XXL, CLIP-L, VAE) and random
    /// weights drawn from `seed`, with byte-level tokenizers (77 CLIP / 512 T5 tokens), on
    /// `device` in `kind`: for benchmarks and multi-GPU checks where no checkpoint is at hand.
    /// Its images are noise.
    pub fn random_dev(device: Device, kind: Kind, seed: u64) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let _lock = super::rng_lock();
        tch::manual_seed(seed as i64);
        let vocab = PromptTokenizer::TINY_VOCAB;
        let transformer = Flux::new(&transformer::Config::dev(), device, kind)?;
        let vae = Decoder::new(&vae::Config::dev(), device, kind)?;
        let clip = ClipTextModel::new(&clip::Config::dev(), device, kind)?;
        let t5 = T5Encoder::new(&t5::Config::dev(), device, kind)?;
        debug_assert!(vocab <= clip::Config::dev().vocab_size && vocab <= t5::Config::dev().vocab_size);
        let info = EngineInfo {
            kind: "flux-random".into(),
            models: vec!["flux-dev".into()],
            model_versions: vec![format!("flux-dev@random-{seed}")],
            devices: vec![device_name(device)],
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: "Flux.1-dev shapes with random weights (benchmarks only; images are noise)".into(),
        };
        let encoders = TextEncoders::Resident { clip, t5 };
        let lora = Self::lora_slot(&transformer, &encoders, device);
        Ok(Self {
            model: "flux-dev".into(),
            transformer,
            vae,
            scheduler: SchedulerConfig::dev(),
            clip_tokenizer: PromptTokenizer::tiny_clip(77)?,
            t5_tokenizer: PromptTokenizer::tiny_t5(512)?,
            encoders,
            options: PipelineOptions::new(device, kind),
            info,
            lora,
        })
    }

    /// Encodes a prompt: T5 tokens `(1, t5_len, 4096)` and pooled CLIP `(1, 768)`, both on the
    /// transformer's device in its dtype.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor), EngineError> {
        let _guard = tch::no_grad_guard();
        match &self.encoders {
            TextEncoders::Resident { clip, t5 } => self.encode_with(clip, t5, prompt),
            TextEncoders::OnDemand { dir, clip, t5 } => {
                let (clip, t5) = Self::load_encoders(dir, clip, t5, &self.options)?;
                let out = self.encode_with(&clip, &t5, prompt);
                drop((clip, t5));
                // Low-memory mode: hand the encoders' memory back to the driver, or libtorch's
                // caching allocator keeps it (and the process's peak with it).
                if self.options.devices.text_encoders.is_cuda() {
                    crate::aten::empty_cache()?;
                }
                out
            }
        }
    }

    fn encode_with(
        &self,
        clip: &ClipTextModel,
        t5: &T5Encoder,
        prompt: &str,
    ) -> Result<(Tensor, Tensor), EngineError> {
        let dev = self.options.devices.text_encoders;
        let ids = |v: Vec<i64>| -> Result<Tensor, EngineError> {
            let n = v.len() as i64;
            Ok(Tensor::f_from_slice(&v)?.f_reshape([1, n])?.f_to_device(dev)?)
        };
        let clip_ids = ids(self.clip_tokenizer.encode(prompt)?)?;
        let t5_ids = ids(self.t5_tokenizer.encode(prompt)?)?;
        let (_, pooled) = clip.forward(&clip_ids)?;
        let txt = t5.forward(&t5_ids)?;
        let (d, k) = (self.options.devices.transformer, self.options.kind);
        Ok((
            txt.f_to_device(d)?.f_to_kind(k)?,
            pooled.f_to_device(d)?.f_to_kind(k)?,
        ))
    }

    /// Denoises from seeded noise through the one denoising loop ([`crate::denoise`]). Returns
    /// the final packed latents `(1, img_seq, 64)` and the latent size. `neg`: the negative
    /// prompt's `(txt, pooled)` for true CFG. `on_step` may cancel.
    pub fn denoise(
        &self,
        txt: &Tensor,
        pooled: &Tensor,
        neg: Option<(&Tensor, &Tensor)>,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<(Tensor, (i64, i64)), EngineError> {
        let _guard = tch::no_grad_guard();
        let cond = FluxCond {
            txt: txt.shallow_clone(),
            pooled: pooled.shallow_clone(),
            neg: neg.map(|(t, p)| (t.shallow_clone(), p.shallow_clone())),
        };
        let mut scheduler = DiffusionModel::scheduler(self, request)?;
        let x0 = DiffusionModel::noise(self, request)?;
        let mut denoiser = DiffusionModel::denoiser(self, request, &cond, scheduler.as_ref())?;
        let latents = crate::denoise::run(
            scheduler.as_mut(),
            denoiser.as_mut(),
            x0,
            None,
            crate::denoise::Hooks {
                every: 0,
                on_step: &mut |d, x| {
                    sync_on(x)?;
                    Ok(on_step(StepEvent {
                        step: d.step,
                        total: d.total,
                        elapsed: d.loop_start.elapsed(),
                        host: d.host,
                    }))
                },
                on_checkpoint: &mut |_, _, _| Ok(()),
                noise: &|_| Err(EngineError::Torch("flow matching draws no step noise".into())),
            },
        )?;
        Ok((latents, self.latent_size(request)))
    }

    /// The latent size `(h, w)` of a request's image.
    pub fn latent_size(&self, request: &GenerateRequest) -> (i64, i64) {
        sampling::latent_size(request.height, request.width, self.vae.config.scale_factor())
    }

    /// Packed latents -> RGB bytes `(h, w, 3)` row-major.
    pub fn decode(&self, latents: &Tensor, latent_hw: (i64, i64)) -> Result<Vec<u8>, EngineError> {
        let _guard = tch::no_grad_guard();
        let z = sampling::unpack(latents, latent_hw.0, latent_hw.1)?.f_to_device(self.options.devices.vae)?;
        let img = self.vae.decode(&z)?; // (1, 3, H, W) in [-1, 1]
        let img = to_rgb8(&img)?.f_to_device(Device::Cpu)?; // (H, W, 3)
        let n = img.numel();
        let mut out = vec![0u8; n];
        img.f_copy_data_u8(&mut out, n)?;
        Ok(out)
    }

    pub fn options(&self) -> &PipelineOptions {
        &self.options
    }

    /// The CLIP text encoder when it is resident (`None` in low-memory mode, where it is loaded
    /// per request): LoRA merges text-encoder modules into its weights.
    pub fn resident_clip(&self) -> Option<&ClipTextModel> {
        match &self.encoders {
            TextEncoders::Resident { clip, .. } => Some(clip),
            TextEncoders::OnDemand { .. } => None,
        }
    }

    /// NaN/Inf in the denoised latents means a failing device (or broken weights).
    pub(crate) fn check_finite(&self, latents: &Tensor) -> Result<(), EngineError> {
        crate::models::check_finite(latents)
    }

    pub(crate) fn check(&self, r: &GenerateRequest) -> Result<(), EngineError> {
        if r.model != self.model {
            return Err(EngineError::InvalidRequest(format!(
                "this engine serves {}, not {:?}",
                self.model, r.model
            )));
        }
        if r.width == 0
            || r.height == 0
            || !r.width.is_multiple_of(16)
            || !r.height.is_multiple_of(16)
            || r.width > 4096
            || r.height > 4096
        {
            return Err(EngineError::InvalidRequest(format!(
                "width and height must be multiples of 16 in 16..=4096, got {}x{}",
                r.width, r.height
            )));
        }
        if r.steps == 0 || r.steps > 1000 {
            return Err(EngineError::InvalidRequest(format!(
                "steps must be in 1..=1000, got {}",
                r.steps
            )));
        }
        if !r.guidance.is_finite() {
            return Err(EngineError::InvalidRequest("guidance must be finite".into()));
        }
        Ok(())
    }
}

/// Everything a denoising loop needs besides the model forward: the seeded packed noise, the
/// sigma schedule and the per-step conditioning vectors. Shared by the one-device loop and the
/// multi-GPU ranks (every rank derives the same values from the request).
#[derive(Debug)]
pub struct LoopInputs {
    /// Packed noise `(1, img_seq, 64)`.
    pub x: Tensor,
    pub latent_hw: (i64, i64),
    pub steps: usize,
    /// `steps + 1` sigmas.
    pub sigmas: Vec<f32>,
    /// Conditioning vectors `(steps, h)`.
    pub vecs: Tensor,
    /// The negative prompt's conditioning vectors (true CFG).
    pub neg_vecs: Option<Tensor>,
    /// Every block's modulation for every step, `(steps, modulation_width)`
    /// ([`Flux::modulation_table`]): what the forward takes as `vec` ([`LoopInputs::cond`]).
    pub mods: Tensor,
    /// The negative prompt's (true CFG).
    pub neg_mods: Option<Tensor>,
}

impl LoopInputs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transformer: &Flux,
        scheduler: &SchedulerConfig,
        vae_scale: i64,
        request: &GenerateRequest,
        pooled: &Tensor,
        neg_pooled: Option<&Tensor>,
        dev: Device,
        kind: Kind,
    ) -> Result<Self, EngineError> {
        let (lh, lw) = sampling::latent_size(request.height, request.width, vae_scale);
        let channels = transformer.config.in_channels / 4;
        let noise = sampling::noise(request.seed, channels, lh, lw, kind, dev)?;
        let x = sampling::pack(&noise)?; // (1, img_seq, 64)
        let img_seq = x.size()[1];
        let sched = sampling::schedule(scheduler, request.steps as usize, img_seq);
        let c = StepConditions::new(
            transformer,
            &sched.timesteps,
            request.guidance,
            pooled,
            neg_pooled,
        )?;
        Ok(Self {
            x,
            latent_hw: (lh, lw),
            steps: sched.timesteps.len(),
            sigmas: sched.sigmas,
            mods: c.mods,
            neg_mods: c.neg_mods,
            vecs: c.vecs,
            neg_vecs: c.neg_vecs,
        })
    }

    /// What the forward takes as `vec` at step `i`: the row of the modulation table `(1, W)`.
    pub fn cond(&self, i: usize) -> Result<Tensor, EngineError> {
        Ok(self.mods.f_narrow(0, i as i64, 1)?)
    }

    /// [`LoopInputs::cond`] of the negative prompt (true CFG).
    pub fn neg_cond(&self, i: usize) -> Result<Option<Tensor>, EngineError> {
        Ok(self
            .neg_mods
            .as_ref()
            .map(|m| m.f_narrow(0, i as i64, 1))
            .transpose()?)
    }
}

/// True CFG: `neg + scale * (pos - neg)`.
pub fn true_cfg(pos: &Tensor, neg: &Tensor, scale: f32) -> Result<Tensor, EngineError> {
    Ok(neg.f_add(&pos.f_sub(neg)?.f_mul_scalar(f64::from(scale))?)?)
}

/// Every step's conditioning of one prompt (and the negative prompt's, for true CFG): the
/// conditioning vectors (timestep, guidance, pooled CLIP) and every block's modulation computed
/// from them, as FluxPipeline feeds them: `t / 1000` in the latent dtype, guidance in fp32.
#[derive(Debug)]
pub struct StepConditions {
    /// `(steps, h)`.
    pub vecs: Tensor,
    pub neg_vecs: Option<Tensor>,
    /// `(steps, modulation_width)` ([`Flux::modulation_table`]).
    pub mods: Tensor,
    pub neg_mods: Option<Tensor>,
}

impl StepConditions {
    /// For `timesteps` (`sigma * 1000`); `pooled` is on the transformer's device in its dtype.
    pub fn new(
        transformer: &Flux,
        timesteps: &[f32],
        guidance: f32,
        pooled: &Tensor,
        neg_pooled: Option<&Tensor>,
    ) -> Result<Self, EngineError> {
        let (dev, kind) = (pooled.device(), pooled.kind());
        let steps = timesteps.len() as i64;
        let t = Tensor::f_from_slice(timesteps)?
            .f_to_device(dev)?
            .f_to_kind(kind)?
            .f_div_scalar(1000.0)?;
        let g = Tensor::f_full([steps], f64::from(guidance), (Kind::Float, dev))?;
        let guidance = if transformer.config.guidance_embed {
            Some(&g)
        } else {
            None
        };
        let vecs_for = |p: &Tensor| transformer.vec(&t, &p.f_expand([steps, p.size()[1]], false)?, guidance);
        let vecs = vecs_for(pooled)?;
        let neg_vecs = neg_pooled.map(vecs_for).transpose()?;
        Ok(Self {
            mods: transformer.modulation_table(&vecs)?,
            neg_mods: neg_vecs
                .as_ref()
                .map(|v| transformer.modulation_table(v))
                .transpose()?,
            vecs,
            neg_vecs,
        })
    }
}

/// A Flux request's encoded prompts: T5 tokens `(1, 512, 4096)` and pooled CLIP `(1, 768)` on
/// the transformer's device, and the negative prompt's for true CFG.
#[derive(Debug)]
pub struct FluxCond {
    pub txt: Tensor,
    pub pooled: Tensor,
    pub neg: Option<(Tensor, Tensor)>,
}

/// One job's Flux denoiser: the text embedded once, the rotary embedding of its positions, every
/// step's modulation; true CFG runs the model on the negative prompt too.
struct FluxDenoiser<'a> {
    flux: &'a Flux,
    txt: Tensor,
    neg_txt: Option<Tensor>,
    pe: super::transformer::Rope,
    cond: StepConditions,
    true_cfg_scale: f32,
}

impl crate::denoise::Denoiser for FluxDenoiser<'_> {
    fn predict(&mut self, x: &Tensor, i: usize, _timestep: f32) -> Result<Tensor, EngineError> {
        let row = |m: &Tensor| m.f_narrow(0, i as i64, 1);
        let mut v = self
            .flux
            .forward_prepared(x, &self.txt, &row(&self.cond.mods)?, &self.pe)?;
        if let (Some(nt), Some(nm)) = (&self.neg_txt, &self.cond.neg_mods) {
            let vn = self.flux.forward_prepared(x, nt, &row(nm)?, &self.pe)?;
            v = true_cfg(&v, &vn, self.true_cfg_scale)?;
        }
        Ok(v)
    }
}

impl DiffusionModel for Pipeline {
    type Cond = FluxCond;

    fn model_name(&self) -> &str {
        &self.model
    }

    fn check(&self, request: &GenerateRequest) -> Result<(), EngineError> {
        Pipeline::check(self, request)?;
        self.lora.check_applied(&request.loras)?;
        if let Some(plan) = request
            .plan
            .as_deref()
            .filter(|p| !matches!(p.trim(), "single" | ""))
        {
            return Err(EngineError::InvalidRequest(format!(
                "plan {plan:?} needs a multi-device engine; this one runs on a single device (plan single)"
            )));
        }
        Ok(())
    }

    fn scheduler(&self, request: &GenerateRequest) -> Result<Box<dyn Scheduler>, EngineError> {
        if let Some(other) = request.scheduler.as_deref().filter(|s| *s != "flow_euler") {
            return Err(EngineError::InvalidRequest(format!(
                "scheduler {other:?}: {} samples with flow_euler only",
                self.model
            )));
        }
        let (lh, lw) = self.latent_size(request);
        let mut s = FlowMatchEulerDiscreteScheduler::new(self.scheduler.clone());
        s.set_timesteps(request.steps as usize, Some((lh / 2) * (lw / 2)))?;
        Ok(Box::new(s))
    }

    fn encode(&self, request: &GenerateRequest) -> Result<FluxCond, EngineError> {
        let (txt, pooled) = self.encode_prompt(&request.prompt)?;
        let neg = match (&request.negative_prompt, request.true_cfg()) {
            (Some(n), true) => Some(self.encode_prompt(n)?),
            _ => None,
        };
        Ok(FluxCond { txt, pooled, neg })
    }

    fn noise(&self, request: &GenerateRequest) -> Result<Tensor, EngineError> {
        let (lh, lw) = self.latent_size(request);
        let channels = self.transformer.config.in_channels / 4;
        let noise = sampling::noise(
            request.seed,
            channels,
            lh,
            lw,
            self.options.kind,
            self.options.devices.transformer,
        )?;
        Ok(sampling::pack(&noise)?) // (1, img_seq, 64)
    }

    fn denoiser<'a>(
        &'a self,
        request: &GenerateRequest,
        cond: &'a FluxCond,
        scheduler: &dyn Scheduler,
    ) -> Result<Box<dyn crate::denoise::Denoiser + 'a>, EngineError> {
        let (lh, lw) = self.latent_size(request);
        let txt_len = cond.txt.size()[1];
        let ids = Flux::position_ids(txt_len, lh, lw, self.options.devices.transformer)?;
        let pe = self.transformer.rope(&ids)?;
        let steps = StepConditions::new(
            &self.transformer,
            scheduler.timesteps(),
            request.guidance,
            &cond.pooled,
            cond.neg.as_ref().map(|n| &n.1),
        )?;
        Ok(Box::new(FluxDenoiser {
            flux: &self.transformer,
            txt: self.transformer.embed_txt(&cond.txt)?,
            neg_txt: cond
                .neg
                .as_ref()
                .map(|n| self.transformer.embed_txt(&n.0))
                .transpose()?,
            pe,
            cond: steps,
            true_cfg_scale: request.true_cfg_scale,
        }))
    }

    fn decode(&self, latents: &Tensor, request: &GenerateRequest) -> Result<Vec<u8>, EngineError> {
        Pipeline::decode(self, latents, self.latent_size(request))
    }

    fn compute_device(&self) -> Device {
        self.options.devices.transformer
    }
}

impl Engine for Pipeline {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    /// `negative_prompt` is used only with `true_cfg_scale > 1` (true CFG, as FluxPipeline does;
    /// Flux is guidance-distilled and ignores it otherwise).
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.generate_resumable(request, None, 0, &mut |_| {}, on_step)
    }

    /// Checkpoints are [`crate::checkpoint::LoopState`]s of the packed latents.
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        Pipeline::check(self, request)?;
        self.apply_loras(request)?;
        crate::models::generate(&*self, request, resume, every, on_checkpoint, on_step)
    }

    fn lora_status(&self) -> crate::LoraStatus {
        self.lora.hub().status()
    }
}

/// A decoded image `(1, 3, h, w)` in [-1, 1] -> RGB bytes `(h, w, 3)` (uint8, on the image's
/// device). Pixel-wise, so a band of rows converts on its own.
pub(crate) fn to_rgb8(img: &Tensor) -> Result<Tensor, tch::TchError> {
    img.f_to_kind(Kind::Float)?
        .f_div_scalar(2.0)?
        .f_add_scalar(0.5)?
        .f_clamp(0.0, 1.0)?
        .f_mul_scalar(255.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_squeeze_dim(0)?
        .f_permute([1, 2, 0])?
        .f_contiguous()
}
