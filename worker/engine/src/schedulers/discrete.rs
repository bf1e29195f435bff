//! What diffusers' discrete-time schedulers (Euler, Euler ancestral, DPM-Solver) share: the
//! train-time noise schedule built from the betas, timestep spacing, and the options both read.
//!
//! The betas and cumulative alphas are torch float32 in diffusers (`torch.linspace`, `cumprod`);
//! they are computed here with the same libtorch calls, so every bit agrees. The rest is numpy.

use tch::{Device, Kind, Tensor};

use super::config::Reader;
use super::numpy;
use crate::EngineError;

/// `beta_schedule` (or `trained_betas`, which overrides it).
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, n)`.
    Linear,
    /// `torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n) ** 2` (Stable Diffusion, SDXL).
    ScaledLinear,
    /// Glide's cosine schedule (`betas_for_alpha_bar`, `alpha_transform_type = "cosine"`).
    SquaredcosCapV2,
    /// Explicit betas.
    Trained(Vec<f64>),
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The denoised sample itself (`"sample"`; Euler also takes `"original_sample"`).
    Sample,
}

/// `timestep_spacing`: how the inference timesteps are picked from the train timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// `final_sigmas_type`: the noise level after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    /// The smallest train sigma (`sqrt((1 - ac[0]) / ac[0])`).
    SigmaMin,
}

/// The `__init__` arguments that define the train-time noise schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub rescale_betas_zero_snr: bool,
}

impl TrainConfig {
    /// diffusers' defaults (`linear`, 0.0001 to 0.02 over 1000 steps).
    pub fn diffusers_default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            rescale_betas_zero_snr: false,
        }
    }

    /// Stable Diffusion / SDXL: `scaled_linear`, 0.00085 to 0.012 over 1000 steps.
    pub fn sdxl() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..Self::diffusers_default()
        }
    }

    pub fn from_reader(r: &Reader<'_>) -> Result<Self, EngineError> {
        let d = Self::diffusers_default();
        let schedule = r.choice(
            "beta_schedule",
            "linear",
            &["linear", "scaled_linear", "squaredcos_cap_v2"],
        )?;
        let beta_schedule = match r.opt_f64_list("trained_betas")? {
            Some(b) => BetaSchedule::Trained(b),
            None => match schedule {
                "scaled_linear" => BetaSchedule::ScaledLinear,
                "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
                _ => BetaSchedule::Linear,
            },
        };
        let c = Self {
            num_train_timesteps: r.count("num_train_timesteps", d.num_train_timesteps)?,
            beta_start: r.f64("beta_start", d.beta_start)?,
            beta_end: r.f64("beta_end", d.beta_end)?,
            beta_schedule,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr", false)?,
        };
        if let BetaSchedule::Trained(b) = &c.beta_schedule
            && b.len() != c.num_train_timesteps
        {
            return Err(r.err(&format!(
                "trained_betas has {} entries but num_train_timesteps = {}",
                b.len(),
                c.num_train_timesteps
            )));
        }
        if c.num_train_timesteps < 2 {
            return Err(r.err("num_train_timesteps must be at least 2"));
        }
        Ok(c)
    }
}

pub(crate) fn prediction_from_reader(
    r: &Reader<'_>,
    allowed: &[&'static str],
) -> Result<PredictionType, EngineError> {
    Ok(match r.choice("prediction_type", "epsilon", allowed)? {
        "v_prediction" => PredictionType::VPrediction,
        "sample" | "original_sample" => PredictionType::Sample,
        _ => PredictionType::Epsilon,
    })
}

pub(crate) fn spacing_from_reader(r: &Reader<'_>) -> Result<TimestepSpacing, EngineError> {
    Ok(
        match r.choice(
            "timestep_spacing",
            "linspace",
            &["linspace", "leading", "trailing"],
        )? {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            _ => TimestepSpacing::Linspace,
        },
    )
}

pub(crate) fn final_sigmas_from_reader(r: &Reader<'_>) -> Result<FinalSigmas, EngineError> {
    Ok(
        match r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? {
            "sigma_min" => FinalSigmas::SigmaMin,
            _ => FinalSigmas::Zero,
        },
    )
}

/// The train-time schedule: `alphas_cumprod` and the train sigmas `sqrt((1 - ac) / ac)`
/// (increasing with the train timestep), both float32 as in diffusers.
pub struct Train {
    /// `(num_train_timesteps,)` float32 on the CPU.
    pub alphas_cumprod: Tensor,
    pub sigmas: Vec<f32>,
    /// `np.log(sigmas)` in float32, as numpy computes it ([`numpy::logf`]).
    pub log_sigmas: Vec<f32>,
}

impl Train {
    pub fn new(c: &TrainConfig) -> Result<Self, EngineError> {
        let n = c.num_train_timesteps as i64;
        let opts = (Kind::Float, Device::Cpu);
        let betas = match &c.beta_schedule {
            BetaSchedule::Linear => Tensor::f_linspace(c.beta_start, c.beta_end, n, opts)?,
            BetaSchedule::ScaledLinear => {
                Tensor::f_linspace(c.beta_start.powf(0.5), c.beta_end.powf(0.5), n, opts)?
                    .f_pow_tensor_scalar(2)?
            }
            BetaSchedule::SquaredcosCapV2 => {
                Tensor::from_slice(&betas_for_alpha_bar_cosine(c.num_train_timesteps))
            }
            BetaSchedule::Trained(b) => Tensor::from_slice(&b.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        };
        let betas = if c.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)?
        } else {
            betas
        };
        let alphas = betas.f_rsub_scalar(1.0)?;
        let mut alphas_cumprod = alphas.f_cumprod(0, None::<Kind>)?;
        if c.rescale_betas_zero_snr {
            let _ = alphas_cumprod.f_get(n - 1)?.f_fill_(2f64.powi(-24))?;
            alphas_cumprod = alphas_cumprod.f_contiguous()?;
        }
        let sigmas_t = alphas_cumprod
            .f_rsub_scalar(1)?
            .f_div(&alphas_cumprod)?
            .f_pow_tensor_scalar(0.5)?;
        let sigmas = Vec::<f32>::try_from(&sigmas_t)?;
        let log_sigmas = sigmas.iter().map(|&s| numpy::logf(s)).collect();
        Ok(Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        })
    }

    /// The train sigmas at (fractional) train timesteps: `np.interp(t, arange(n), sigmas)`.
    pub fn interp_sigmas(&self, timesteps: &[f64]) -> Vec<f64> {
        let xp: Vec<f64> = (0..self.sigmas.len()).map(|i| i as f64).collect();
        let fp: Vec<f64> = self.sigmas.iter().map(|&s| s as f64).collect();
        numpy::interp(timesteps, &xp, &fp)
    }

    /// The last sigma for `final_sigmas_type` (a float32 value).
    pub fn final_sigma(&self, f: FinalSigmas) -> f32 {
        match f {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.sigmas[0],
        }
    }
}

/// `betas_for_alpha_bar(n)` with the cosine transform, in Python float64, cast to float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powf(2.0);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, op for op in torch float32.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor, EngineError> {
    let n = betas.size()[0];
    let alphas = betas.f_rsub_scalar(1.0)?;
    let ac = alphas.f_cumprod(0, None::<Kind>)?;
    // diffusers clones the first and last entries before its in-place updates; these ops are
    // out of place, so the views stay valid.
    let sqrt = ac.f_sqrt()?;
    let s0 = sqrt.f_get(0)?;
    let st = sqrt.f_get(n - 1)?;
    let sqrt = sqrt.f_sub(&st)?;
    let sqrt = sqrt.f_mul(&s0.f_div(&s0.f_sub(&st)?)?)?;
    let bar = sqrt.f_pow_tensor_scalar(2)?;
    let ratio = bar.f_narrow(0, 1, n - 1)?.f_div(&bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[bar.f_narrow(0, 0, 1)?, ratio], 0)?;
    Ok(alphas.f_rsub_scalar(1)?)
}

/// The inference timesteps of Euler and Euler ancestral (float32), decreasing.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        // np.linspace(0, n - 1, steps, dtype=np.float32)[::-1]
        TimestepSpacing::Linspace => numpy::linspace(0.0, (train_steps - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        // (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float32) + steps_offset
        TimestepSpacing::Leading => {
            let ratio = (train_steps / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        // np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            numpy::arange_f64(train_steps as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| numpy::round(t) as f32 - 1.0)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_train_sigmas_span_the_known_range() {
        let t = Train::new(&TrainConfig::sdxl()).unwrap();
        assert_eq!(t.sigmas.len(), 1000);
        // SDXL's sigma range: about 0.0292 at t=0 to 14.61 at t=999.
        assert!((t.sigmas[0] - 0.029_167).abs() < 1e-4, "{}", t.sigmas[0]);
        assert!((t.sigmas[999] - 14.614_6).abs() < 1e-3, "{}", t.sigmas[999]);
        assert!(t.sigmas.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn leading_spacing_offsets_integer_timesteps() {
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Leading, 1000, 4, 1),
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 1),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 1),
            vec![999.0, 666.0, 333.0, 0.0]
        );
    }

    #[test]
    fn trained_betas_must_cover_every_train_step() {
        let v: serde_json::Value = serde_json::from_str(r#"{"trained_betas": [0.1, 0.2]}"#).unwrap();
        let e = TrainConfig::from_reader(&Reader::new(&v, "c.json").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("trained_betas has 2 entries"), "{e}");
    }
}
