//! SDXL over several GPUs, exact (equal to one device up to floating-point summation order):
//!
//! - patch parallel ([`forward_patch_parallel`]): the latent is split into row bands over a
//!   patch group and every rank runs the whole UNet on its band. Every GroupNorm, 3x3
//!   convolution (the stride-2 downsamplers included), self-attention (`attn1`) and upsampling
//!   goes through [`Bands`] (halo rows, global statistics, keys and values of every pixel; see
//!   [`crate::parallel::spatial`]); the time embedding, cross-attention to the text (`attn2`),
//!   the feed-forwards and the skip connections are local to the band. Bands start at multiples
//!   of `2^downsamplers` latent rows ([`unet_rows`]), so they split cleanly at every level;
//! - CFG parallel ([`guided_noise`] on a CFG group of 2): the conditional branch on one rank,
//!   the unconditional on the other, combined by one all-gather ([`crate::parallel::cfg`]);
//! - both: `cfg = 2 x patch = N` on `2N` ranks, a CFG group per band index and a patch group per
//!   branch ([`crate::parallel::comm::Mesh`] with `patch = N`).
//!
//! The VAE decode splits into the same bands ([`decode_band`]), so the denoised bands are
//! decoded where they are.

use tch::Tensor;

use super::unet::{Config, SingleDevice, Unet};
use super::vae::Vae;
use crate::EngineError;
use crate::guidance::Guidance;
use crate::parallel::cfg::{COND_RANK, combine_branches, guide};
use crate::parallel::comm::{Communicator, RankComms};
use crate::parallel::spatial::{Bands, aligned_split};
use crate::parallel::vae::decode_patch_parallel;

/// Latent rows a UNet band starts at a multiple of: `2^downsamplers`, so that every band starts
/// at an even row at each stride-2 convolution.
pub fn row_alignment(config: &Config) -> i64 {
    1 << (config.block_out_channels.len().max(1) - 1)
}

/// The bands `(start, len)` of a latent of `h` rows over the `parts` ranks of a patch group
/// ([`aligned_split`] at [`row_alignment`]; the last band takes the remainder).
pub fn unet_rows(config: &Config, h: i64, parts: usize) -> Vec<(i64, i64)> {
    aligned_split(h, parts, row_alignment(config))
}

fn check_band(what: &str, h: i64, comm: &dyn Communicator, rows: &[(i64, i64)]) -> Result<(), EngineError> {
    let me = comm.rank();
    match rows.get(me) {
        Some(&(_, len)) if len == h && rows.len() == comm.size() => Ok(()),
        _ => Err(EngineError::InvalidRequest(format!(
            "{what}: rank {me} of {} holds {h} rows, the bands are {rows:?}",
            comm.size()
        ))),
    }
}

/// One UNet forward of this rank's band: `sample` `(b, in_ch, h_r, w)` are rows `rows[rank]` of
/// the latent, `emb` [`Unet::embed`]'s conditioning and `encoder_hidden_states` the whole text
/// `(b, seq, cross_dim)`. Returns the same rows of the output `(b, out_ch, h_r, w)`. Every rank
/// of `patch` must call it (SPMD); bands from [`unet_rows`].
pub fn forward_patch_parallel(
    unet: &Unet,
    sample: &Tensor,
    emb: &Tensor,
    encoder_hidden_states: &Tensor,
    patch: &dyn Communicator,
    rows: &[(i64, i64)],
) -> Result<Tensor, EngineError> {
    let _guard = tch::no_grad_guard();
    let (_, _, h, w) = sample.size4()?;
    check_band("patch-parallel UNet", h, patch, rows)?;
    if patch.size() == 1 {
        return Ok(unet.forward_embedded(sample, emb, encoder_hidden_states, &SingleDevice)?);
    }
    let bands = Bands::new(patch, rows, w)?;
    Ok(unet.forward_embedded(sample, emb, encoder_hidden_states, &bands)?)
}

/// What the UNet takes for one prompt besides the latents and the timestep.
#[derive(Debug)]
pub struct TextConditioning {
    /// `(b, seq, cross_dim)`: both text encoders' penultimate states, concatenated.
    pub encoder_hidden_states: Tensor,
    /// `(b, text_dim)`: the pooled OpenCLIP-bigG projection.
    pub text_embeds: Tensor,
    /// `(b, 6)`: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

impl TextConditioning {
    /// `[first, second]` along the batch (diffusers' CFG batch is `[uncond, cond]`).
    fn stack(first: &Self, second: &Self) -> Result<Self, EngineError> {
        let cat = |a: &Tensor, b: &Tensor| Tensor::f_cat(&[a, b], 0);
        Ok(Self {
            encoder_hidden_states: cat(&first.encoder_hidden_states, &second.encoder_hidden_states)?,
            text_embeds: cat(&first.text_embeds, &second.text_embeds)?,
            time_ids: cat(&first.time_ids, &second.time_ids)?,
        })
    }
}

/// The guided noise prediction for this rank's band of `latents` `(b, 4, h_r, w)` at one step of
/// an SDXL plan `cfg x patch` (`comms.cfg` of 1 or 2 ranks, `comms.sp` the patch group; `rows`
/// from [`unet_rows`]). `uncond` is the negative prompt's conditioning, needed when `guidance`
/// is a CFG mode. Every rank ends with the same tensor as the rows of the single-device
/// `guidance.combine_batched(unet([uncond, cond]))`:
///
/// - CFG group of 2: rank [`COND_RANK`] runs the conditional branch, the other the unconditional
///   one, then one all-gather and the guidance formula on both;
/// - CFG group of 1: the `[uncond, cond]` batch of 2 on every rank, as diffusers;
/// - no guidance: every rank runs the conditional branch (a CFG pair computes it twice).
#[allow(clippy::too_many_arguments)]
pub fn guided_noise(
    unet: &Unet,
    comms: &RankComms,
    rows: &[(i64, i64)],
    latents: &Tensor,
    timestep: &Tensor,
    cond: &TextConditioning,
    uncond: Option<&TextConditioning>,
    guidance: &Guidance,
) -> Result<Tensor, EngineError> {
    let _guard = tch::no_grad_guard();
    let (patch, cfg) = (&*comms.sp, &*comms.cfg);
    let run = |branch: &TextConditioning, x: &Tensor| -> Result<Tensor, EngineError> {
        let emb = unet.embed(timestep, &branch.text_embeds, &branch.time_ids)?;
        forward_patch_parallel(unet, x, &emb, &branch.encoder_hidden_states, patch, rows)
    };
    if !guidance.needs_negative() {
        return run(cond, latents);
    }
    let uncond = uncond.ok_or_else(|| {
        EngineError::InvalidRequest(format!("guidance {guidance:?} needs the negative prompt"))
    })?;
    if cfg.size() == 2 {
        let own = if cfg.rank() == COND_RANK {
            run(cond, latents)?
        } else {
            run(uncond, latents)?
        };
        return combine_branches(cfg, patch, &own, guidance);
    }
    if guidance.batch_rows() == 2 {
        let out = run(
            &TextConditioning::stack(uncond, cond)?,
            &guidance.batch_input(latents)?,
        )?;
        let halves = out.f_chunk(2, 0)?; // (uncond, cond)
        guide(guidance, &halves[1], &halves[0], patch)
    } else {
        let (c, u) = (run(cond, latents)?, run(uncond, latents)?);
        guide(guidance, &c, &u, patch)
    }
}

/// Decodes this rank's band of the denoised latents `(1, 4, h_r, w)` (any kind; `rows` as the
/// UNet's or any other contiguous split) -> its image rows `(1, 3, 8 h_r, 8 w)` in [-1, 1], in
/// [`Vae::kind`]. Every rank of `comm` must call it.
pub fn decode_band(
    vae: &Vae,
    latents: &Tensor,
    comm: &dyn Communicator,
    rows: &[(i64, i64)],
) -> Result<Tensor, EngineError> {
    let z = latents
        .f_to_device(vae.decoder.conv_in.weight.device())?
        .f_to_kind(vae.kind())?;
    decode_patch_parallel(&vae.decoder, &z, comm, rows)
}
