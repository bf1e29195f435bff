//! Guidance: how the denoising loop turns the model's outputs at one step into the one
//! prediction the scheduler steps with, and how many model calls / batch rows that takes.
//!
//! | mode | model calls | rows per call | negative prompt |
//! | --- | --- | --- | --- |
//! | [`Guidance::None`] | 1 | 1 | no |
//! | [`Guidance::Distilled`] (Flux.1-dev: the scale is a model input) | 1 | 1 | no |
//! | [`Guidance::Cfg`] (SDXL: uncond and cond rows in one batch) | 1 | 2 | yes (or empty) |
//! | [`Guidance::TrueCfg`] (Flux true CFG: a second call) | 2 | 1 | yes |
//!
//! The formulas are diffusers' (`StableDiffusionXLPipeline`, `FluxPipeline`), op for op.

use tch::Tensor;

use crate::EngineError;

/// The guidance mode of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// The model's output is the prediction.
    None,
    /// Guidance-distilled models (Flux.1-dev): `scale` is fed to the model's guidance embedding;
    /// one call, its output is the prediction.
    Distilled { scale: f32 },
    /// Classifier-free guidance in one batched call: rows `[uncond, cond]` (diffusers puts the
    /// negative prompt first), `uncond + scale * (cond - uncond)`, then, when `rescale > 0`,
    /// diffusers' `rescale_noise_cfg` with `guidance_rescale = rescale`.
    Cfg { scale: f32, rescale: f32 },
    /// Flux's "true CFG": a second model call on the negative prompt, then
    /// `neg + scale * (pos - neg)` ([`crate::flux::pipeline::true_cfg`]).
    TrueCfg { scale: f32 },
}

impl Guidance {
    /// SDXL's rule (`do_classifier_free_guidance = guidance_scale > 1`): CFG above 1, none
    /// otherwise.
    pub fn classifier_free(scale: f32, rescale: f32) -> Self {
        if scale > 1.0 {
            Guidance::Cfg { scale, rescale }
        } else {
            Guidance::None
        }
    }

    /// FluxPipeline's rule: true CFG with a negative prompt and `true_cfg_scale > 1`, else the
    /// distilled guidance (`guidance` is `None` for schnell, which has no guidance embedding).
    pub fn flux(guidance: Option<f32>, true_cfg_scale: f32, has_negative_prompt: bool) -> Self {
        if has_negative_prompt && true_cfg_scale > 1.0 {
            Guidance::TrueCfg {
                scale: true_cfg_scale,
            }
        } else {
            match guidance {
                Some(scale) => Guidance::Distilled { scale },
                None => Guidance::None,
            }
        }
    }

    /// Model forward calls per step.
    pub fn model_calls(&self) -> usize {
        match self {
            Guidance::TrueCfg { .. } => 2,
            _ => 1,
        }
    }

    /// Batch rows per latent in each call (the input is [`Guidance::batch_input`]).
    pub fn batch_rows(&self) -> usize {
        match self {
            Guidance::Cfg { .. } => 2,
            _ => 1,
        }
    }

    /// Whether the negative (or empty) prompt must be encoded.
    pub fn needs_negative(&self) -> bool {
        matches!(self, Guidance::Cfg { .. } | Guidance::TrueCfg { .. })
    }

    /// The scale that goes into the model (guidance-distilled models only).
    pub fn embedded_scale(&self) -> Option<f32> {
        match self {
            Guidance::Distilled { scale } => Some(*scale),
            _ => None,
        }
    }

    /// The model input for `latents` `(b, ...)`: `(2b, ...)` for [`Guidance::Cfg`]
    /// (`torch.cat([latents] * 2)`), else the latents themselves.
    pub fn batch_input(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        Ok(match self {
            Guidance::Cfg { .. } => Tensor::f_cat(&[latents, latents], 0)?,
            _ => latents.shallow_clone(),
        })
    }

    /// The prediction from one batched call's output (`batch_rows()` rows per latent):
    /// [`Guidance::Cfg`] splits `[uncond, cond]` and combines them; the single-row modes return
    /// the output. [`Guidance::TrueCfg`] needs both calls: use [`Guidance::combine`].
    pub fn combine_batched(&self, output: &Tensor) -> Result<Tensor, EngineError> {
        match self {
            Guidance::Cfg { .. } => {
                let halves = output.f_chunk(2, 0)?; // (uncond, cond)
                self.combine(&halves[1], Some(&halves[0]))
            }
            Guidance::TrueCfg { .. } => Err(EngineError::InvalidRequest(
                "guidance: true CFG combines two model calls, not one batch".into(),
            )),
            _ => Ok(output.shallow_clone()),
        }
    }

    /// The prediction from the conditional output and, for the CFG modes, the unconditional
    /// (negative-prompt) one.
    pub fn combine(&self, cond: &Tensor, uncond: Option<&Tensor>) -> Result<Tensor, EngineError> {
        match (self, uncond) {
            (Guidance::None | Guidance::Distilled { .. }, None) => Ok(cond.shallow_clone()),
            (Guidance::Cfg { scale, rescale }, Some(uncond)) => {
                let guided = cfg(cond, uncond, *scale)?;
                if *rescale > 0.0 {
                    rescale_noise_cfg(&guided, cond, *rescale)
                } else {
                    Ok(guided)
                }
            }
            (Guidance::TrueCfg { scale }, Some(uncond)) => cfg(cond, uncond, *scale),
            (_, Some(_)) => Err(EngineError::InvalidRequest(format!(
                "guidance: {self:?} takes no unconditional output"
            ))),
            (_, None) => Err(EngineError::InvalidRequest(format!(
                "guidance: {self:?} needs the unconditional output"
            ))),
        }
    }
}

/// `uncond + scale * (cond - uncond)` (diffusers' CFG and Flux's true CFG).
pub fn cfg(cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor, EngineError> {
    Ok(uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(f64::from(scale))?)?)
}

/// diffusers' `rescale_noise_cfg` (Lin et al., "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed", 3.4): rescales `noise_cfg` to the standard deviation of
/// `noise_pred_text` (unbiased std over every dim but the batch) and mixes
/// `guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg`.
pub fn rescale_noise_cfg(
    noise_cfg: &Tensor,
    noise_pred_text: &Tensor,
    guidance_rescale: f32,
) -> Result<Tensor, EngineError> {
    let dims: Vec<i64> = (1..noise_pred_text.dim() as i64).collect();
    let std_text = noise_pred_text.f_std_dim(dims.as_slice(), true, true)?;
    let std_cfg = noise_cfg.f_std_dim(dims.as_slice(), true, true)?;
    let rescaled = noise_cfg.f_mul(&std_text.f_div(&std_cfg)?)?;
    // Python evaluates (1 - guidance_rescale) in float64 before it scales the tensor.
    let r = f64::from(guidance_rescale);
    Ok(rescaled
        .f_mul_scalar(r)?
        .f_add(&noise_cfg.f_mul_scalar(1.0 - r)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).reshape([1, v.len() as i64])
    }

    #[test]
    fn call_and_row_counts_follow_the_mode() {
        let modes = [
            (Guidance::None, 1, 1, false),
            (Guidance::Distilled { scale: 3.5 }, 1, 1, false),
            (
                Guidance::Cfg {
                    scale: 5.0,
                    rescale: 0.0,
                },
                1,
                2,
                true,
            ),
            (Guidance::TrueCfg { scale: 4.0 }, 2, 1, true),
        ];
        for (g, calls, rows, neg) in modes {
            assert_eq!(
                (g.model_calls(), g.batch_rows(), g.needs_negative()),
                (calls, rows, neg),
                "{g:?}"
            );
        }
        assert_eq!(Guidance::Distilled { scale: 3.5 }.embedded_scale(), Some(3.5));
        assert_eq!(Guidance::classifier_free(1.0, 0.0), Guidance::None);
        assert_eq!(
            Guidance::flux(Some(3.5), 4.0, false),
            Guidance::Distilled { scale: 3.5 }
        );
        assert_eq!(
            Guidance::flux(Some(3.5), 4.0, true),
            Guidance::TrueCfg { scale: 4.0 }
        );
    }

    #[test]
    fn cfg_moves_from_uncond_towards_cond_by_the_scale() {
        let g = Guidance::Cfg {
            scale: 3.0,
            rescale: 0.0,
        };
        let out = g.combine(&t(&[2.0, 1.0]), Some(&t(&[1.0, 1.0]))).unwrap();
        assert_eq!(Vec::<f32>::try_from(out.flatten(0, -1)).unwrap(), vec![4.0, 1.0]);
        // The batched form splits [uncond, cond] rows.
        let batch = Tensor::cat(&[t(&[1.0, 1.0]), t(&[2.0, 1.0])], 0);
        assert!(g.combine_batched(&batch).unwrap().equal(&out));
        let lat = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(g.batch_input(&lat).unwrap().size(), vec![2, 4, 2, 2]);
    }

    #[test]
    fn true_cfg_matches_the_flux_pipeline_formula() {
        let pos = Tensor::randn([1, 16, 8], (Kind::Float, Device::Cpu));
        let neg = Tensor::randn([1, 16, 8], (Kind::Float, Device::Cpu));
        let g = Guidance::TrueCfg { scale: 4.0 };
        let want = crate::flux::pipeline::true_cfg(&pos, &neg, 4.0).unwrap();
        assert!(g.combine(&pos, Some(&neg)).unwrap().equal(&want));
        assert!(g.combine_batched(&pos).is_err());
    }

    #[test]
    fn full_rescale_gives_the_cond_std_and_missing_outputs_are_errors() {
        let cond = Tensor::randn([2, 4, 3, 3], (Kind::Float, Device::Cpu));
        let uncond = Tensor::randn([2, 4, 3, 3], (Kind::Float, Device::Cpu));
        let g = Guidance::Cfg {
            scale: 7.5,
            rescale: 1.0,
        };
        let out = g.combine(&cond, Some(&uncond)).unwrap();
        let s_out = out.std_dim([1i64, 2, 3].as_slice(), true, false);
        let s_cond = cond.std_dim([1i64, 2, 3].as_slice(), true, false);
        assert!(s_out.allclose(&s_cond, 1e-5, 1e-6, false));
        assert!(g.combine(&cond, None).is_err());
        assert!(Guidance::None.combine(&cond, Some(&uncond)).is_err());
    }
}
