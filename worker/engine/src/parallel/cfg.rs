//! CFG parallel: the two branches of classifier-free guidance on the two ranks of a CFG group
//! ([`super::comm::Mesh::cfg`] = 2). Rank [`COND_RANK`] computes the conditional prediction,
//! rank [`UNCOND_RANK`] the unconditional one; one all-gather gives both predictions to both
//! ranks, and each computes the guided prediction with [`crate::guidance`], so both hold the
//! same tensor and step the same latents.
//!
//! Combined with patch parallelism, each rank holds one band of its branch's prediction and the
//! CFG group joins the same band of both branches. The guidance formula is per pixel except the
//! standard deviations of `guidance_rescale`, which are of the whole image: [`guide`] reduces
//! their sums over the patch group.

use tch::{Kind, TchError, Tensor};

use super::comm::Communicator;
use crate::EngineError;
use crate::guidance::{Guidance, cfg};
use crate::nn::Res;

/// The CFG-group rank that computes the conditional (prompt) branch.
pub const COND_RANK: usize = 0;
/// The CFG-group rank that computes the unconditional (negative prompt) branch.
pub const UNCOND_RANK: usize = 1;

/// The guided prediction on every rank of a CFG group of 2: `own` is this rank's branch's
/// prediction (its band of it under patch parallelism, `patch` being the group of bands; a group
/// of one otherwise). Every rank of `cfg` must call it (SPMD).
pub fn combine_branches(
    cfg: &dyn Communicator,
    patch: &dyn Communicator,
    own: &Tensor,
    guidance: &Guidance,
) -> Result<Tensor, EngineError> {
    if cfg.size() != 2 {
        return Err(EngineError::InvalidRequest(format!(
            "CFG parallel runs on a group of 2 ranks, not {}",
            cfg.size()
        )));
    }
    let parts = cfg
        .all_gather(&own.f_to_device(cfg.device())?)
        .map_err(TchError::from)?;
    let cond = parts[COND_RANK].f_to_device(own.device())?;
    let uncond = parts[UNCOND_RANK].f_to_device(own.device())?;
    guide(guidance, &cond, &uncond, patch)
}

/// [`Guidance::combine`] of a prediction split into row bands over `patch`: the same formula,
/// with `guidance_rescale`'s standard deviations taken over the whole image.
pub fn guide(
    guidance: &Guidance,
    cond: &Tensor,
    uncond: &Tensor,
    patch: &dyn Communicator,
) -> Result<Tensor, EngineError> {
    match *guidance {
        Guidance::Cfg { scale, rescale } if rescale > 0.0 && patch.size() > 1 => {
            let guided = cfg(cond, uncond, scale)?;
            // diffusers' rescale_noise_cfg, op for op, with global standard deviations.
            let std_text = global_std(cond, patch)?;
            let std_cfg = global_std(&guided, patch)?;
            let rescaled = guided.f_mul(&std_text.f_div(&std_cfg)?)?;
            let r = f64::from(rescale);
            Ok(rescaled.f_mul_scalar(r)?.f_add(&guided.f_mul_scalar(1.0 - r)?)?)
        }
        _ => guidance.combine(cond, Some(uncond)),
    }
}

/// The unbiased standard deviation of each batch item of `t` `(b, ...)` over all its other
/// dims and every rank's band, `(b, 1, ...)` in `t`'s kind: sums and counts, then squared
/// deviations from the global mean, in fp64, all-reduced over `patch`.
fn global_std(t: &Tensor, patch: &dyn Communicator) -> Res<Tensor> {
    let b = t.size()[0];
    let flat = t.f_reshape([b, -1])?.f_to_kind(Kind::Double)?; // (b, n_r)
    let reduce = |x: &Tensor| -> Res<Tensor> {
        let sum = patch.all_reduce_sum(&x.f_to_device(patch.device())?)?;
        sum.f_to_device(t.device())
    };
    let n = flat.size()[1] as f64;
    let sums = Tensor::f_stack(
        &[
            flat.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?,
            Tensor::f_full([b], n, (Kind::Double, t.device()))?,
        ],
        1,
    )?; // (b, 2): sum, count
    let sums = reduce(&sums)?;
    let (sum, count) = (sums.f_select(1, 0)?, sums.f_select(1, 1)?);
    let mean = sum.f_div(&count)?.f_unsqueeze(1)?; // (b, 1)
    let d = flat.f_sub(&mean)?;
    let sq = reduce(
        &d.f_mul(&d)?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?,
    )?;
    let std = sq.f_div(&count.f_sub_scalar(1.0)?)?.f_sqrt()?; // (b,)
    let mut shape = vec![b];
    shape.resize(t.dim(), 1);
    std.f_to_kind(t.kind())?.f_reshape(shape)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Device;

    use super::*;
    use crate::parallel::threads::ThreadComm;

    /// The band-split rescale equals diffusers' rescale on the whole image (the per-band std
    /// would not: the bands' statistics differ), and without rescale the formula is per pixel.
    #[test]
    fn rescaled_guidance_of_bands_uses_the_whole_image_std() {
        let _g = tch::no_grad_guard();
        // Deterministic data (no RNG: other tests draw seeded noise from the global one), rows of
        // very different scale so that a per-band std would be far from the global one.
        let wave = |shape: [i64; 4], f: f64| {
            let n: i64 = shape.iter().product();
            (Tensor::arange(n, (Kind::Float, Device::Cpu)) * f)
                .sin()
                .view(shape)
        };
        let ramp = Tensor::arange(7, (Kind::Float, Device::Cpu)).view([1, 1, 7, 1]) + 0.5;
        let cond = wave([2, 4, 7, 5], 0.37) * ramp;
        let uncond = wave([2, 4, 7, 5], 1.13);
        let rows = [(0i64, 3i64), (3, 4)];
        for rescale in [0.0f32, 0.7] {
            let g = Guidance::Cfg { scale: 5.0, rescale };
            let want = g.combine(&cond, Some(&uncond)).unwrap();
            let comms = ThreadComm::group(2, Device::Cpu, Duration::from_secs(60));
            let bands: Vec<Tensor> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .zip(rows)
                    .map(|(c, (start, len))| {
                        let (cb, ub) = (cond.narrow(2, start, len), uncond.narrow(2, start, len));
                        s.spawn(move || guide(&g, &cb, &ub, c).unwrap())
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let got = Tensor::cat(&bands, 2);
            let d = f64::try_from(got.f_sub(&want).unwrap().abs().max()).unwrap();
            assert!(d <= 1e-5, "rescale {rescale}: max abs diff {d:e}");
            if rescale > 0.0 {
                let local = g
                    .combine(&cond.narrow(2, 0, 3), Some(&uncond.narrow(2, 0, 3)))
                    .unwrap();
                let off = f64::try_from(local.f_sub(&want.narrow(2, 0, 3)).unwrap().abs().max()).unwrap();
                assert!(off > 1e-2, "per-band statistics would have passed too ({off:e})");
            }
        }
    }
}
