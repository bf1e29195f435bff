//! The Flux.1 text-to-image pipeline behind [`Engine`]: encode the prompt (CLIP-L pooled + T5-XXL
//! tokens), denoise packed latents with the flow-matching Euler sampler, decode with the VAE.
//! Mirrors diffusers' `FluxPipeline` step by step (see [`super::sampling`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::clip::{self, ClipTextModel};
use super::sampling::{self, SchedulerConfig};
use super::t5::{self, T5Encoder};
use super::tokenizer::PromptTokenizer;
use super::transformer::{self, Flux};
use super::vae::{self, Decoder};
use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StageTimings, StepCheckpoint,
    StepEvent,
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
}

impl PipelineOptions {
    pub fn new(device: Device, kind: Kind) -> Self {
        Self {
            devices: Devices::all(device),
            kind,
            text_encoder_kind: kind,
            free_text_encoders: false,
        }
    }
}

/// The text encoders, resident or loaded on demand.
#[derive(Debug)]
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
}

/// A unique temporary file path, removed on drop (safetensors I/O in tch goes through files).
struct TempPath(PathBuf);

impl TempPath {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("ditfleet-ckpt-{}-{n}.safetensors", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits for the work producing `t` (a one-element device-to-host copy; unlike
/// `tch::Cuda::synchronize` it reports a device error as an error instead of panicking).
pub(crate) fn sync_on(t: &Tensor) -> Result<(), EngineError> {
    if t.device().is_cuda() && t.numel() > 0 {
        let _host = t.f_flatten(0, -1)?.f_narrow(0, 0, 1)?.f_to_device(Device::Cpu)?;
    }
    Ok(())
}

/// `cpu`, `cuda:N`: how devices are named in engine info, errors and logs.
pub(crate) fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

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
        let transformer = Flux::load(&tcfg, &dir.join("transformer"), d.transformer, options.kind)?;
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
            note: format!(
                "Flux.1 {} from {} ({:?})",
                &model[5..],
                dir.display(),
                options.kind
            ),
        };
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
        })
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
            note: "tiny random-weight Flux config, not a trained model (images are noise)".into(),
        };
        Ok(Self {
            model: "flux-dev".into(),
            transformer,
            vae,
            scheduler: SchedulerConfig::dev(),
            clip_tokenizer: PromptTokenizer::tiny_clip(77)?,
            t5_tokenizer: PromptTokenizer::tiny_t5(t5_len)?,
            encoders: TextEncoders::Resident { clip, t5 },
            options: PipelineOptions::new(device, kind),
            info,
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
            note: "Flux.1-dev shapes with random weights (benchmarks only; images are noise)".into(),
        };
        Ok(Self {
            model: "flux-dev".into(),
            transformer,
            vae,
            scheduler: SchedulerConfig::dev(),
            clip_tokenizer: PromptTokenizer::tiny_clip(77)?,
            t5_tokenizer: PromptTokenizer::tiny_t5(512)?,
            encoders: TextEncoders::Resident { clip, t5 },
            options: PipelineOptions::new(device, kind),
            info,
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

    /// Denoises from seeded noise. Returns the final packed latents `(1, img_seq, 64)` and the
    /// latent size. `neg`: the negative prompt's `(txt, pooled)` for true CFG. `on_step` may
    /// cancel.
    pub fn denoise(
        &self,
        txt: &Tensor,
        pooled: &Tensor,
        neg: Option<(&Tensor, &Tensor)>,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<(Tensor, (i64, i64)), EngineError> {
        self.denoise_resumable(txt, pooled, neg, request, None, 0, &mut |_, _| Ok(()), on_step)
    }

    /// [`Pipeline::denoise`], resumable: with `resume = (k, latents)` it continues after step `k`
    /// from those packed latents (the flow-matching Euler sampler's whole state besides the step
    /// index: its schedule depends only on the request), and it calls `on_checkpoint(step,
    /// latents)` every `every` steps (0 = never) and at the step where `on_step` cancels.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_resumable(
        &self,
        txt: &Tensor,
        pooled: &Tensor,
        neg: Option<(&Tensor, &Tensor)>,
        request: &GenerateRequest,
        resume: Option<(u32, &Tensor)>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(u32, &Tensor) -> Result<(), EngineError>,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<(Tensor, (i64, i64)), EngineError> {
        let _guard = tch::no_grad_guard();
        let (dev, kind) = (self.options.devices.transformer, self.options.kind);
        let inputs = LoopInputs::new(
            &self.transformer,
            &self.scheduler,
            self.vae.config.scale_factor(),
            request,
            pooled,
            neg.map(|n| n.1),
            dev,
            kind,
        )?;
        let (first, mut x) = match resume {
            None => (0usize, inputs.x.shallow_clone()),
            Some((k, latents)) => {
                let want = inputs.x.size();
                if latents.size() != want || k == 0 || k >= request.steps {
                    return Err(EngineError::BadCheckpoint(format!(
                        "latents {:?} after step {k} do not fit this {}-step {}x{} job (want {want:?})",
                        latents.size(),
                        request.steps,
                        request.width,
                        request.height
                    )));
                }
                (k as usize, latents.f_to_device(dev)?.f_to_kind(kind)?)
            }
        };
        let txt_len = txt.size()[1];
        let (lh, lw) = inputs.latent_hw;
        let ids = Flux::position_ids(txt_len, lh, lw, dev)?;
        let pe = self.transformer.rope(&ids)?;
        let txt = self.transformer.embed_txt(txt)?;
        let neg_txt = neg.map(|n| self.transformer.embed_txt(n.0)).transpose()?;
        let start = Instant::now();
        for i in first..inputs.steps {
            let step_start = Instant::now();
            let mut v = self
                .transformer
                .forward_prepared(&x, &txt, &inputs.cond(i)?, &pe)?;
            if let (Some(nt), Some(nv)) = (&neg_txt, inputs.neg_cond(i)?) {
                let vn = self.transformer.forward_prepared(&x, nt, &nv, &pe)?;
                v = true_cfg(&v, &vn, request.true_cfg_scale)?;
            }
            x = sampling::euler_step(&x, &v, inputs.sigmas[i], inputs.sigmas[i + 1])?;
            let host = step_start.elapsed();
            sync_on(&x)?;
            let step = i as u32 + 1;
            let control = on_step(StepEvent {
                step,
                total: inputs.steps as u32,
                elapsed: start.elapsed(),
                host,
            });
            if every > 0
                && (step as usize) < inputs.steps
                && (step.is_multiple_of(every) || control == Control::Cancel)
            {
                on_checkpoint(step, &x)?;
            }
            if control == Control::Cancel {
                return Err(EngineError::Cancelled { step });
            }
        }
        Ok((x, (lh, lw)))
    }

    /// A checkpoint of packed latents after `step`: safetensors with `latents` (as computed, e.g.
    /// bf16 on a GPU, so resuming is exact) and `step`.
    pub fn checkpoint_bytes(step: u32, latents: &Tensor) -> Result<Vec<u8>, EngineError> {
        let tmp = TempPath::new();
        let cpu = latents.f_to_device(Device::Cpu)?.f_contiguous()?;
        let step_t = Tensor::f_from_slice(&[i64::from(step)])?;
        Tensor::write_safetensors(&[("latents", &cpu), ("step", &step_t)], &tmp.0)?;
        Ok(std::fs::read(&tmp.0)?)
    }

    /// Reads a checkpoint made by [`Pipeline::checkpoint_bytes`]: (step, latents on the CPU).
    pub fn read_checkpoint(bytes: &[u8]) -> Result<(u32, Tensor), EngineError> {
        let tmp = TempPath::new();
        std::fs::write(&tmp.0, bytes)?;
        let tensors = Tensor::read_safetensors(&tmp.0)
            .map_err(|e| EngineError::BadCheckpoint(format!("not a safetensors checkpoint: {e}")))?;
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| EngineError::BadCheckpoint(format!("checkpoint has no {name:?} tensor")))
        };
        let step = get("step")?;
        if step.numel() != 1 || step.kind() != Kind::Int64 {
            return Err(EngineError::BadCheckpoint("\"step\" is not one int64".into()));
        }
        let step = u32::try_from(step.f_int64_value(&[0])?)
            .map_err(|_| EngineError::BadCheckpoint("step out of range".into()))?;
        Ok((step, get("latents")?))
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

    /// NaN/Inf in the denoised latents means a failing device (or broken weights).
    pub(crate) fn check_finite(&self, latents: &Tensor) -> Result<(), EngineError> {
        let finite = latents.f_isfinite()?.f_all()?.f_to_device(Device::Cpu)?;
        if !bool::try_from(&finite).map_err(EngineError::from)? {
            return Err(EngineError::Device {
                device: device_name(latents.device()),
                message: "denoised latents contain NaN or Inf".into(),
            });
        }
        Ok(())
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
        // All steps' conditioning vectors at once, as FluxPipeline feeds them: t / 1000 in the
        // latent dtype; guidance as fp32.
        let steps = sched.timesteps.len() as i64;
        let t = Tensor::f_from_slice(&sched.timesteps)?
            .f_to_device(dev)?
            .f_to_kind(kind)?
            .f_div_scalar(1000.0)?;
        let g = Tensor::f_full([steps], f64::from(request.guidance), (Kind::Float, dev))?;
        let guidance = if transformer.config.guidance_embed {
            Some(&g)
        } else {
            None
        };
        let vecs_for = |p: &Tensor| transformer.vec(&t, &p.f_expand([steps, p.size()[1]], false)?, guidance);
        let vecs = vecs_for(pooled)?;
        let neg_vecs = neg_pooled.map(vecs_for).transpose()?;
        Ok(Self {
            x,
            latent_hw: (lh, lw),
            steps: steps as usize,
            sigmas: sched.sigmas,
            mods: transformer.modulation_table(&vecs)?,
            neg_mods: neg_vecs
                .as_ref()
                .map(|v| transformer.modulation_table(v))
                .transpose()?,
            vecs,
            neg_vecs,
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

    /// Checkpoints are safetensors of the packed latents ([`Pipeline::checkpoint_bytes`]).
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.check(request)?;
        if let Some(plan) = request
            .plan
            .as_deref()
            .filter(|p| !matches!(p.trim(), "single" | ""))
        {
            return Err(EngineError::InvalidRequest(format!(
                "plan {plan:?} needs a multi-device engine; this one runs on a single device (plan single)"
            )));
        }
        let start = match resume {
            None => None,
            Some(c) => {
                let (step, latents) = Self::read_checkpoint(&c.bytes)?;
                if step != c.step {
                    return Err(EngineError::BadCheckpoint(format!(
                        "checkpoint holds step {step}, its pointer says {}",
                        c.step
                    )));
                }
                Some((step, latents))
            }
        };
        // Per-stage peak memory on the transformer's CUDA device (None elsewhere).
        let ordinal = match self.options.devices.transformer {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        let peak = |reset: bool| ordinal.and_then(|i| crate::aten::memory_peak(i, reset).ok());
        peak(true);
        let t0 = Instant::now();
        let (txt, pooled) = self.encode_prompt(&request.prompt)?;
        let neg = match (&request.negative_prompt, request.true_cfg()) {
            (Some(n), true) => Some(self.encode_prompt(n)?),
            _ => None,
        };
        sync_on(&pooled)?;
        let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
        let encode_peak = peak(true);
        let t1 = Instant::now();
        let (latents, hw) = self.denoise_resumable(
            &txt,
            &pooled,
            neg.as_ref().map(|(a, b)| (a, b)),
            request,
            start.as_ref().map(|(k, x)| (*k, x)),
            every,
            &mut |step, x| {
                on_checkpoint(StepCheckpoint {
                    step,
                    bytes: Self::checkpoint_bytes(step, x)?,
                });
                Ok(())
            },
            on_step,
        )?;
        let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;
        self.check_finite(&latents)?;
        let denoise_peak = peak(true);
        let t2 = Instant::now();
        let rgb = self.decode(&latents, hw)?;
        let decode_ms = t2.elapsed().as_secs_f64() * 1e3;
        let decode_peak = peak(false);
        Ok(GeneratedImage {
            width: request.width,
            height: request.height,
            rgb,
            timings: StageTimings {
                encode_ms,
                denoise_ms,
                decode_ms,
                peak_memory_bytes: [encode_peak, denoise_peak, decode_peak]
                    .into_iter()
                    .flatten()
                    .max(),
                peak_memory_encode_bytes: encode_peak,
                peak_memory_denoise_bytes: denoise_peak,
                peak_memory_decode_bytes: decode_peak,
                plan: Some("single".into()),
            },
        })
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
