//! The transformer's conditioning: the timestep's sinusoidal embedding, RoPE over the joint
//! token positions, the MLP embedders and the adaLN modulation layers.

use tch::{Kind, Tensor, nn};

use super::layers::{Linear, Res};
use super::transformer::Opts;

/// Sinusoidal embedding `(b, dim)` of `t` `(b,)`: `[cos(t f), sin(t f)]`, `f_i = 10000^(-i/half)`.
/// The caller applies the x1000 time factor (as the references do).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Res<Tensor> {
    let half = dim / 2;
    let freqs = Tensor::f_arange(half, (Kind::Float, t.device()))?
        .f_mul_scalar(-(10_000f64.ln()))?
        .f_div_scalar(half as f64)?
        .f_exp()?;
    let args = t
        .f_to_kind(Kind::Float)?
        .f_unsqueeze(1)?
        .f_mul(&freqs.f_unsqueeze(0)?)?; // (b, half)
    Tensor::f_cat(&[args.f_cos()?, args.f_sin()?], -1)
}

/// RoPE tables for one token layout: `cos`/`sin` `(1, 1, seq, head_dim)`, fp32, each frequency
/// repeated for its (even, odd) pair; `freqs` = `cos + i sin` per pair, `(1, 1, seq, head_dim/2)`
/// complex64.
#[derive(Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub freqs: Tensor,
}

impl Rope {
    /// Another handle on the same tables (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            freqs: self.freqs.shallow_clone(),
        }
    }

    /// `ids`: `(seq, n_axes)` positions (text: zeros; image: (0, row, col)).
    pub fn new(ids: &Tensor, axes_dim: &[i64], theta: f64) -> Res<Self> {
        let ids = ids.f_to_kind(Kind::Float)?; // f64 would match the references' fp64 on CPU only
        let mut angles = Vec::with_capacity(axes_dim.len());
        for (i, &d) in axes_dim.iter().enumerate() {
            let scale =
                Tensor::f_arange_start_step(0, d, 2, (Kind::Double, ids.device()))?.f_div_scalar(d as f64)?;
            let omega = scale.f_mul_scalar(theta.ln())?.f_exp()?.f_reciprocal()?; // (d/2,)
            let pos = ids.f_select(1, i as i64)?.f_to_kind(Kind::Double)?; // (seq,)
            angles.push(pos.f_unsqueeze(1)?.f_mul(&omega.f_unsqueeze(0)?)?); // (seq, d/2)
        }
        let ang = Tensor::f_cat(&angles, 1)?; // (seq, head_dim/2)
        let rep = |t: Tensor| -> Res<Tensor> {
            let (s, h) = t.size2()?;
            t.f_unsqueeze(-1)?
                .f_expand([s, h, 2], false)?
                .f_reshape([1, 1, s, h * 2])?
                .f_to_kind(Kind::Float)
        };
        let (s, half) = ang.size2()?;
        let freqs = Tensor::f_complex(
            &ang.f_cos()?.f_to_kind(Kind::Float)?,
            &ang.f_sin()?.f_to_kind(Kind::Float)?,
        )?
        .f_reshape([1, 1, s, half])?;
        Ok(Self {
            cos: rep(ang.f_cos()?)?,
            sin: rep(ang.f_sin()?)?,
            freqs,
        })
    }

    /// Rotates interleaved pairs of `x` `(b, heads, seq, head_dim)` in fp32, returns `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Res<Tensor> {
        if Opts::get().rope {
            self.apply_complex(x)
        } else {
            self.apply_reference(x)
        }
    }

    /// [`Rope::apply`] as one complex multiply of (even, odd) pairs (fp32): 3 passes.
    pub fn apply_complex(&self, x: &Tensor) -> Res<Tensor> {
        let kind = x.kind();
        let (b, h, s, d) = x.size4()?;
        x.f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_view([b, h, s, d / 2, 2])?
            .f_view_as_complex()?
            .f_mul(&self.freqs)?
            .f_view_as_real()?
            .f_reshape([b, h, s, d])?
            .f_to_kind(kind)
    }

    /// [`Rope::apply`] as diffusers' eager ops do it (`x * cos + rotate(x) * sin`).
    pub fn apply_reference(&self, x: &Tensor) -> Res<Tensor> {
        let kind = x.kind();
        let (b, h, s, d) = x.size4()?;
        let xf = x.f_to_kind(Kind::Float)?;
        let pairs = xf.f_reshape([b, h, s, d / 2, 2])?;
        let x0 = pairs.f_select(-1, 0)?;
        let x1 = pairs.f_select(-1, 1)?;
        let rot = Tensor::f_stack(&[x1.f_neg()?, x0], -1)?.f_reshape([b, h, s, d])?; // (-x1, x0)
        xf.f_mul(&self.cos)?
            .f_add(&rot.f_mul(&self.sin)?)?
            .f_to_kind(kind)
    }
}

/// `in_layer -> SiLU -> out_layer`.
#[derive(Debug)]
pub struct MlpEmbedder {
    pub in_layer: Linear,
    pub out_layer: Linear,
}

impl MlpEmbedder {
    pub(crate) fn new(p: nn::Path<'_>, in_dim: i64, hidden: i64) -> Res<Self> {
        Ok(Self {
            in_layer: Linear::new(&p / "in_layer", in_dim, hidden, true)?,
            out_layer: Linear::new(&p / "out_layer", hidden, hidden, true)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Res<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.f_silu()?)
    }
}

/// `lin(SiLU(vec))` chunked into (shift, scale, gate) x `n`; each `(b, 1, hidden)`.
#[derive(Debug)]
pub struct Modulation {
    pub lin: Linear,
    pub n: i64,
}

impl Modulation {
    pub(crate) fn new(p: nn::Path<'_>, hidden: i64, n_sets: i64) -> Res<Self> {
        Ok(Self {
            lin: Linear::new(&p / "lin", hidden, 3 * n_sets * hidden, true)?,
            n: 3 * n_sets,
        })
    }

    /// `vec`: the conditioning vector `(b, h)`, or this layer's precomputed output `(b, n * h)`
    /// (a slice of [`Flux::modulation_table`]). Returns `n` chunks `(b, 1, h)`.
    pub(crate) fn forward(&self, vec: &Tensor) -> Res<Vec<Tensor>> {
        precomputed(&self.lin, vec)?.f_unsqueeze(1)?.f_chunk(self.n, -1)
    }
}

/// `lin(SiLU(vec))` for a conditioning vector `(b, in)`, or `vec` itself when it already is that
/// output `(b, out)` (a slice of [`Flux::modulation_table`]).
pub(crate) fn precomputed(lin: &Linear, vec: &Tensor) -> Res<Tensor> {
    let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
    match vec.size().last().copied() {
        Some(w) if w == inp => lin.forward(&vec.f_silu()?),
        Some(w) if w == out => Ok(vec.shallow_clone()),
        w => Err(tch::TchError::Shape(format!(
            "modulation input of width {w:?}: expected the conditioning vector ({inp}) or the \
             precomputed modulation ({out})"
        ))),
    }
}
