//! Patch-parallel VAE decode: the latent is split into horizontal bands of rows, one per rank,
//! and every rank runs the whole decoder on its band through [`Bands`] (halo-exchanged
//! convolutions, GroupNorm with global statistics, the mid block's attention over the gathered
//! keys and values of every pixel, row-local upsampling: see [`super::spatial`]). The result on
//! each rank is its band of image rows, equal to the same rows of the single decode up to
//! floating-point summation order.

use tch::Tensor;

use super::comm::Communicator;
use super::spatial::Bands;
use crate::EngineError;
use crate::nn::spatial::SpatialDecoder;

/// Decodes this rank's band of the latent. `z` `(1, latent_ch, h_r, w)` are this rank's rows of
/// the latent as the denoiser leaves it (the decoder unscales it); `rows[j]` = `(start, len)` of
/// rank `j`'s band, contiguous from row 0 in rank order (a band may be empty). Returns this
/// rank's image rows `(1, 3, f h_r, f w)` in [-1, 1]. Every rank of `comm` must call it (SPMD).
pub fn decode_patch_parallel(
    decoder: &dyn SpatialDecoder,
    z: &Tensor,
    comm: &dyn Communicator,
    rows: &[(i64, i64)],
) -> Result<Tensor, EngineError> {
    let _guard = tch::no_grad_guard();
    let (_, _, h, w) = z.size4()?;
    let me = comm.rank();
    if rows.get(me).is_some_and(|r| r.1 != h) {
        return Err(EngineError::Torch(format!(
            "patch-parallel VAE decode: rank {me} holds {h} rows, its band is {:?}",
            rows[me]
        )));
    }
    let bands = Bands::new(comm, rows, w)?;
    Ok(decoder.decode_with(z, &bands)?)
}
