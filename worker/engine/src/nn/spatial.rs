//! The seam between a convolutional model (a VAE decoder, a UNet) and the way its image is laid
//! out over devices.
//!
//! A model calls every operation that looks beyond a pixel's own row through [`SpatialOps`]:
//! convolutions, GroupNorm (statistics over the whole image), self-attention over the image
//! tokens, nearest upsampling. Everything else (activations, linear layers, LayerNorm over
//! channels, cross-attention to the text, residual adds, concatenation along channels) is local
//! to a pixel. On one device the operations are the plain layer calls ([`SingleDevice`]); an
//! image split into row bands over GPUs supplies halo-exchanging convolutions, global
//! statistics and gathered keys/values (`crate::parallel::spatial::Bands`), and the model code
//! stays the same.

use tch::Tensor;

use super::{Conv2d, GroupNorm, Res, sdpa};

/// The image-space operations of a model. `x` is `(b, c, rows, w)`: the whole image on one
/// device, or this rank's band of rows in a row-split forward, which must get back what the
/// whole-image operation returns for those rows.
pub trait SpatialOps {
    /// The convolution `conv` with its own kernel, stride and zero padding: kernel 1 (stride 1,
    /// no padding) or kernel 3 (padding 1, stride 1, or 2 in a UNet's downsamplers):
    /// `(b, cin, h, w) -> (b, cout, h / stride, w / stride)` (rounded up).
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor>;

    /// `conv(x) + residual` (a resnet's output), as one operation where an implementation fuses
    /// the residual into the convolution's bias add; the default is the convolution, then the
    /// add in place.
    fn conv_add(&self, conv: &Conv2d, x: &Tensor, residual: &Tensor) -> Res<Tensor> {
        let mut h = self.conv(conv, x)?;
        h.f_add_(residual)
    }

    /// GroupNorm of `(b, c, h, w)` with the statistics of the whole image.
    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor>;

    /// `silu(group_norm(x + add))` with `add` `(b, c)` broadcast over the pixels (a resnet's time
    /// embedding), as one operation where an implementation fuses it. `x` is the caller's fresh
    /// tensor: the default adds `add` into it in place, then normalises and applies the SiLU in
    /// place.
    fn group_norm_silu(&self, norm: &GroupNorm, x: Tensor, add: Option<&Tensor>) -> Res<Tensor> {
        group_norm_silu_reference(self, norm, x, add)
    }

    /// Self-attention of the image tokens (row-major pixels): q, k, v `(b, heads, n, head_dim)`
    /// -> `(b, heads, n, head_dim)`, every query attending to the keys of every pixel of the
    /// image (a band's `k` and `v` hold only its own pixels).
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor>;

    /// Nearest-neighbour upsampling of `(b, c, h, w)` to `size` `[rows, cols]`: 2x, or one less
    /// where the finer level of a UNet has an odd size (the size of the skip connection the
    /// result is concatenated with). A band gets its own rows' size.
    fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor>;
}

/// [`SpatialOps::group_norm_silu`] as separate operations through `ops`: `add` added into `x` in
/// place, `ops`' GroupNorm, then the SiLU in place.
pub fn group_norm_silu_reference<O: SpatialOps + ?Sized>(
    ops: &O,
    norm: &GroupNorm,
    x: Tensor,
    add: Option<&Tensor>,
) -> Res<Tensor> {
    let mut x = x;
    if let Some(a) = add {
        x = x.f_add_(&a.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?;
    }
    ops.group_norm(norm, &x)?.f_silu_()
}

/// The whole image on one device: each operation is the plain layer call.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice;

impl SpatialOps for SingleDevice {
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        conv.forward(x)
    }

    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
        norm.forward(x)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        sdpa(q, k, v, None, false, None)
    }

    fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
        x.f_upsample_nearest2d(size, None, None)
    }
}

/// A decoder written against [`SpatialOps`] (the VAE decoders): what a patch-parallel decode
/// (`crate::parallel::vae::decode_patch_parallel`) runs on each rank's band.
pub trait SpatialDecoder {
    /// Latents as the denoiser leaves them `(b, latent_ch, h, w)` -> image in [-1, 1]
    /// `(b, 3, f h, f w)`, with the image-space operations of `ops`.
    fn decode_with(&self, z: &Tensor, ops: &dyn SpatialOps) -> Res<Tensor>;
}
