//! The blocks of SDXL's UNet, named like diffusers' checkpoint keys: `ResnetBlock2D`
//! (`resnets.N`), `Transformer2DModel` with its `BasicTransformerBlock`s (`attentions.N`), the
//! strided-conv downsampler (`downsamplers.0.conv`), the nearest + conv upsampler
//! (`upsamplers.0.conv`), and the down, mid and up blocks built from them.
//!
//! Every operation that looks beyond a pixel's own row (GroupNorm, 3x3 convolutions,
//! self-attention over the image tokens, nearest upsampling) goes through a [`SpatialOps`], so
//! that a UNet split into
//! row bands across GPUs can supply halo-exchanging convolutions, GroupNorm with global
//! statistics and sequence-parallel attention without touching this code. Everything else
//! (SiLU, linear layers, LayerNorm, cross-attention to the text, residual adds) is local to a
//! pixel or token.

use tch::{Tensor, nn};

use super::fast::{AttnKernel, fused_kernels_apply, is_channels_last};
use crate::nn::spatial::SpatialOps;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Res};

/// What every block's forward needs besides its input: `silu(emb)` `(b, temb)` (each resnet's
/// `time_emb_proj` input; the SiLU is computed once per forward instead of once per resnet),
/// the text states `(b, seq, cross_dim)`, the spatial operations, and the pixel-local fast paths
/// ([`super::fast::Perf`]): the cross-attention kernel and whether GEGLU runs fused.
pub struct Cond<'a> {
    pub temb_act: &'a Tensor,
    pub context: &'a Tensor,
    pub spatial: &'a dyn SpatialOps,
    pub attention: AttnKernel,
    pub fused: bool,
    /// A residual add and the next LayerNorm as one kernel ([`super::fast::Perf::addln`]).
    pub addln: bool,
    /// Attention projections of one input as one matmul (where they were stacked).
    pub stacked: bool,
}

impl<'a> Cond<'a> {
    /// With the reference formulations of the pixel-local operations (ATen's attention pick,
    /// unfused GEGLU).
    pub fn new(temb_act: &'a Tensor, context: &'a Tensor, spatial: &'a dyn SpatialOps) -> Self {
        Self {
            temb_act,
            context,
            spatial,
            attention: AttnKernel::Sdpa,
            fused: false,
            addln: false,
            stacked: false,
        }
    }
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1x1 convolution on the residual path where the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path<'_>, cin: i64, cout: i64, temb: i64, groups: i64, eps: f64) -> Res<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&p / "norm1", groups, cin, eps)?,
            conv1: Conv2d::new(&p / "conv1", cin, cout, 3)?,
            time_emb_proj: Linear::new(&p / "time_emb_proj", temb, cout, true)?,
            norm2: GroupNorm::new(&p / "norm2", groups, cout, eps)?,
            conv2: Conv2d::new(&p / "conv2", cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p / "conv_shortcut", cin, cout, 1)?)
            } else {
                None
            },
        })
    }

    /// `(b, cin, h, w) -> (b, cout, h, w)`. SiLU and the adds run in place on fresh tensors (or
    /// inside a fused GroupNorm: the time embedding is added where `norm2` reads its input).
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>) -> Res<Tensor> {
        let s = c.spatial;
        let h = s.group_norm_silu(&self.norm1, x.shallow_clone(), None)?;
        let t = self.time_emb_proj.forward(c.temb_act)?; // (b, cout)
        let h = s.conv(&self.conv1, &h)?; // (b, cout, h, w)
        let h = s.group_norm_silu(&self.norm2, h, Some(&t))?;
        match &self.conv_shortcut {
            // Pixel-local, but through the seam like every convolution: a row-split forward
            // may hold an empty band, which a plain 1x1 convolution refuses.
            Some(conv) => s.conv_add(&self.conv2, &h, &s.conv(conv, x)?),
            None => s.conv_add(&self.conv2, &h, x),
        }
    }
}

/// diffusers `Attention` as `BasicTransformerBlock` builds it: q/k/v without bias, `to_out.0`
/// with bias, `heads` heads of `dim / heads` channels.
#[derive(Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: i64,
    /// The projections of one input as one weight ([`Attention::fuse_projections`]): `[q; k; v]`
    /// for self-attention, `[k; v]` for cross-attention (the text side); `to_q`/`to_k`/`to_v`
    /// then hold views of its rows.
    fused: Option<Tensor>,
}

impl Attention {
    /// `context_dim`: the key/value input width (`dim` for self-attention).
    pub fn new(p: nn::Path<'_>, dim: i64, context_dim: i64, heads: i64) -> Res<Self> {
        Ok(Self {
            to_q: Linear::new(&p / "to_q", dim, dim, false)?,
            to_k: Linear::new(&p / "to_k", context_dim, dim, false)?,
            to_v: Linear::new(&p / "to_v", context_dim, dim, false)?,
            to_out: Linear::new(&p / "to_out" / 0, dim, dim, true)?,
            heads,
            fused: None,
        })
    }

    /// Stacks the projections that read one input (`self_attention`: q, k and v; else k and v,
    /// which read the text) into one weight, so each is one matmul of the stacked width: fewer
    /// launches, and wider matmuls that run nearer the matmul rate. Each projection's variable
    /// becomes a view of its rows (`set_data`): the weights stay in memory once, and loading or
    /// copying into the variables writes the stacked weight. Idempotent.
    pub fn fuse_projections(&mut self, self_attention: bool) -> Res<()> {
        if self.fused.is_some() {
            return Ok(());
        }
        let parts: Vec<&mut Linear> = if self_attention {
            vec![&mut self.to_q, &mut self.to_k, &mut self.to_v]
        } else {
            vec![&mut self.to_k, &mut self.to_v]
        };
        let stacked = Tensor::f_cat(&parts.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0)?; // (n * dim, in)
        let mut row = 0;
        for l in parts {
            let rows = l.weight.size()[0];
            l.weight.f_set_data(&stacked.f_narrow(0, row, rows)?)?;
            row += rows;
        }
        self.fused = Some(stacked);
        Ok(())
    }

    /// `x` `(b, n, in)` through the stacked weight -> its `parts` outputs `(b, n, dim)` (views).
    fn stacked(&self, w: &Tensor, x: &Tensor, parts: i64) -> Res<Vec<Tensor>> {
        let y = x.f_linear(w, None::<&Tensor>)?; // (b, n, parts * dim)
        let dim = y.size()[2] / parts;
        (0..parts).map(|i| y.f_narrow(2, i * dim, dim)).collect()
    }

    /// `(b, n, dim) -> (b, heads, n, head_dim)`.
    fn split_heads(&self, x: Tensor) -> Res<Tensor> {
        let (b, n, d) = x.size3()?;
        x.f_view([b, n, self.heads, d / self.heads])?.f_transpose(1, 2)
    }

    /// `(b, heads, n, head_dim) -> to_out((b, n, dim))`.
    fn merge_heads(&self, x: Tensor) -> Res<Tensor> {
        let (b, h, n, d) = x.size4()?;
        let x = x.f_transpose(1, 2)?.f_reshape([b, n, h * d])?;
        self.to_out.forward(&x)
    }

    /// Self-attention over the image tokens `x` `(b, n, dim)` (through the [`SpatialOps`] seam);
    /// `stacked`: q, k and v from one matmul where [`Attention::fuse_projections`] stacked them.
    pub fn forward_self(&self, x: &Tensor, spatial: &dyn SpatialOps, stacked: bool) -> Res<Tensor> {
        let (q, k, v) = match (&self.fused, stacked) {
            (Some(w), true) => {
                let mut p = self.stacked(w, x, 3)?.into_iter();
                let mut next = || p.next().ok_or_else(|| tch::TchError::Shape("q, k, v".into()));
                (next()?, next()?, next()?)
            }
            _ => (
                self.to_q.forward(x)?,
                self.to_k.forward(x)?,
                self.to_v.forward(x)?,
            ),
        };
        let (q, k, v) = (self.split_heads(q)?, self.split_heads(k)?, self.split_heads(v)?);
        self.merge_heads(spatial.attention(&q, &k, &v)?)
    }

    /// Cross-attention of the image tokens `x` `(b, n, dim)` to the text `context`
    /// `(b, seq, context_dim)` through `kernel`; local to each token.
    pub fn forward_cross(
        &self,
        x: &Tensor,
        context: &Tensor,
        kernel: AttnKernel,
        stacked: bool,
    ) -> Res<Tensor> {
        let q = self.split_heads(self.to_q.forward(x)?)?;
        let (k, v) = match (&self.fused, stacked) {
            (Some(w), true) => {
                let p = self.stacked(w, context, 2)?;
                (p[0].shallow_clone(), p[1].shallow_clone())
            }
            _ => (self.to_k.forward(context)?, self.to_v.forward(context)?),
        };
        let (k, v) = (self.split_heads(k)?, self.split_heads(v)?);
        self.merge_heads(crate::aten::attention(&q, &k, &v, kernel)?)
    }
}

/// diffusers `FeedForward` with GEGLU: `net.0.proj` (dim -> 2 * 4 dim), value * gelu(gate),
/// `net.2` (4 dim -> dim).
#[derive(Debug)]
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn new(p: nn::Path<'_>, dim: i64) -> Res<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: Linear::new(&p / "net" / 0 / "proj", dim, 2 * inner, true)?,
            proj_out: Linear::new(&p / "net" / 2, inner, dim, true)?,
        })
    }

    /// `fused`: the GEGLU as one kernel where it applies (bf16 on CUDA).
    pub fn forward(&self, x: &Tensor, fused: bool) -> Res<Tensor> {
        let h = self.proj_in.forward(x)?; // (b, n, 8 dim)
        let h = if fused_kernels_apply(fused, &h) && h.is_contiguous() && h.numel() < 1 << 32 {
            crate::aten::geglu(&h)?
        } else {
            let parts = h.f_chunk(2, -1)?; // value, gate: (b, n, 4 dim) each
            parts[0].f_mul(&parts[1].f_gelu("none")?)?
        }; // (b, n, 4 dim)
        self.proj_out.forward(&h)
    }
}

/// diffusers `BasicTransformerBlock` (`norm_type="layer_norm"`): self-attention, cross-attention
/// to the text, GEGLU feed-forward, each pre-LayerNorm with a residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(p: nn::Path<'_>, dim: i64, heads: i64, cross_dim: i64) -> Res<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&p / "norm1", dim, 1e-5)?,
            attn1: Attention::new(&p / "attn1", dim, dim, heads)?,
            norm2: LayerNorm::new(&p / "norm2", dim, 1e-5)?,
            attn2: Attention::new(&p / "attn2", dim, cross_dim, heads)?,
            norm3: LayerNorm::new(&p / "norm3", dim, 1e-5)?,
            ff: FeedForward::new(&p / "ff", dim)?,
        })
    }

    /// Stacks `attn1`'s q/k/v and `attn2`'s k/v projections ([`Attention::fuse_projections`]).
    pub fn fuse_projections(&mut self) -> Res<()> {
        self.attn1.fuse_projections(true)?;
        self.attn2.fuse_projections(false)
    }

    /// `x` `(b, n, dim)` image tokens.
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>) -> Res<Tensor> {
        let (x, f) = self.forward_open(x, &self.norm1.forward(x)?, c)?;
        add_to(f, &x)
    }

    /// The block from `x` and its `norm1(x)` `h1` up to the feed-forward's output: returns the
    /// residual stream and that output, the block's result being their sum (left to the caller,
    /// so that the next block can add it in its `norm1`'s kernel: [`add_norm`]).
    pub fn forward_open(&self, x: &Tensor, h1: &Tensor, c: &Cond<'_>) -> Res<(Tensor, Tensor)> {
        let a = self.attn1.forward_self(h1, c.spatial, c.stacked)?;
        let (x, h2) = add_norm(&self.norm2, x, a, c)?;
        let a = self.attn2.forward_cross(&h2, c.context, c.attention, c.stacked)?;
        let (x, h3) = add_norm(&self.norm3, &x, a, c)?;
        Ok((x, self.ff.forward(&h3, c.fused)?))
    }
}

/// `y + x` in `y`'s storage: the residual add of the reference forward.
fn add_to(mut y: Tensor, x: &Tensor) -> Res<Tensor> {
    y.f_add_(x)
}

/// `(x + y, norm(x + y))`: the fused kernel where [`Cond::addln`] applies (bf16 on CUDA,
/// contiguous aligned token rows, an affine LayerNorm), else the add and the LayerNorm as the
/// reference forward runs them. The same sum either way; the norm's statistics in fp32 both ways.
pub fn add_norm(norm: &LayerNorm, x: &Tensor, y: Tensor, c: &Cond<'_>) -> Res<(Tensor, Tensor)> {
    if let (Some(w), Some(b)) = (&norm.weight, &norm.bias) {
        let n = x.size().last().copied().unwrap_or(0);
        if fused_kernels_apply(c.addln, x)
            && y.kind() == x.kind()
            && w.kind() == x.kind()
            && b.kind() == x.kind()
            && x.size() == y.size()
            && x.is_contiguous()
            && y.is_contiguous()
            && n > 0
            && n % 8 == 0
            && n <= 8192
            && crate::aten::aligned16(x)
            && crate::aten::aligned16(&y)
            && crate::aten::aligned16(w)
            && crate::aten::aligned16(b)
        {
            return crate::aten::add_layer_norm(x, &y, w, b, norm.eps);
        }
    }
    let x = add_to(y, x)?;
    let h = norm.forward(&x)?;
    Ok((x, h))
}

/// diffusers `Transformer2DModel` on continuous input with `use_linear_projection`: GroupNorm
/// (eps 1e-6), `proj_in` on the tokens, the transformer blocks, `proj_out`, plus the residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Linear,
}

impl Transformer2DModel {
    pub fn new(p: nn::Path<'_>, ch: i64, heads: i64, layers: i64, cross_dim: i64, groups: i64) -> Res<Self> {
        let transformer_blocks = (0..layers)
            .map(|i| BasicTransformerBlock::new(&p / "transformer_blocks" / i, ch, heads, cross_dim))
            .collect::<Res<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(&p / "norm", groups, ch, 1e-6)?,
            proj_in: Linear::new(&p / "proj_in", ch, ch, true)?,
            transformer_blocks,
            proj_out: Linear::new(&p / "proj_out", ch, ch, true)?,
        })
    }

    /// `(b, c, h, w) -> (b, c, h, w)`, in `x`'s memory layout. The token view `(b, h*w, c)` is
    /// free for a channels-last `x` (and the output's way back too); NCHW costs a copy each way.
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>) -> Res<Tensor> {
        let (b, ch, h, w) = x.size4()?;
        let t = c
            .spatial
            .group_norm(&self.norm, x)?
            .f_permute([0, 2, 3, 1])?
            .f_reshape([b, h * w, ch])?; // (b, hw, c), row-major pixels
        let mut t = self.proj_in.forward(&t)?;
        // Each block's feed-forward output is added where the next block's norm1 reads it.
        let mut open: Option<(Tensor, Tensor)> = None;
        for block in &self.transformer_blocks {
            let (x, h1) = match open.take() {
                None => {
                    let h1 = block.norm1.forward(&t)?;
                    (t.shallow_clone(), h1)
                }
                Some((x, f)) => add_norm(&block.norm1, &x, f, c)?,
            };
            open = Some(block.forward_open(&x, &h1, c)?);
        }
        if let Some((x, f)) = open {
            t = add_to(f, &x)?;
        }
        let out = self
            .proj_out
            .forward(&t)?
            .f_reshape([b, h, w, ch])?
            .f_permute([0, 3, 1, 2])?; // (b, c, h, w), channels-last memory
        let mut out = if is_channels_last(x) {
            out
        } else {
            out.f_contiguous()?
        };
        out.f_add_(x)
    }
}

/// `DownBlock2D` (no `attentions`) or `CrossAttnDownBlock2D`: resnets (each followed by its
/// transformer), then the stride-2 `downsamplers.0.conv` on all but the last level.
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Conv2d>,
}

impl DownBlock {
    /// Runs the block on `x` and pushes every output the up path concatenates back in (each
    /// layer's, then the downsampler's) onto `skips`.
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>, skips: &mut Vec<Tensor>) -> Res<Tensor> {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, c)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, c)?;
            }
            skips.push(h.shallow_clone());
        }
        if let Some(conv) = &self.downsampler {
            h = c.spatial.conv(conv, &h)?; // (b, c, ceil(h/2), ceil(w/2))
            skips.push(h.shallow_clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>) -> Res<Tensor> {
        let mut h = self.resnets[0].forward(x, c)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, c)?;
            h = resnet.forward(&h, c)?;
        }
        Ok(h)
    }
}

/// `UpBlock2D` (no `attentions`) or `CrossAttnUpBlock2D`: each resnet takes the previous output
/// concatenated with the next skip connection, then its transformer; the upsampler (nearest,
/// then `upsamplers.0.conv`) on all but the last block.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// Pops one skip connection per resnet from `skips`; the upsampler grows the result to the
    /// size of the skip left on top (the next block's first), as diffusers' `upsample_size`.
    pub fn forward(&self, x: &Tensor, c: &Cond<'_>, skips: &mut Vec<Tensor>) -> Res<Tensor> {
        let missing = || tch::TchError::Shape("the up path ran out of skip connections".into());
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(missing)?;
            h = resnet.forward(&Tensor::f_cat(&[&h, &skip], 1)?, c)?; // (b, c + c_skip, h, w) in
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, c)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let next = skips.last().ok_or_else(missing)?.size();
            let up = c.spatial.upsample_nearest(&h, [next[2], next[3]])?; // (b, c, ~2h, ~2w)
            h = c.spatial.conv(conv, &up)?;
        }
        Ok(h)
    }
}
