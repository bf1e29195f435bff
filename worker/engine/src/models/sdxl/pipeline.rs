//! The SDXL text-to-image pipeline behind [`Engine`]: diffusers' `StableDiffusionXLPipeline.__call__`
//! step by step, through the engine's model seam ([`DiffusionModel`], one denoising loop).
//!
//! * Prompt: both CLIP encoders ([`super::text`]); with classifier-free guidance
//!   (`guidance > 1`) the negative prompt (or zeros / the empty prompt) is encoded too and put
//!   FIRST in a batch of 2, as diffusers concatenates `[negative, positive]`.
//! * Micro-conditioning: `add_time_ids = (original_size, crops_coords_top_left, target_size)` =
//!   `(h, w, 0, 0, h, w)` in pixels, the same for both rows, in the prompt embeddings' dtype.
//! * Latents: `(1, 4, h/8, w/8)` unit Gaussian from a CPU generator seeded with the job seed
//!   (`torch.Generator("cpu").manual_seed(seed)`), times the scheduler's `init_noise_sigma`.
//! * Each step: the UNet on the scheduler-scaled latents (duplicated under CFG) at the scheduler's
//!   timestep, `uncond + guidance * (cond - uncond)`, optionally diffusers' `rescale_noise_cfg`
//!   ([`PipelineOptions::guidance_rescale`]), then the scheduler step; the ancestral sampler's
//!   noise of step i comes from its own seed ([`crate::models::step_noise`]), so a resumed run
//!   equals an uninterrupted one.
//! * Scheduler: the folder's `scheduler/scheduler_config.json` read by the class the request's
//!   `scheduler` names, as `OtherScheduler.from_config(pipe.scheduler.config)` would: `euler`
//!   (default) `EulerDiscreteScheduler`, `euler_a` `EulerAncestralDiscreteScheduler`, `dpmpp_2m`
//!   and `dpmpp_2m_karras` `DPMSolverMultistepScheduler` with `use_karras_sigmas` false / true.
//! * Decode: `vae.decode(latents / scaling_factor)`, in bf16 on a GPU by default (SDXL's VAE
//!   overflows in fp16) and fp32 on the CPU ([`super::vae::default_kind`]), then to RGB8 as
//!   diffusers' image processor does.
//! * Fast paths ([`PipelineOptions::perf`], [`SdxlPipeline::set_perf`]): for bf16 on CUDA the UNet
//!   step runs as a replayed CUDA graph, the UNet and VAE convolutions channels-last with fused
//!   GroupNorm kernels, the attention projections stacked ([`super::fast`]); on the CPU the
//!   reference formulations.

use tch::{Device, Kind, Tensor};

use super::fast::{self, Perf, StepGraphs};
use super::text::TextEncoders;
use super::unet::Unet;
use super::vae::{self, Vae};
use crate::denoise::Denoiser;
use crate::flux::pipeline::to_rgb8;
use crate::guidance::Guidance;
use crate::lora::LoraSlot;
use crate::models::DiffusionModel;
use crate::schedulers::{self, Scheduler, SchedulerKind};
use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StepCheckpoint, StepEvent,
};

/// The public model name this pipeline serves.
pub const MODEL: &str = "sdxl-base";

/// The samplers a request may name, the default first.
pub const SCHEDULERS: [&str; 4] = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"];

/// Where each component computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Devices {
    pub unet: Device,
    /// Both CLIP encoders (e.g. a second GPU, or the CPU to save GPU memory).
    pub text_encoders: Device,
    pub vae: Device,
}

impl Devices {
    pub fn all(device: Device) -> Self {
        Self {
            unet: device,
            text_encoders: device,
            vae: device,
        }
    }
}

/// Load-time options.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOptions {
    pub devices: Devices,
    /// Weight and activation dtype of the UNet (bf16 on GPUs, fp32 on CPU); the latents and the
    /// prompt embeddings are in it too, as diffusers keeps them in the pipeline's dtype.
    pub kind: Kind,
    /// Dtype of the text encoders (defaults to `kind`).
    pub text_encoder_kind: Kind,
    /// Dtype the VAE decodes in: [`vae::default_kind`] of its device (bf16 on a GPU, fp32 on the
    /// CPU); fp16 is upcast to fp32 as diffusers does for SDXL's VAE.
    pub vae_kind: Kind,
    /// diffusers' `guidance_rescale` (0 = off): rescales the guided prediction towards the
    /// conditional one's standard deviation. A pipeline setting: requests carry no such field.
    pub guidance_rescale: f32,
    /// The UNet's and VAE's fast paths ([`Perf::default_for`] the UNet's device and kind: all of
    /// them for bf16 on CUDA, none on the CPU).
    pub perf: Perf,
}

impl PipelineOptions {
    pub fn new(device: Device, kind: Kind) -> Self {
        Self {
            devices: Devices::all(device),
            kind,
            text_encoder_kind: kind,
            vae_kind: vae::default_kind(device),
            guidance_rescale: 0.0,
            perf: Perf::default_for(device, kind),
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct SdxlPipeline {
    pub unet: Unet,
    pub text: TextEncoders,
    pub vae: Vae,
    /// The scheduler config every request's scheduler is built from (JSON text).
    pub(super) scheduler_config: String,
    /// Where it came from, for messages.
    pub(super) scheduler_source: String,
    pub(super) options: PipelineOptions,
    pub(super) info: EngineInfo,
    /// The captured UNet steps (with [`Perf::cuda_graphs`]).
    pub(super) graphs: StepGraphs,
    /// The LoRA stack merged into the UNet and both text encoders.
    pub(super) lora: LoraSlot,
}

/// A request's encoded conditioning, on the UNet's device in its dtype: `rows` = 2 under
/// classifier-free guidance (`[negative, positive]`, diffusers' order), else 1.
#[derive(Debug)]
pub struct SdxlCond {
    /// `(rows, 77, cross_attention_dim)`: both encoders' penultimate hidden states.
    pub context: Tensor,
    /// `(rows, text_embeds_dim)`: the second encoder's pooled projection.
    pub text_embeds: Tensor,
    /// `(rows, 6)`: `(h, w, 0, 0, h, w)`.
    pub time_ids: Tensor,
    pub guidance: Guidance,
}

impl SdxlPipeline {
    pub fn options(&self) -> &PipelineOptions {
        &self.options
    }

    /// Switches the UNet's and VAE's fast paths for the requests that follow: converts the
    /// convolution weights' layout in place when `channels_last` changes and drops the captured
    /// step graphs.
    pub fn set_perf(&mut self, perf: Perf) -> Result<(), EngineError> {
        // The layout change and the stacking may give the variables new storage: the LoRA
        // applier's handles would miss it, so the base weights go back first.
        self.lora.reset()?;
        self.graphs.clear();
        let was = self.options.perf;
        self.unet.set_perf(perf)?;
        if perf.channels_last != was.channels_last {
            fast::set_conv_layout(&self.vae.decoder.vs, perf.channels_last)?;
        }
        self.options.perf = perf;
        Ok(())
    }

    /// The LoRA slot (the stack merged now; the adapters cache).
    pub fn lora(&self) -> &LoraSlot {
        &self.lora
    }

    pub fn lora_mut(&mut self) -> &mut LoraSlot {
        &mut self.lora
    }

    /// The variables a LoRA stack may be merged into on the leader: the UNet and both encoders.
    pub(crate) fn lora_weights(&self) -> crate::lora::Weights {
        crate::lora::sdxl::weights(
            &self.unet,
            Some((&self.text.text_encoder, &self.text.text_encoder_2)),
        )
    }

    /// Merges the request's LoRA stack into the weights (free when it is the one applied; on
    /// any failure the base weights are back and the job fails with the reason).
    pub fn apply_loras(&mut self, request: &GenerateRequest) -> Result<(), EngineError> {
        let (unet, text) = (&self.unet, &self.text);
        self.lora.prepare(&request.loras, || {
            crate::lora::sdxl::weights(unet, Some((&text.text_encoder, &text.text_encoder_2)))
        })?;
        Ok(())
    }

    /// `(captures, replays)` of the UNet step graphs so far.
    pub fn graph_counts(&self) -> (u64, u64) {
        self.graphs.counts()
    }

    /// Sets diffusers' `guidance_rescale` for the requests that follow (0 = off).
    pub fn set_guidance_rescale(&mut self, guidance_rescale: f32) {
        self.options.guidance_rescale = guidance_rescale;
    }

    /// The components must fit together as SDXL's do: the UNet attends to both encoders' hidden
    /// states side by side and embeds the second encoder's pooled projection with the six time
    /// ids.
    pub(super) fn check_dims(&self) -> Result<(), EngineError> {
        let c = &self.unet.config;
        let (a, b) = (&self.text.text_encoder.config, &self.text.text_encoder_2.config);
        let pooled = b.projection_dim.unwrap_or(b.hidden_size);
        if a.hidden_size + b.hidden_size != c.cross_attention_dim || pooled != c.text_embeds_dim() {
            return Err(EngineError::Load(format!(
                "the components do not fit together: text encoders of width {} + {} (pooled {pooled}) \
                 for a UNet with cross_attention_dim {} and projection_class_embeddings_input_dim {} \
                 (= 6 * {} + pooled)",
                a.hidden_size,
                b.hidden_size,
                c.cross_attention_dim,
                c.projection_class_embeddings_input_dim,
                c.addition_time_embed_dim
            )));
        }
        if self.vae.decoder.config.latent_channels != c.in_channels || c.in_channels != c.out_channels {
            return Err(EngineError::Load(format!(
                "the VAE has {} latent channels, the UNet takes {} and gives {}",
                self.vae.decoder.config.latent_channels, c.in_channels, c.out_channels
            )));
        }
        Ok(())
    }

    /// Pixels per latent pixel (8 for SDXL).
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.decoder.config.scale_factor()
    }

    /// The latent size `(h, w)` of a request's image.
    pub fn latent_size(&self, request: &GenerateRequest) -> (i64, i64) {
        let s = self.vae_scale_factor();
        (i64::from(request.height) / s, i64::from(request.width) / s)
    }

    /// The scheduler `name` (one of [`SCHEDULERS`]) built from this model's scheduler config, its
    /// timesteps not set.
    pub fn build_scheduler(&self, name: &str) -> Result<Box<dyn Scheduler>, EngineError> {
        build_scheduler(&self.scheduler_config, &self.scheduler_source, name)
    }

    /// The scheduler config (JSON text) and where it came from.
    pub fn scheduler_config(&self) -> (&str, &str) {
        (&self.scheduler_config, &self.scheduler_source)
    }
}

/// The scheduler `name` (`euler`, `euler_a`, `dpmpp_2m`, `dpmpp_2m_karras`) built from a model's
/// diffusers scheduler config, as `OtherScheduler.from_config(pipe.scheduler.config)` builds it.
pub fn build_scheduler(config: &str, source: &str, name: &str) -> Result<Box<dyn Scheduler>, EngineError> {
    {
        let (class, karras) = match name {
            "euler" => (SchedulerKind::EulerDiscrete, None),
            "euler_a" => (SchedulerKind::EulerAncestralDiscrete, None),
            "dpmpp_2m" => (SchedulerKind::DpmSolverMultistep, Some(false)),
            "dpmpp_2m_karras" => (SchedulerKind::DpmSolverMultistep, Some(true)),
            other => return Err(unknown_scheduler(other)),
        };
        let text = match karras {
            None => config.to_string(),
            Some(k) => {
                let mut v: serde_json::Value =
                    serde_json::from_str(config).map_err(|e| EngineError::Load(format!("{source}: {e}")))?;
                let map = v
                    .as_object_mut()
                    .ok_or_else(|| EngineError::Load(format!("{source}: not a JSON object")))?;
                map.insert("use_karras_sigmas".into(), k.into());
                v.to_string()
            }
        };
        schedulers::from_config_json(&text, Some(class), source)
    }
}

impl SdxlPipeline {
    /// The request's checks that do not depend on the model's weights.
    pub(crate) fn check_request(&self, r: &GenerateRequest) -> Result<(), EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        if r.model != MODEL {
            return invalid(format!("this engine serves {MODEL}, not {:?}", r.model));
        }
        let s = self.vae_scale_factor() as u32;
        if r.width == 0
            || r.height == 0
            || !r.width.is_multiple_of(s)
            || !r.height.is_multiple_of(s)
            || r.width > 4096
            || r.height > 4096
        {
            return invalid(format!(
                "width and height must be multiples of {s} in {s}..=4096 (the VAE's scale), got {}x{}",
                r.width, r.height
            ));
        }
        if r.steps == 0 || r.steps > 1000 {
            return invalid(format!("steps must be in 1..=1000, got {}", r.steps));
        }
        if !r.guidance.is_finite() {
            return invalid("guidance must be finite".into());
        }
        if r.true_cfg_scale > 1.0 {
            return invalid(format!(
                "true_cfg_scale {} is a Flux option: SDXL runs classifier-free guidance with \
                 `guidance` (above 1) and the negative prompt",
                r.true_cfg_scale
            ));
        }
        if let Some(name) = r.scheduler.as_deref()
            && !SCHEDULERS.contains(&name)
        {
            return Err(unknown_scheduler(name));
        }
        Ok(())
    }

    /// `[negative, positive]` under CFG (or the positive prompt alone), moved to the UNet.
    pub(crate) fn conditioning(
        &self,
        request: &GenerateRequest,
        guidance: Guidance,
    ) -> Result<SdxlCond, EngineError> {
        let prompt = [request.prompt.as_str()];
        let (context, text_embeds) = if guidance.needs_negative() {
            let (pos, neg) = self
                .text
                .encode_with_negative(&prompt, request.negative_prompt.as_deref())?;
            (
                Tensor::f_cat(&[neg.embeds, pos.embeds], 0)?, // (2, 77, cross)
                Tensor::f_cat(&[neg.pooled, pos.pooled], 0)?, // (2, pooled)
            )
        } else {
            let pos = self.text.encode(&prompt)?;
            (pos.embeds, pos.pooled)
        };
        let (dev, kind) = (self.options.devices.unet, self.options.kind);
        let rows = context.size()[0];
        let (h, w) = (request.height as f32, request.width as f32);
        // Built in fp32 and cast, as diffusers builds `torch.tensor([...], dtype=prompt_embeds.dtype)`.
        let time_ids = Tensor::f_from_slice(&[h, w, 0.0, 0.0, h, w])?
            .f_reshape([1, 6])?
            .f_to_kind(kind)?
            .f_repeat([rows, 1])?
            .f_to_device(dev)?; // (rows, 6)
        Ok(SdxlCond {
            context: context.f_to_device(dev)?.f_to_kind(kind)?,
            text_embeds: text_embeds.f_to_device(dev)?.f_to_kind(kind)?,
            time_ids,
            guidance,
        })
    }
}

fn unknown_scheduler(name: &str) -> EngineError {
    EngineError::InvalidRequest(format!(
        "scheduler {name:?}: {MODEL} samples with {}",
        SCHEDULERS.join(", ")
    ))
}

/// One job's denoiser: the UNet on the (CFG-doubled) scaled latents (a replayed CUDA graph with
/// `graphs`), then the guidance.
struct SdxlDenoiser<'a> {
    unet: &'a Unet,
    cond: &'a SdxlCond,
    graphs: Option<&'a StepGraphs>,
}

impl Denoiser for SdxlDenoiser<'_> {
    fn predict(&mut self, x: &Tensor, _i: usize, timestep: f32) -> Result<Tensor, EngineError> {
        let c = self.cond;
        let input = c.guidance.batch_input(x)?; // (rows, 4, h, w)
        // A 0-d float32 timestep, as the schedulers' timesteps are (DPM's int64 ones are whole
        // numbers, which the embedding turns into the same floats).
        let t = Tensor::from(timestep).f_to_device(input.device())?;
        let unet = self.unet;
        let forward = |x: &[Tensor]| unet.forward(&x[0], &x[1], &x[2], &x[3], &x[4]);
        let inputs = [&input, &t, &c.context, &c.text_embeds, &c.time_ids];
        let out = match self.graphs {
            Some(g) => g.run(&inputs, &forward)?,
            None => unet.forward(&input, &t, &c.context, &c.text_embeds, &c.time_ids)?,
        }; // (rows, 4, h, w)
        c.guidance.combine_batched(&out)
    }
}

impl DiffusionModel for SdxlPipeline {
    type Cond = SdxlCond;

    fn model_name(&self) -> &str {
        MODEL
    }

    fn check(&self, request: &GenerateRequest) -> Result<(), EngineError> {
        self.check_request(request)?;
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
        let name = request.scheduler.as_deref().unwrap_or(SCHEDULERS[0]);
        let mut s = self.build_scheduler(name).map_err(|e| match e {
            EngineError::Load(m) => EngineError::InvalidRequest(format!(
                "scheduler {name:?} cannot be built from this model's scheduler config: {m}"
            )),
            e => e,
        })?;
        s.set_timesteps(request.steps as usize, None)?;
        Ok(s)
    }

    fn encode(&self, request: &GenerateRequest) -> Result<SdxlCond, EngineError> {
        let guidance = Guidance::classifier_free(request.guidance, self.options.guidance_rescale);
        self.conditioning(request, guidance)
    }

    fn noise(&self, request: &GenerateRequest) -> Result<Tensor, EngineError> {
        let (lh, lw) = self.latent_size(request);
        Ok(crate::flux::sampling::noise(
            request.seed,
            self.unet.config.in_channels,
            lh,
            lw,
            self.options.kind,
            self.options.devices.unet,
        )?) // (1, 4, h/8, w/8)
    }

    fn denoiser<'a>(
        &'a self,
        _request: &GenerateRequest,
        cond: &'a SdxlCond,
        _scheduler: &dyn Scheduler,
    ) -> Result<Box<dyn Denoiser + 'a>, EngineError> {
        Ok(Box::new(SdxlDenoiser {
            unet: &self.unet,
            cond,
            graphs: self.options.perf.cuda_graphs.then_some(&self.graphs),
        }))
    }

    fn decode(&self, latents: &Tensor, _request: &GenerateRequest) -> Result<Vec<u8>, EngineError> {
        let _guard = tch::no_grad_guard();
        let img = self.vae.decode_fast(latents, &self.options.perf)?; // (1, 3, H, W) in [-1, 1]
        let img = to_rgb8(&img)?.f_to_device(Device::Cpu)?; // (H, W, 3)
        let n = img.numel();
        let mut out = vec![0u8; n];
        img.f_copy_data_u8(&mut out, n)?;
        Ok(out)
    }

    fn compute_device(&self) -> Device {
        self.options.devices.unet
    }
}

impl Engine for SdxlPipeline {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    /// `negative_prompt` is used whenever `guidance > 1` (classifier-free guidance); without one
    /// the negative side is zeros (SDXL base's `force_zeros_for_empty_prompt`).
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.generate_resumable(request, None, 0, &mut |_| {}, on_step)
    }

    /// Checkpoints are [`crate::checkpoint::LoopState`]s of the `(1, 4, h/8, w/8)` latents with
    /// the scheduler's state (DPM-Solver's previous model outputs).
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.check_request(request)?;
        self.apply_loras(request)?;
        crate::models::generate(&*self, request, resume, every, on_checkpoint, on_step)
    }

    fn lora_status(&self) -> crate::LoraStatus {
        self.lora.hub().status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            model: MODEL.into(),
            prompt: "a red fox".into(),
            negative_prompt: None,
            width: 64,
            height: 48,
            steps: 2,
            guidance: 5.0,
            true_cfg_scale: 1.0,
            seed: 1,
            plan: None,
            scheduler: None,
            loras: Vec::new(),
        }
    }

    fn invalid(p: &SdxlPipeline, r: &GenerateRequest) -> String {
        match p.check_request(r) {
            Err(EngineError::InvalidRequest(m)) => m,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn requests_sdxl_cannot_run_are_invalid_and_say_why() {
        let p = SdxlPipeline::tiny_random(0).unwrap();
        p.check_request(&request()).unwrap();
        type Edit = Box<dyn Fn(&mut GenerateRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|r| r.model = "flux-dev".into()), "serves sdxl-base"),
            (Box::new(|r| r.width = 68), "multiples of 8"),
            (Box::new(|r| r.height = 0), "multiples of 8"),
            (Box::new(|r| r.steps = 0), "steps"),
            (Box::new(|r| r.true_cfg_scale = 3.0), "true_cfg_scale"),
            (
                Box::new(|r| r.scheduler = Some("flow_euler".into())),
                "euler, euler_a",
            ),
        ];
        for (edit, want) in cases {
            let mut r = request();
            edit(&mut r);
            let m = invalid(&p, &r);
            assert!(m.contains(want), "{m:?} should mention {want:?}");
        }
        // A plan needs the multi-device engine (which runs the same request checks).
        let mut r = request();
        r.plan = Some("cfg=2".into());
        match DiffusionModel::check(&p, &r) {
            Err(EngineError::InvalidRequest(m)) => assert!(m.contains("single device"), "{m}"),
            other => panic!("a plan on the one-device engine: {other:?}"),
        }
        let mut r = request();
        r.plan = Some("single".into());
        r.scheduler = Some("dpmpp_2m_karras".into());
        p.check_request(&r).unwrap();
    }

    #[test]
    fn each_scheduler_name_builds_its_diffusers_class_from_the_one_config() {
        let p = SdxlPipeline::tiny_random(0).unwrap();
        let want = [
            SchedulerKind::EulerDiscrete,
            SchedulerKind::EulerAncestralDiscrete,
            SchedulerKind::DpmSolverMultistep,
            SchedulerKind::DpmSolverMultistep,
        ];
        for (name, kind) in SCHEDULERS.iter().zip(want) {
            assert_eq!(p.build_scheduler(name).unwrap().kind(), kind, "{name}");
        }
        // Karras sigmas make a different schedule from the same config.
        let mut plain = p.build_scheduler("dpmpp_2m").unwrap();
        let mut karras = p.build_scheduler("dpmpp_2m_karras").unwrap();
        plain.set_timesteps(10, None).unwrap();
        karras.set_timesteps(10, None).unwrap();
        assert_ne!(plain.sigmas(), karras.sigmas());
    }

    #[test]
    fn cfg_doubles_the_batch_negative_first_and_guidance_one_runs_one_branch() {
        let p = SdxlPipeline::tiny_random(3).unwrap();
        let mut r = request();
        let cfg = p.encode(&r).unwrap();
        assert_eq!(cfg.context.size(), vec![2, 77, p.unet.config.cross_attention_dim]);
        assert_eq!(cfg.text_embeds.size(), vec![2, p.unet.config.text_embeds_dim()]);
        // No negative prompt: the negative row is zeros (force_zeros_for_empty_prompt).
        assert_eq!(cfg.context.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(cfg.context.get(1).abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let ids = Vec::<f32>::try_from(cfg.time_ids.get(1)).unwrap();
        assert_eq!(ids, vec![48.0, 64.0, 0.0, 0.0, 48.0, 64.0]);
        assert!(cfg.time_ids.get(0).equal(&cfg.time_ids.get(1)));
        r.guidance = 1.0;
        r.negative_prompt = Some("blurry".into());
        let one = p.encode(&r).unwrap();
        assert_eq!(one.guidance, Guidance::None);
        assert_eq!(one.context.size()[0], 1);
        assert!(one.context.equal(&cfg.context.get(1).unsqueeze(0)));
    }

    #[test]
    fn the_components_must_fit_together() {
        let mut p = SdxlPipeline::tiny_random(0).unwrap();
        p.unet.config.cross_attention_dim += 8;
        let e = p.check_dims().unwrap_err().to_string();
        assert!(e.contains("do not fit together"), "{e}");
    }
}
