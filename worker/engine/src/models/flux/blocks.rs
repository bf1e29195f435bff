//! The transformer's blocks: double-stream (separate image and text weights, one joint
//! attention), single-stream over the joint sequence, and the final layer, each in the fused
//! formulations [`Opts`] selects.

use tch::{Device, Kind, Tensor, nn};

use super::embed::{Modulation, Rope, precomputed};
use super::joint::{Ctx, Overlap, Rows, around, overlap_chunks};
use super::layers::{LayerNorm, Linear, Res, RmsNorm};
use super::transformer::{Config, Opts};
use crate::nn::fp8::{self, Act};
use crate::nn::fp8_attention::{Fp8AttnOut, JointFp8};

/// `(1 + scale) * LN(x) + shift` (`norm` has no affine parameters). With [`Opts::modulation`]:
/// for batch 1 the LayerNorm's own affine does the modulation (one pass), else one `addcmul`.
pub(crate) fn modulate(norm: &LayerNorm, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Res<Tensor> {
    if !Opts::get().modulation || norm.weight.is_some() || norm.bias.is_some() {
        return norm.forward(x)?.f_mul(&scale.f_add_scalar(1.0)?)?.f_add(shift);
    }
    let scale1 = scale.f_add_scalar(1.0)?;
    if x.size()[0] == 1 && shift.numel() as i64 == norm.dim && scale.numel() as i64 == norm.dim {
        let w = scale1.f_reshape([norm.dim])?;
        let b = shift.f_reshape([norm.dim])?;
        return x.f_layer_norm([norm.dim], Some(&w), Some(&b), norm.eps, true);
    }
    shift.f_addcmul(&norm.forward(x)?, &scale1)
}

/// `x + gate * y` (one `addcmul` with [`Opts::modulation`]).
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Res<Tensor> {
    if Opts::get().modulation {
        x.f_addcmul(gate, y)
    } else {
        x.f_add(&gate.f_mul(y)?)
    }
}

/// A block's output stream: ready, or `x + gate * y` with the addition still to do, so that the
/// next block adds it in the kernel that computes its modulated LayerNorm
/// ([`gated_add_modulate`]: one pass over the activations where an `addcmul`, a LayerNorm and a
/// small add ran; [`Opts::chain`]).
pub enum Hidden {
    Ready(Tensor),
    Deferred { x: Tensor, gate: Tensor, y: Tensor },
}

impl Hidden {
    /// `x + gate * y` as `opts` has it: deferred with [`Opts::chain`], else added now.
    fn close(x: Tensor, gate: &Tensor, y: Tensor, opts: Opts) -> Res<Hidden> {
        Ok(if opts.chain {
            Hidden::Deferred {
                x,
                gate: gate.shallow_clone(),
                y,
            }
        } else {
            Hidden::Ready(gated_add(&x, gate, &y)?)
        })
    }

    /// The stream as a tensor.
    pub fn materialize(self) -> Res<Tensor> {
        match self {
            Hidden::Ready(t) => Ok(t),
            Hidden::Deferred { x, gate, y } => gated_add(&x, &gate, &y),
        }
    }

    /// The stream and its modulated LayerNorm `(1 + scale) * LN(x) + shift`, as FP8 where `fp8`
    /// (the layer reading it computes in FP8) and the fused kernel writes it so.
    pub(crate) fn modulate(
        self,
        norm: &LayerNorm,
        shift: &Tensor,
        scale: &Tensor,
        opts: Opts,
        fp8: bool,
    ) -> Res<(Tensor, Act)> {
        match self {
            Hidden::Ready(x) => {
                let h = modulate(norm, &x, shift, scale)?;
                Ok((x, Act::Dense(h)))
            }
            Hidden::Deferred { x, gate, y } => {
                gated_add_modulate(norm, &x, &gate, &y, shift, scale, opts, fp8)
            }
        }
    }
}

/// `query_norm` / `key_norm` (RMS over the head dim).
#[derive(Debug)]
pub struct QkNorm {
    pub query_norm: RmsNorm,
    pub key_norm: RmsNorm,
}

impl QkNorm {
    pub(crate) fn new(p: nn::Path<'_>, head_dim: i64) -> Res<Self> {
        Ok(Self {
            query_norm: RmsNorm::new(&p / "query_norm", "scale", head_dim, 1e-6)?,
            key_norm: RmsNorm::new(&p / "key_norm", "scale", head_dim, 1e-6)?,
        })
    }
}

/// One stream's attention projections: fused `qkv`, q/k norms, output `proj`.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub norm: QkNorm,
    pub proj: Linear,
}

impl SelfAttention {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let h = c.hidden_size;
        Ok(Self {
            qkv: Linear::new(&p / "qkv", h, 3 * h, c.qkv_bias)?,
            norm: QkNorm::new(&p / "norm", c.head_dim())?,
            proj: Linear::new(&p / "proj", h, h, true)?,
        })
    }
}

/// Splits a fused `(b, seq, 3 * heads * dim)` projection into normed q, k and v, each
/// `(b, heads, seq, dim)`.
fn split_qkv(qkv: &Tensor, heads: i64, norm: &QkNorm) -> Res<(Tensor, Tensor, Tensor)> {
    let (b, s, w) = qkv.size3()?;
    let d = w / (3 * heads);
    let qkv = qkv.f_reshape([b, s, 3, heads, d])?.f_permute([2, 0, 3, 1, 4])?; // (3, b, heads, seq, d)
    let q = qk_norm(&norm.query_norm, &qkv.f_get(0)?)?;
    let k = qk_norm(&norm.key_norm, &qkv.f_get(1)?)?;
    Ok((q, k, qkv.f_get(2)?))
}

/// q/k RMSNorm: the fused kernel with [`Opts::rms`] (fp32 inside, one rounding), else the
/// reference ops.
fn qk_norm(norm: &RmsNorm, x: &Tensor) -> Res<Tensor> {
    if Opts::get().rms {
        let d = x.size()[x.dim() - 1];
        Ok(x.f_internal_fused_rms_norm([d], Some(&norm.scale), norm.eps)?.0)
    } else {
        norm.forward(x)
    }
}

/// bf16 on a CUDA device: where the fused kernels and cuBLASLt epilogues apply.
fn cuda_bf16(x: &Tensor) -> bool {
    x.device().is_cuda() && x.kind() == Kind::BFloat16
}

/// [`cuda_bf16`] and the fused kernels are loaded on that device.
pub(crate) fn fused_kernels(x: &Tensor) -> bool {
    match x.device() {
        Device::Cuda(i) => cuda_bf16(x) && crate::aten::fused_kernels_available(i),
        _ => false,
    }
}

/// Writes one stream's normed, rotated q/k and v at rows `row_offset..` of the joint buffers
/// (the fused kernel, [`crate::aten::qkv_norm_rope`]); `pe` covers the buffers' rows.
pub(crate) fn fused_qkv(
    qkv: &Tensor,
    norm: &QkNorm,
    pe: &Rope,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    row_offset: i64,
) -> Res<()> {
    crate::aten::qkv_norm_rope(
        qkv,
        &norm.query_norm.scale,
        &norm.key_norm.scale,
        &pe.freqs,
        q,
        k,
        v,
        row_offset,
        norm.query_norm.eps,
    )
}

/// The joint attention in FP8 ([`JointFp8`]) over `streams` `(qkv, norm, first row)`: every
/// stream's ranges, then its FP8 q/k/v, then cuDNN's FP8 attention. `None` where cuDNN refused it
/// on this device (the caller attends in bf16).
fn fp8_joint_attention(
    streams: &[(&Tensor, &QkNorm, i64)],
    b: i64,
    rows: i64,
    heads: i64,
    pe: &Rope,
) -> Res<Option<Fp8AttnOut>> {
    let Some((first, _, _)) = streams.first() else {
        return Ok(None);
    };
    let j = JointFp8::new(first.device(), b, rows, heads)?;
    for (qkv, norm, _) in streams {
        j.ranges(qkv, &norm.query_norm.scale, &norm.key_norm.scale)?;
    }
    for (qkv, norm, row) in streams {
        j.write(
            qkv,
            &norm.query_norm.scale,
            &norm.key_norm.scale,
            &pe.freqs,
            *row,
            norm.query_norm.eps,
        )?;
    }
    j.attend()
}

/// `GELU_tanh(x W^T + b)`; on CUDA in bf16 as one cuBLASLt matmul with the GELU in its epilogue.
fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, fused: bool) -> Res<Tensor> {
    if !(fused && cuda_bf16(x)) {
        return x.f_linear(weight, Some(bias))?.f_gelu("tanh");
    }
    let size = x.size();
    let (lead, in_dim) = size.split_at(size.len() - 1);
    let out = crate::aten::addmm_gelu(bias, &x.f_reshape([-1, in_dim[0]])?, &weight.f_transpose(0, 1)?)?;
    let mut shape = lead.to_vec();
    shape.push(weight.size()[0]);
    out.f_reshape(shape.as_slice())
}

/// `x' = x + gate * y` and `LN(x') * (1 + scale) + shift`: one kernel with [`Opts::ln`] on CUDA
/// bf16 (which, with `fp8`, writes the LayerNorm's output as FP8 with per-row scales and not in
/// bf16), else [`gated_add`] and [`modulate`].
#[allow(clippy::too_many_arguments)]
fn gated_add_modulate(
    norm: &LayerNorm,
    x: &Tensor,
    gate: &Tensor,
    y: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    opts: Opts,
    fp8: bool,
) -> Res<(Tensor, Act)> {
    if opts.ln && x.dim() == 3 && x.is_contiguous() && norm.weight.is_none() && fused_kernels(x) {
        let x_out = x.f_empty_like()?;
        if fp8 && fp8::fused_producers() {
            let (b, s, _) = x.size3()?;
            let q = Tensor::f_empty(x.size().as_slice(), (Kind::Float8e4m3fn, x.device()))?;
            let qs = Tensor::f_empty([b, s, 1], (Kind::Float, x.device()))?;
            crate::aten::gate_residual_ln(
                x,
                gate,
                y,
                scale,
                shift,
                &x_out,
                crate::aten::LnOut::Fp8 { q: &q, scale: &qs },
                norm.eps,
            )?;
            return Ok((x_out, Act::Fp8(fp8::Fp8Act { q, scale: qs })));
        }
        let h_out = x.f_empty_like()?;
        crate::aten::gate_residual_ln(
            x,
            gate,
            y,
            scale,
            shift,
            &x_out,
            crate::aten::LnOut::Bf16(&h_out),
            norm.eps,
        )?;
        return Ok((x_out, Act::Dense(h_out)));
    }
    let x = gated_add(x, gate, y)?;
    let h = modulate(norm, &x, shift, scale)?;
    Ok((x, Act::Dense(h)))
}

/// RoPE + attention; returns `(b, seq, heads * dim)`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
    let (b, h, s, d) = q.size4()?;
    let out = ctx.attend(q, k, v)?; // (b, heads, seq, d)
    out.f_transpose(1, 2)?.f_reshape([b, s, h * d])
}

/// `Linear(h, 4h) -> GELU(tanh) -> Linear(4h, h)` stored as `.0` / `.2`.
#[derive(Debug)]
pub struct Mlp {
    pub fc0: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub(crate) fn new(p: nn::Path<'_>, h: i64, mlp: i64) -> Res<Self> {
        Ok(Self {
            fc0: Linear::new(&p / "0", h, mlp, true)?,
            fc2: Linear::new(&p / "2", mlp, h, true)?,
        })
    }

    /// On `x` as its producer handed it over; `kind` is the output dtype. FP8 layers: `fc0`'s
    /// bf16 output goes through the GELU into `fc2`'s FP8 input in one pass
    /// ([`fp8::gelu_quantize`]).
    pub(crate) fn forward_act(&self, x: &Act, opts: Opts, kind: Kind) -> Res<Tensor> {
        if self.fc0.is_fp8() {
            let pre = self.fc0.forward_act(x, kind)?; // (b, seq, mlp)
            return if self.fc2.is_fp8() && fp8::fused_producers() {
                self.fc2
                    .forward_act(&Act::Fp8(fp8::gelu_quantize(None, &pre)?), kind)
            } else {
                self.fc2.forward(&pre.f_gelu("tanh")?)
            };
        }
        let x = x.dense(kind)?;
        let h = match &self.fc0.bias {
            Some(b) => linear_gelu(&x, &self.fc0.weight, b, opts.gelu)?,
            None => self.fc0.forward(&x)?.f_gelu("tanh")?,
        };
        self.fc2.forward(&h)
    }
}

/// Double-stream block: separate weights for image and text tokens, joint attention.
#[derive(Debug)]
pub struct DoubleBlock {
    pub img_mod: Modulation,
    pub img_attn: SelfAttention,
    pub img_mlp: Mlp,
    pub txt_mod: Modulation,
    pub txt_attn: SelfAttention,
    pub txt_mlp: Mlp,
    norm: LayerNorm,
    heads: i64,
}

impl DoubleBlock {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let (h, m) = (c.hidden_size, c.mlp_hidden());
        Ok(Self {
            img_mod: Modulation::new(&p / "img_mod", h, 2)?,
            img_attn: SelfAttention::new(&p / "img_attn", c)?,
            img_mlp: Mlp::new(&p / "img_mlp", h, m)?,
            txt_mod: Modulation::new(&p / "txt_mod", h, 2)?,
            txt_attn: SelfAttention::new(&p / "txt_attn", c)?,
            txt_mlp: Mlp::new(&p / "txt_mlp", h, m)?,
            norm: LayerNorm::plain(h, 1e-6),
            heads: c.num_heads,
        })
    }

    /// img `(b, img_seq, h)`, txt `(b, txt_seq, h)`, vec `(b, h)` or this block's slice of the
    /// modulation table `(b, 12h)` (img then txt); `ctx.pe` covers txt then img.
    pub fn forward(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, ctx: Ctx<'_>) -> Res<(Tensor, Tensor)> {
        let (img, txt) = self.forward_chained(
            Hidden::Ready(img.shallow_clone()),
            Hidden::Ready(txt.shallow_clone()),
            vec,
            ctx,
        )?;
        Ok((img.materialize()?, txt.materialize()?))
    }

    /// [`DoubleBlock::forward`] on streams that may still carry the previous block's residual
    /// ([`Hidden`]); returns its own streams the same way.
    pub fn forward_chained(
        &self,
        img: Hidden,
        txt: Hidden,
        vec: &Tensor,
        ctx: Ctx<'_>,
    ) -> Res<(Hidden, Hidden)> {
        let h = self.img_mod.lin.weight.size()[1];
        let (iv, tv) = if vec.size()[1] == 12 * h {
            (vec.f_narrow(1, 0, 6 * h)?, vec.f_narrow(1, 6 * h, 6 * h)?)
        } else {
            (vec.shallow_clone(), vec.shallow_clone())
        };
        let im = self.img_mod.forward(&iv)?; // 6 x (b, 1, h)
        let tm = self.txt_mod.forward(&tv)?;
        let (img, img_in) = img.modulate(&self.norm, &im[0], &im[1], ctx.opts, self.img_attn.qkv.is_fp8())?;
        let (txt, txt_in) = txt.modulate(&self.norm, &tm[0], &tm[1], ctx.opts, self.txt_attn.qkv.is_fp8())?;
        let (img, txt) = (&img, &txt);
        if let Some(out) = self.forward_in_pieces(img, txt, &img_in, &txt_in, (&im, &tm), ctx)? {
            return Ok(out);
        }
        let kind = img.kind();
        let img_qkv = self.img_attn.qkv.forward_act(&img_in, kind)?; // (b, img, 3h)
        let txt_qkv = self.txt_attn.qkv.forward_act(&txt_in, kind)?; // (b, txt, 3h)
        let (b, img_len, _) = img_qkv.size3()?;
        let txt_len = txt.size()[1];
        let rows = txt_len + img_len;
        let fused = ctx.fused_qkv(&img_qkv, self.heads, rows) && ctx.fused_qkv(&txt_qkv, self.heads, rows);
        if fused && self.img_attn.qkv.is_fp8() && ctx.fp8_attention(&img_qkv, rows) {
            let streams = [
                (&txt_qkv, &self.txt_attn.norm, 0),
                (&img_qkv, &self.img_attn.norm, txt_len),
            ];
            if let Some(o) = fp8_joint_attention(&streams, b, rows, self.heads, ctx.pe)? {
                let o = o.act()?; // (b, txt+img, h) e4m3fn, one scale
                let txt_attn = Act::Fp8(o.narrow(1, 0, txt_len)?);
                let img_attn = Act::Fp8(o.narrow(1, txt_len, img_len)?);
                let img = self.stream_out(img, &im, &self.img_attn, &self.img_mlp, &img_attn, ctx.opts)?;
                let txt = self.stream_out(txt, &tm, &self.txt_attn, &self.txt_mlp, &txt_attn, ctx.opts)?;
                return Ok((img, txt));
            }
        }
        let attn = if fused {
            let (q, k, v) = ctx.joint_buffers(&img_qkv, b, rows, self.heads)?; // (b, txt+img, heads, d)
            fused_qkv(&txt_qkv, &self.txt_attn.norm, ctx.pe, (&q, &k, &v), 0)?;
            fused_qkv(&img_qkv, &self.img_attn.norm, ctx.pe, (&q, &k, &v), txt_len)?;
            ctx.attend_bshd(&q, &k, &v)?.f_reshape([b, rows, -1])?
        } else {
            let (iq, ik, iv) = split_qkv(&img_qkv, self.heads, &self.img_attn.norm)?;
            let (tq, tk, tv) = split_qkv(&txt_qkv, self.heads, &self.txt_attn.norm)?;
            let q = Tensor::f_cat(&[tq, iq], 2)?; // (b, heads, txt+img, d)
            let k = Tensor::f_cat(&[tk, ik], 2)?;
            let v = Tensor::f_cat(&[tv, iv], 2)?;
            attention(&q, &k, &v, ctx)? // (b, txt+img, h)
        };
        let txt_attn = Act::Dense(attn.f_narrow(1, 0, txt_len)?);
        let img_attn = Act::Dense(attn.f_narrow(1, txt_len, img_len)?);

        let img = self.stream_out(img, &im, &self.img_attn, &self.img_mlp, &img_attn, ctx.opts)?;
        let txt = self.stream_out(txt, &tm, &self.txt_attn, &self.txt_mlp, &txt_attn, ctx.opts)?;
        Ok((img, txt))
    }

    /// The rest of [`DoubleBlock::forward_chained`] where the attention takes q/k/v in pieces
    /// ([`JointAttention::session`]: pure Ulysses, copy-free layout): the image rows' q/k/v in
    /// [`overlap_chunks`] parts, each projected, normed and rotated and then sent while the next
    /// is computed, then the text rows'; after the attention the text rows come back first and
    /// the text stream's projection and MLP run while the image rows travel. `None` where the
    /// pieces do not apply (the caller takes the one-exchange path).
    #[allow(clippy::too_many_arguments)]
    fn forward_in_pieces(
        &self,
        img: &Tensor,
        txt: &Tensor,
        img_in: &Act,
        txt_in: &Act,
        (im, tm): (&[Tensor], &[Tensor]),
        ctx: Ctx<'_>,
    ) -> Res<Option<(Hidden, Hidden)>> {
        let (b, img_len, h) = img.size3()?;
        let txt_len = txt.size()[1];
        let rows = txt_len + img_len;
        let kind = img.kind();
        if !(ctx.opts.a2a
            && ctx.fused_rows(img, rows)
            && h == self.heads * 128
            && ctx.attn.head_groups(self.heads, b) > 1)
        {
            return Ok(None);
        }
        let (q, k, v) = ctx.joint_buffers(img, b, rows, self.heads)?; // (g, b, rows, heads / g, d)
        let Some(mut s) = ctx.attn.session(&q, &k, &v, ctx.opts.overlap)? else {
            return Ok(None);
        };
        let parts = overlap_chunks().min(img_len.max(1));
        for part in 0..parts {
            let piece = Rows::Img { part, of: parts };
            let (start, len) = s.local_rows(piece); // rows of [txt; img]
            let qkv = self
                .img_attn
                .qkv
                .forward_act(&img_in.narrow(1, start - txt_len, len)?, kind)?; // (b, len, 3h)
            fused_qkv(&qkv, &self.img_attn.norm, ctx.pe, (&q, &k, &v), start)?;
            s.send(piece)?;
        }
        let txt_qkv = self.txt_attn.qkv.forward_act(txt_in, kind)?; // (b, txt, 3h)
        fused_qkv(&txt_qkv, &self.txt_attn.norm, ctx.pe, (&q, &k, &v), 0)?;
        s.send(Rows::Txt)?;
        s.attend()?;
        let all_img = Rows::Img { part: 0, of: 1 };
        s.give_back(Rows::Txt)?;
        s.give_back(all_img)?;
        let txt_attn = Act::Dense(s.take(Rows::Txt)?.f_reshape([b, txt_len, h])?);
        let txt = self.stream_out(txt, tm, &self.txt_attn, &self.txt_mlp, &txt_attn, ctx.opts)?;
        let img_attn = Act::Dense(s.take(all_img)?.f_reshape([b, img_len, h])?);
        let img = self.stream_out(img, im, &self.img_attn, &self.img_mlp, &img_attn, ctx.opts)?;
        Ok(Some((img, txt)))
    }

    /// One stream after the joint attention: `x += gate1 * proj(attn)`, then
    /// `x += gate2 * mlp(modulate(x))`; `m` is the stream's 6 modulation chunks.
    fn stream_out(
        &self,
        x: &Tensor,
        m: &[Tensor],
        attn: &SelfAttention,
        mlp: &Mlp,
        attn_out: &Act,
        opts: Opts,
    ) -> Res<Hidden> {
        let (x, x_mod) = gated_add_modulate(
            &self.norm,
            x,
            &m[2],
            &attn.proj.forward_act(attn_out, x.kind())?,
            &m[3],
            &m[4],
            opts,
            mlp.fc0.is_fp8(),
        )?;
        let y = mlp.forward_act(&x_mod, opts, x.kind())?;
        Hidden::close(x, &m[5], y, opts)
    }
}

/// Single-stream block over the joint sequence; `linear1` = fused qkv + mlp-in,
/// `linear2` = fused attn-out + mlp-out.
#[derive(Debug)]
pub struct SingleBlock {
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm: QkNorm,
    pub modulation: Modulation,
    pub(crate) pre_norm: LayerNorm,
    heads: i64,
    hidden: i64,
    mlp_hidden: i64,
}

impl SingleBlock {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let (h, m) = (c.hidden_size, c.mlp_hidden());
        Ok(Self {
            linear1: Linear::new(&p / "linear1", h, 3 * h + m, true)?,
            linear2: Linear::new(&p / "linear2", h + m, h, true)?,
            norm: QkNorm::new(&p / "norm", c.head_dim())?,
            modulation: Modulation::new(&p / "modulation", h, 1)?,
            pre_norm: LayerNorm::plain(h, 1e-6),
            heads: c.num_heads,
            hidden: h,
            mlp_hidden: m,
        })
    }

    /// x `(b, txt+img, h)`.
    pub fn forward(&self, x: &Tensor, vec: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        self.forward_chained(Hidden::Ready(x.shallow_clone()), vec, ctx)?
            .materialize()
    }

    /// [`SingleBlock::forward`] on a stream that may still carry the previous block's residual
    /// ([`Hidden`]); returns its own the same way.
    pub fn forward_chained(&self, x: Hidden, vec: &Tensor, ctx: Ctx<'_>) -> Res<Hidden> {
        let m = self.modulation.forward(vec)?; // 3 x (b, 1, h)
        let fp8 = self.linear1.is_fp8();
        let (x, x_mod) = x.modulate(&self.pre_norm, &m[0], &m[1], ctx.opts, fp8)?;
        let kind = x.kind();
        if ctx.opts.split && cuda_bf16(&x) && !fp8 {
            let out = self.halves_out(&x, &x_mod.dense(kind)?, ctx)?;
            return Hidden::close(x, &m[2], out, ctx.opts);
        }
        let x = &x;
        let fused = self.linear1.forward_act(&x_mod, kind)?; // (b, seq, 3h + mlp)
        let mlp = fused.f_narrow(-1, 3 * self.hidden, self.mlp_hidden)?;
        let (b, s, _) = fused.size3()?;
        if fp8
            && self.linear2.is_fp8()
            && fp8::fused_producers()
            && ctx.fused_qkv(&fused, self.heads, s)
            && ctx.fp8_attention(&fused, s)
            && let Some(o) = fp8_joint_attention(&[(&fused, &self.norm, 0)], b, s, self.heads, ctx.pe)?
        {
            // linear2's FP8 input [attention | GELU(mlp)] from the FP8 attention output.
            let q = fp8::gelu_quantize_a8(&o.o, &o.descale, &mlp)?;
            let out = self.linear2.forward_act(&Act::Fp8(q), kind)?;
            return Hidden::close(x.shallow_clone(), &m[2], out, ctx.opts);
        }
        let o = self.attend_qkv(&fused, ctx)?; // (b, seq, heads, d)
        let (b, s, heads, d) = o.size4()?;
        if self.linear2.is_fp8() && fp8::fused_producers() {
            // linear2's FP8 input [attention | GELU(mlp)] in one pass, one scale per token.
            let o = o.f_reshape([b, s, heads * d])?;
            let o = if o.stride()[2] == 1 { o } else { o.f_contiguous()? };
            let q = fp8::gelu_quantize(Some(&o), &mlp)?;
            let out = self.linear2.forward_act(&Act::Fp8(q), kind)?;
            return Hidden::close(x.shallow_clone(), &m[2], out, ctx.opts);
        }
        let hidden = if ctx.opts.cat {
            // linear2's input (b, seq, h + mlp), written in place: attention output, GELU(mlp).
            let buf = Tensor::f_empty([b, s, self.hidden + self.mlp_hidden], (x.kind(), x.device()))?;
            let mut dst = buf.f_narrow(-1, 0, self.hidden)?.f_view([b, s, heads, d])?;
            dst.f_copy_(&o)?;
            let _ = mlp.f_gelu_out(&buf.f_narrow(-1, self.hidden, self.mlp_hidden)?, "tanh")?;
            buf
        } else {
            Tensor::f_cat(&[o.f_reshape([b, s, heads * d])?, mlp.f_gelu("tanh")?], -1)?
        };
        let out = self.linear2.forward(&hidden)?;
        Hidden::close(x.shallow_clone(), &m[2], out, ctx.opts)
    }

    /// The joint attention of the block's tokens from their projection `qkv` `(b, seq, >= 3h)`
    /// (q|k|v first, as `linear1` lays them out): the fused kernel where it applies, else split,
    /// norm and RoPE. Returns `(b, seq, heads, d)` (a transposed view on the split path).
    fn attend_qkv(&self, qkv: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        let (b, s, _) = qkv.size3()?;
        if ctx.fused_qkv(qkv, self.heads, s) {
            let (q, k, v) = ctx.joint_buffers(qkv, b, s, self.heads)?; // (b, seq, heads, d)
            fused_qkv(qkv, &self.norm, ctx.pe, (&q, &k, &v), 0)?;
            return ctx.attend_bshd(&q, &k, &v);
        }
        let (q, k, v) = split_qkv(&qkv.f_narrow(-1, 0, 3 * self.hidden)?, self.heads, &self.norm)?;
        ctx.attend(&q, &k, &v)?.f_transpose(1, 2)
    }

    /// [`SingleBlock::attend_qkv`] with `during`'s work interleaved (see
    /// [`Ctx::attend_bshd_with`]).
    fn attend_qkv_with(
        &self,
        qkv: &Tensor,
        ctx: Ctx<'_>,
        during: &mut dyn FnMut(Overlap) -> Res<()>,
    ) -> Res<Tensor> {
        let (b, s, _) = qkv.size3()?;
        if ctx.fused_qkv(qkv, self.heads, s) {
            let (q, k, v) = ctx.joint_buffers(qkv, b, s, self.heads)?; // (b, seq, heads, d) or grouped
            fused_qkv(qkv, &self.norm, ctx.pe, (&q, &k, &v), 0)?;
            return ctx.attend_bshd_with(&q, &k, &v, during);
        }
        around(during, || self.attend_qkv(qkv, ctx))
    }

    /// [`SingleBlock::forward`] with `linear1` / `linear2` run as their attention and MLP halves
    /// (CUDA bf16, [`Opts::split`]): `qkv = x W1[:3h]`, `g = GELU(x W1[3h:])` (one cuBLASLt matmul
    /// with [`Opts::gelu`]),
    /// `out = g W2[:, h:]^T + b2 + attn W2[:, :h]^T` accumulated in place, so neither the GELU
    /// pass nor the concatenated `(seq, h + mlp)` activation is needed. The two MLP matmuls do
    /// not depend on the attention: they run while its exchanges are in flight
    /// ([`Opts::overlap`], [`SingleBlock::attend_qkv_with`]).
    #[cfg(test)]
    pub(crate) fn forward_halves(
        &self,
        x: &Tensor,
        x_mod: &Tensor,
        gate: &Tensor,
        ctx: Ctx<'_>,
    ) -> Res<Tensor> {
        gated_add(x, gate, &self.halves_out(x, x_mod, ctx)?)
    }

    /// The block's output before its gated residual (`out` of [`SingleBlock::forward_halves`]).
    fn halves_out(&self, x: &Tensor, x_mod: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        let (h, mh) = (self.hidden, self.mlp_hidden);
        let (w1, w2) = (&self.linear1.weight, &self.linear2.weight); // (3h + mlp, h), (h, h + mlp)
        let b1 = self
            .linear1
            .bias
            .as_ref()
            .ok_or_else(|| tch::TchError::Torch("single block linear1 has no bias".into()))?;
        let qkv = x_mod.f_linear(&w1.f_narrow(0, 0, 3 * h)?, Some(&b1.f_narrow(0, 0, 3 * h)?))?; // (b, seq, 3h)
        let (b, s, _) = x.size3()?;
        let (mut g, mut out) = (None, None);
        let mut mlp = |phase: Overlap| -> Res<()> {
            match phase {
                Overlap::Inbound => {
                    g = Some(linear_gelu(
                        x_mod,
                        &w1.f_narrow(0, 3 * h, mh)?,
                        &b1.f_narrow(0, 3 * h, mh)?,
                        ctx.opts.gelu,
                    )?); // (b, seq, mlp)
                }
                Overlap::Outbound => {
                    let g = g
                        .as_ref()
                        .ok_or_else(|| tch::TchError::Torch("MLP-out before MLP-in".into()))?;
                    out = Some(g.f_linear(&w2.f_narrow(1, h, mh)?, self.linear2.bias.as_ref())?); // (b, seq, h)
                }
            }
            Ok(())
        };
        let attn = self.attend_qkv_with(&qkv, ctx, &mut mlp)?.f_reshape([b * s, h])?; // (b * seq, h)
        let out = out.ok_or_else(|| tch::TchError::Torch("attention skipped the MLP-out matmul".into()))?;
        let _ = out
            .f_view([b * s, h])?
            .f_addmm_(&attn, &w2.f_narrow(1, 0, h)?.f_transpose(0, 1)?)?;
        Ok(out)
    }
}

/// `adaLN_modulation.1` (shift, scale) then `linear` back to packed latent channels.
#[derive(Debug)]
pub struct LastLayer {
    pub linear: Linear,
    pub ada_ln_modulation: Linear,
    norm: LayerNorm,
}

impl LastLayer {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let h = c.hidden_size;
        Ok(Self {
            linear: Linear::new(&p / "linear", h, c.in_channels, true)?,
            ada_ln_modulation: Linear::new(&p / "adaLN_modulation" / "1", h, 2 * h, true)?,
            norm: LayerNorm::plain(h, 1e-6),
        })
    }

    /// x `(b, img_seq, h)` -> `(b, img_seq, in_channels)`.
    pub fn forward(&self, x: &Tensor, vec: &Tensor) -> Res<Tensor> {
        let m = precomputed(&self.ada_ln_modulation, vec)?
            .f_unsqueeze(1)?
            .f_chunk(2, -1)?;
        self.linear.forward(&modulate(&self.norm, x, &m[0], &m[1])?)
    }
}
