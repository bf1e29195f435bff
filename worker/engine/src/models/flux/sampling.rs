//! Flow-matching Euler sampling as diffusers' `FluxPipeline` + `FlowMatchEulerDiscreteScheduler`
//! schedule it, latent noise, and the 2x2 latent packing.
//!
//! The schedule is reproduced bit for bit: numpy's float64 `linspace`, then float32 arithmetic
//! for the shift (numpy 2 keeps Python scalars "weak", so `exp(mu)` is rounded to float32 first),
//! then `timesteps = sigmas * 1000` in float32 and a final sigma of 0.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::layers::Res;
use crate::EngineError;

/// The scheduler settings FluxPipeline reads (`scheduler/scheduler_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: f64,
    /// Fixed shift (used when `use_dynamic_shifting` is false).
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_image_seq_len: f64,
    pub max_image_seq_len: f64,
    pub base_shift: f64,
    pub max_shift: f64,
}

impl SchedulerConfig {
    /// FLUX.1-dev: resolution-dependent shift.
    pub fn dev() -> Self {
        Self {
            num_train_timesteps: 1000.0,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_image_seq_len: 256.0,
            max_image_seq_len: 4096.0,
            base_shift: 0.5,
            max_shift: 1.15,
        }
    }

    /// FLUX.1-schnell: no shift.
    pub fn schnell() -> Self {
        Self {
            shift: 1.0,
            use_dynamic_shifting: false,
            ..Self::dev()
        }
    }

    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let d = Self::dev();
        let f = |k: &str, def: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(def);
        let unsupported = [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ];
        for k in unsupported {
            if v.get(k).and_then(|x| x.as_bool()).unwrap_or(false) {
                return Err(EngineError::Load(format!(
                    "{}: {k} is not supported",
                    path.display()
                )));
            }
        }
        if v.get("shift_terminal").is_some_and(|x| !x.is_null()) {
            return Err(EngineError::Load(format!(
                "{}: shift_terminal is not supported",
                path.display()
            )));
        }
        if v.get("time_shift_type")
            .and_then(|x| x.as_str())
            .is_some_and(|t| t != "exponential")
        {
            return Err(EngineError::Load(format!(
                "{}: only exponential time_shift_type is supported",
                path.display()
            )));
        }
        Ok(Self {
            num_train_timesteps: f("num_train_timesteps", d.num_train_timesteps),
            shift: f("shift", 1.0),
            use_dynamic_shifting: v
                .get("use_dynamic_shifting")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            base_image_seq_len: f("base_image_seq_len", d.base_image_seq_len),
            max_image_seq_len: f("max_image_seq_len", d.max_image_seq_len),
            base_shift: f("base_shift", d.base_shift),
            max_shift: f("max_shift", d.max_shift),
        })
    }

    /// `mu`, linear in the packed image sequence length (diffusers' `calculate_shift`).
    pub fn mu(&self, image_seq_len: i64) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_seq_len as f64 * m + b
    }
}

/// The denoising schedule: `sigmas` has `steps + 1` entries (last is 0), `timesteps` has `steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

/// `numpy.linspace(start, stop, n)` (float64, endpoint included).
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// The schedule FluxPipeline uses for `steps` steps at `image_seq_len` packed latent tokens.
pub fn schedule(config: &SchedulerConfig, steps: usize, image_seq_len: i64) -> Schedule {
    let base = np_linspace(1.0, 1.0 / steps as f64, steps);
    let mut sigmas: Vec<f32> = base.iter().map(|&s| s as f32).collect();
    if config.use_dynamic_shifting {
        let e = config.mu(image_seq_len).exp() as f32;
        for s in &mut sigmas {
            *s = e / (e + (1.0f32 / *s - 1.0f32));
        }
    } else {
        let shift = config.shift as f32;
        let shift_m1 = (config.shift - 1.0) as f32;
        for s in &mut sigmas {
            *s = shift * *s / (1.0f32 + shift_m1 * *s);
        }
    }
    let ntt = config.num_train_timesteps as f32;
    let timesteps = sigmas.iter().map(|s| s * ntt).collect();
    sigmas.push(0.0);
    Schedule { sigmas, timesteps }
}

/// Latent size `(h, w)` for an image size: `2 * (size / 16)` for an 8x VAE.
pub fn latent_size(height: u32, width: u32, vae_scale: i64) -> (i64, i64) {
    let f = vae_scale * 2;
    (2 * (height as i64 / f), 2 * (width as i64 / f))
}

/// Seeded Gaussian noise `(1, channels, h, w)`, drawn on the CPU with libtorch's default
/// generator seeded with `seed` (so it equals `torch.randn(..., generator=torch.Generator("cpu")
/// .manual_seed(seed), dtype=kind)`, as diffusers draws it with a CPU generator) and moved to
/// `device`: the same seed gives the same noise on every device.
pub fn noise(seed: u64, channels: i64, h: i64, w: i64, kind: Kind, device: Device) -> Res<Tensor> {
    let cpu = {
        let _lock = super::rng_lock();
        tch::manual_seed(seed as i64);
        Tensor::f_randn([1, channels, h, w], (kind, Device::Cpu))?
    };
    cpu.f_to_device(device)
}

/// `(b, c, h, w)` -> `(b, h/2 * w/2, c * 4)` (2x2 patches, channel-major within a patch).
pub fn pack(latents: &Tensor) -> Res<Tensor> {
    let (b, c, h, w) = latents.size4()?;
    latents
        .f_view([b, c, h / 2, 2, w / 2, 2])?
        .f_permute([0, 2, 4, 1, 3, 5])? // (b, h/2, w/2, c, 2, 2)
        .f_reshape([b, (h / 2) * (w / 2), c * 4])
}

/// Inverse of [`pack`] for latent size `(h, w)`.
pub fn unpack(latents: &Tensor, h: i64, w: i64) -> Res<Tensor> {
    let (b, _, ch) = latents.size3()?;
    latents
        .f_view([b, h / 2, w / 2, ch / 4, 2, 2])?
        .f_permute([0, 3, 1, 4, 2, 5])? // (b, c, h/2, 2, w/2, 2)
        .f_reshape([b, ch / 4, h, w])
}

/// One Euler step `x + (sigma_next - sigma) * v`, in fp32, returned in `v`'s dtype.
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Res<Tensor> {
    let dt = sigma_next - sigma;
    x.f_to_kind(Kind::Float)?
        .f_add(&v.f_mul_scalar(dt as f64)?)?
        .f_to_kind(v.kind())
}
