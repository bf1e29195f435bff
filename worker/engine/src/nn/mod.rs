//! Layers shared by every model family (Flux, SDXL): linear, norms, convolution, embedding,
//! attention. Every op is a fallible `f_` call so device errors (out of memory in particular)
//! surface as errors instead of panics. [`attention`] and [`spatial`] are the seams through which
//! a model's token attention and image-space operations can be split over GPUs.

pub mod attention;
pub mod fp8;
pub mod fp8_attention;
pub mod spatial;
pub mod tokenizer;
pub mod weights;

use tch::{Kind, TchError, Tensor, nn};

pub type Res<T> = Result<T, TchError>;

thread_local! {
    static NO_RANDOM_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static DEFER_LINEAR_WEIGHTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, [`Linear`] layers built on this thread get a weight that holds no memory: one
/// zero expanded to `(out, in)` (strides 0). For a load that replaces most weights with other
/// tensors (a pre-quantised checkpoint's FP8 block projections): the model is never built at its
/// full bf16 size. [`materialize_deferred`] then gives every weight still deferred its own zeros
/// before the rest of the checkpoint is copied in.
pub struct DeferLinearWeights {
    _flag: FlagGuard,
}

impl DeferLinearWeights {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self {
            _flag: FlagGuard::set(&DEFER_LINEAR_WEIGHTS),
        }
    }
}

/// Sets a thread-local flag while alive; restores what it was on drop (guards nest).
struct FlagGuard {
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    was: bool,
}

impl FlagGuard {
    fn set(flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>) -> Self {
        Self {
            flag,
            was: flag.with(|c| c.replace(true)),
        }
    }
}

impl Drop for FlagGuard {
    fn drop(&mut self) {
        self.flag.with(|c| c.set(self.was));
    }
}

/// Whether `t` is a weight built under [`DeferLinearWeights`] and not materialised yet.
pub fn is_deferred(t: &Tensor) -> bool {
    t.numel() > 1 && t.stride().contains(&0)
}

/// Gives every deferred variable of `vs` ([`DeferLinearWeights`]) zeros of its own, in place:
/// every handle to it (the layer's field, the store's entry) sees the new memory. Returns how
/// many it materialised.
pub fn materialize_deferred(vs: &nn::VarStore) -> Res<usize> {
    let mut n = 0;
    for (_, t) in vs.variables() {
        if is_deferred(&t) {
            let mut t = t.shallow_clone();
            let zeros = Tensor::f_zeros(t.size(), (t.kind(), t.device()))?;
            t.f_set_data(&zeros)?;
            n += 1;
        }
    }
    Ok(n)
}

/// While alive, models built on this thread get zero-initialised weights instead of random ones
/// (used before a strict load overwrites every variable: faster, and it leaves libtorch's global
/// RNG untouched, which seeded noise in other threads relies on).
pub struct NoRandomInit {
    _flag: FlagGuard,
}

impl NoRandomInit {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self {
            _flag: FlagGuard::set(&NO_RANDOM_INIT),
        }
    }
}

fn random_or_zero(init: nn::Init) -> nn::Init {
    if NO_RANDOM_INIT.with(|c| c.get()) {
        nn::Init::Const(0.0)
    } else {
        init
    }
}

fn uniform(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    random_or_zero(nn::Init::Uniform {
        lo: -bound,
        up: bound,
    })
}

/// `y = x W^T + b`; weight `(out, in)`. With [`Linear::fp8`] the layer computes in FP8
/// ([`fp8::Fp8Linear`]) and `weight` is its e4m3fn weight (the bf16 one is gone).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub fp8: Option<fp8::Fp8Linear>,
}

impl Linear {
    pub fn new(p: nn::Path<'_>, in_dim: i64, out_dim: i64, bias: bool) -> Res<Self> {
        let weight = if DEFER_LINEAR_WEIGHTS.with(|c| c.get()) {
            let one = Tensor::f_zeros([1, 1], (p.kind(), p.device()))?;
            p.add("weight", one.f_expand([out_dim, in_dim], false)?, true)
        } else {
            p.f_var("weight", &[out_dim, in_dim], uniform(in_dim))?
        };
        let bias = if bias {
            Some(p.f_var("bias", &[out_dim], uniform(in_dim))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            fp8: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        match &self.fp8 {
            Some(f) => f.forward(x),
            None => x.f_linear(&self.weight, self.bias.as_ref()),
        }
    }

    /// The layer on `x` as its producer handed it over (an FP8 activation goes straight to the
    /// FP8 GEMM; `kind` is the output dtype then).
    pub fn forward_act(&self, x: &fp8::Act, kind: Kind) -> Res<Tensor> {
        match (x, &self.fp8) {
            (fp8::Act::Dense(t), _) => self.forward(t),
            (fp8::Act::Fp8(a), Some(f)) => f.forward_q(a, kind),
            (fp8::Act::Fp8(_), None) => self.forward(&x.dense(kind)?),
        }
    }

    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// Makes this an FP8 layer: `f`'s weight replaces the bf16 one (whose memory goes with the
    /// last handle to it: the caller drops the variable store's).
    pub fn set_fp8(&mut self, f: fp8::Fp8Linear) {
        self.weight = f.weight.shallow_clone();
        self.bias = f.bias.as_ref().map(|b| b.shallow_clone());
        self.fp8 = Some(f);
    }
}

/// LayerNorm over the last dim, optionally with an affine `weight`/`bias`.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path<'_>, dim: i64, eps: f64) -> Res<Self> {
        let weight = Some(p.f_var("weight", &[dim], nn::Init::Const(1.0))?);
        let bias = Some(p.f_var("bias", &[dim], nn::Init::Const(0.0))?);
        Ok(Self {
            weight,
            bias,
            dim,
            eps,
        })
    }

    /// Without learned parameters (Flux's modulated norms).
    pub fn plain(dim: i64, eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        x.f_layer_norm(
            [self.dim],
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            true,
        )
    }
}

/// RMS norm with a learned scale, computed in fp32 (`x * rsqrt(mean(x^2) + eps) * scale`).
#[derive(Debug)]
pub struct RmsNorm {
    pub scale: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// `name` is the parameter name (`scale` in the original Flux layout, `weight` in T5).
    pub fn new(p: nn::Path<'_>, name: &str, dim: i64, eps: f64) -> Res<Self> {
        Ok(Self {
            scale: p.f_var(name, &[dim], nn::Init::Const(1.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = xf.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        normed.f_to_kind(kind)?.f_mul(&self.scale)
    }
}

/// 2-D convolution with bias.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub padding: i64,
    pub stride: i64,
}

impl Conv2d {
    pub fn new(p: nn::Path<'_>, in_ch: i64, out_ch: i64, k: i64) -> Res<Self> {
        let fan_in = in_ch * k * k;
        let weight = p.f_var("weight", &[out_ch, in_ch, k, k], uniform(fan_in))?;
        let bias = p.f_var("bias", &[out_ch], uniform(fan_in))?;
        Ok(Self {
            weight,
            bias,
            padding: k / 2,
            stride: 1,
        })
    }

    /// The same convolution with another stride (the UNet's downsamplers: 3x3, stride 2,
    /// padding 1).
    pub fn with_stride(self, stride: i64) -> Self {
        Self { stride, ..self }
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        x.f_conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// GroupNorm with affine parameters.
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(p: nn::Path<'_>, groups: i64, channels: i64, eps: f64) -> Res<Self> {
        let weight = p.f_var("weight", &[channels], nn::Init::Const(1.0))?;
        let bias = p.f_var("bias", &[channels], nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        x.f_group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Token embedding table `(vocab, dim)`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: nn::Path<'_>, vocab: i64, dim: i64) -> Res<Self> {
        Ok(Self {
            weight: p.f_var(
                "weight",
                &[vocab, dim],
                random_or_zero(nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                }),
            )?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Res<Tensor> {
        Tensor::f_embedding(&self.weight, ids, -1, false, false)
    }
}

/// Scaled dot-product attention on `(b, heads, seq, dim)` tensors (flash/efficient kernels where
/// the device has them).
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: Option<f64>,
) -> Res<Tensor> {
    Tensor::f_scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, false)
}
