//! The Flux.1 rectified-flow transformer (MMDiT: double-stream then single-stream blocks).
//!
//! Variables are named as in the original single-file checkpoint (`flux1-dev.safetensors`):
//! `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ... Attention projections are
//! FUSED (one qkv matmul per stream; single blocks' `linear1` = qkv + mlp-in). The diffusers layout
//! (`transformer/`, split `to_q`/`to_k`/`to_v`) is mapped onto these names at load time, see
//! [`super::transformer_keys::diffusers_source`].
//!
//! This file holds the [`Config`], the [`Opts`] formulations and the [`Flux`] model; its parts are
//! in [`super::embed`] (timestep, RoPE, modulation), [`super::blocks`] (double, single and final
//! blocks) and [`super::joint`] (the joint attention interface the parallel strategies implement),
//! all re-exported here.

use std::path::Path;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor, nn};

pub use super::blocks::*;
pub use super::embed::*;
pub use super::joint::*;
use super::layers::{Linear, Res};
pub use super::part::Part;
use super::transformer_keys::diffusers_source;
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

/// Which fused formulations the transformer's forward uses. All are on by default; each computes
/// the same function as the op-for-op port of diffusers' eager ops (the reference formulation),
/// rounding to bf16 once where the reference rounds twice. `DITFLEET_FLUX_OPT` (read once per
/// process) selects them for benchmarking: `none` = the reference formulation, or a comma list of
/// `rope` (RoPE as one complex multiply instead of ~8 elementwise passes), `rms` (q/k RMSNorm by
/// the fused `_fused_rms_norm` kernel instead of 6 passes in fp32), `mod` (adaLN modulation folded
/// into the LayerNorm's affine for batch 1, `addcmul` otherwise; gated residuals by `addcmul`),
/// `cat` (single blocks write attention output and GELU(mlp) straight into `linear2`'s input
/// instead of concatenating). Measured on H100 and H200: docs/benchmarks-flux-1gpu.md.
///
/// Three more work on CUDA bf16 tensors only (elsewhere the formulations above run): `qkv` (one
/// fused kernel, `csrc/flux_kernels.cu.inc`, from each stream's qkv projection straight to the
/// attention inputs: q/k RMSNorm, RoPE and the (b, seq, heads, 128) joint layout in one pass, in
/// place of the split, norm, RoPE and concatenation passes), `ln` (the gated residual and the next
/// modulated LayerNorm of a double block in one kernel), `gelu` (the MLP-in matmuls with the tanh
/// GELU in cuBLASLt's epilogue), `split` (single blocks run `linear1` / `linear2` as their qkv and
/// MLP halves, so the GELU can sit in the epilogue and no concatenated activation is written),
/// `a2a` (with `qkv`, under a pure Ulysses plan: the kernel writes q/k/v in the head groups the
/// all-to-all sends, the received chunks land where attention reads them and its output goes back
/// the same way: no stack, split, cat or re-layout copies around the two all-to-alls;
/// `parallel::attention`), `overlap` (with `a2a` and `split`: each single block's MLP-in matmul
/// runs while its q/k/v all-to-all is in flight and its MLP-out matmul while the attention
/// output travels back; [`JointAttention::attend_grouped_with`]), `chain` (with `ln`: each block's
/// closing gated residual `x + gate * y` is added by the next block's first kernel, which also
/// computes its modulated LayerNorm; [`Hidden`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opts {
    pub rope: bool,
    pub rms: bool,
    pub modulation: bool,
    pub cat: bool,
    pub qkv: bool,
    pub ln: bool,
    pub gelu: bool,
    pub split: bool,
    pub a2a: bool,
    pub overlap: bool,
    pub chain: bool,
}

impl Opts {
    pub const ALL: Opts = Opts {
        rope: true,
        rms: true,
        modulation: true,
        cat: true,
        qkv: true,
        ln: true,
        gelu: true,
        split: true,
        a2a: true,
        overlap: true,
        chain: true,
    };
    pub const NONE: Opts = Opts {
        rope: false,
        rms: false,
        modulation: false,
        cat: false,
        qkv: false,
        ln: false,
        gelu: false,
        split: false,
        a2a: false,
        overlap: false,
        chain: false,
    };

    /// Parses `DITFLEET_FLUX_OPT`'s value (see [`Opts`]; `all` in a list = the defaults plus the
    /// others named, `-name` turns one off, e.g. `all,-gelu`); unknown names are ignored.
    pub fn parse(v: &str) -> Opts {
        let v = v.trim();
        if v.is_empty() || v == "all" {
            return Opts::ALL;
        }
        let has = |n: &str| v.split(',').any(|x| x.trim() == n);
        let base = if has("all") { Opts::ALL } else { Opts::NONE };
        let off = |n: &str| v.split(',').any(|x| x.trim() == format!("-{n}"));
        Opts {
            rope: (base.rope || has("rope")) && !off("rope"),
            rms: (base.rms || has("rms")) && !off("rms"),
            modulation: (base.modulation || has("mod")) && !off("mod"),
            cat: (base.cat || has("cat")) && !off("cat"),
            qkv: (base.qkv || has("qkv")) && !off("qkv"),
            ln: (base.ln || has("ln")) && !off("ln"),
            gelu: (base.gelu || has("gelu")) && !off("gelu"),
            split: (base.split || has("split")) && !off("split"),
            a2a: (base.a2a || has("a2a")) && !off("a2a"),
            overlap: (base.overlap || has("overlap")) && !off("overlap"),
            chain: (base.chain || has("chain")) && !off("chain"),
        }
    }

    /// The process-wide formulations: all of them, or what the benchmark switch
    /// `DITFLEET_FLUX_OPT` ([`crate::settings::bench`]) selects.
    pub fn get() -> Opts {
        static O: OnceLock<Opts> = OnceLock::new();
        *O.get_or_init(|| Opts::parse(&crate::settings::bench().flux_opt))
    }
}

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Packed latent channels (16 latent channels x 2x2 patch).
    pub in_channels: i64,
    /// Pooled text embedding width (CLIP-L: 768).
    pub vec_in_dim: i64,
    /// Text token width (T5-XXL: 4096).
    pub context_in_dim: i64,
    pub hidden_size: i64,
    pub mlp_ratio: f64,
    pub num_heads: i64,
    pub depth: i64,
    pub depth_single_blocks: i64,
    /// RoPE dims per position axis (text index, row, column); sums to the head dim.
    pub axes_dim: Vec<i64>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl Config {
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// A tiny config with the Flux architecture (for CPU smoke tests and the fleet demo).
    pub fn tiny() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 32,
            context_in_dim: 32,
            hidden_size: 64,
            mlp_ratio: 4.0,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 2,
            axes_dim: vec![8, 12, 12],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// From a diffusers `transformer/config.json` (`FluxTransformer2DModel`).
    pub fn from_diffusers_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let heads = i("num_attention_heads")?;
        let axes = v
            .get("axes_dims_rope")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect::<Vec<_>>())
            .unwrap_or_else(|| vec![16, 56, 56]);
        Ok(Self {
            in_channels: i("in_channels")?,
            vec_in_dim: i("pooled_projection_dim")?,
            context_in_dim: i("joint_attention_dim")?,
            hidden_size: heads * i("attention_head_dim")?,
            mlp_ratio: 4.0,
            num_heads: heads,
            depth: i("num_layers")?,
            depth_single_blocks: i("num_single_layers")?,
            axes_dim: axes,
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: v
                .get("guidance_embeds")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
        })
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }
}

/// [`Flux::modulation_table`] of a run of blocks (and a final layer, if given): `vecs` `(steps,
/// h)` -> `(steps, 12h per double + 3h per single block [+ 2h])`, in that order (the blocks a
/// PipeFusion stage runs take theirs this way too).
pub fn modulation_table_of(
    double: &[DoubleBlock],
    single: &[SingleBlock],
    last: Option<&LastLayer>,
    vecs: &Tensor,
) -> Res<Tensor> {
    let s = vecs.f_silu()?;
    let mut cols = Vec::with_capacity(2 * double.len() + single.len() + 1);
    for b in double {
        cols.push(b.img_mod.lin.forward(&s)?);
        cols.push(b.txt_mod.lin.forward(&s)?);
    }
    for b in single {
        cols.push(b.modulation.lin.forward(&s)?);
    }
    if let Some(f) = last {
        cols.push(f.ada_ln_modulation.forward(&s)?);
    }
    Tensor::f_cat(&cols, 1)
}

/// Each block's conditioning from a forward's `vec`, in block order: the conditioning vector
/// itself (width `h`), or the block's slice of a row of a modulation table.
pub struct Conds<'a> {
    vec: &'a Tensor,
    table: bool,
    off: i64,
}

impl<'a> Conds<'a> {
    pub fn new(vec: &'a Tensor, hidden: i64) -> Self {
        Self {
            vec,
            table: vec.size()[1] != hidden,
            off: 0,
        }
    }

    /// The next block's conditioning: `width` columns of the row (12h double, 3h single, 2h
    /// final layer), or the vector.
    pub fn next(&mut self, width: i64) -> Res<Tensor> {
        if !self.table {
            return Ok(self.vec.shallow_clone());
        }
        self.off += width;
        self.vec.f_narrow(1, self.off - width, width)
    }
}

/// The Flux transformer with its variables in `vs`: all of it, or the part one PipeFusion stage
/// holds (see [`Part`]; `img_in`/`txt_in` on the first stage, `final_layer` on the last).
#[derive(Debug)]
pub struct Flux {
    pub config: Config,
    /// Which blocks `double_blocks` / `single_blocks` are (global indices) and which ends it holds.
    pub part: Part,
    pub img_in: Option<Linear>,
    pub txt_in: Option<Linear>,
    pub time_in: MlpEmbedder,
    pub vector_in: MlpEmbedder,
    pub guidance_in: Option<MlpEmbedder>,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    pub final_layer: Option<LastLayer>,
    pub vs: nn::VarStore,
}

impl Flux {
    /// Builds the model with randomly initialised weights on `device` in `kind`.
    pub fn new(config: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        Self::new_part(config, device, kind, &Part::full(config))
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.time_in.in_layer.weight.kind()
    }

    /// Builds the model and strictly loads a checkpoint in either layout: a diffusers
    /// `transformer/` folder (single or sharded) or an original single file.
    /// A single file that holds FP8 block weights is a pre-quantised checkpoint
    /// ([`super::fp8`]): the model comes back with FP8 blocks.
    /// A pre-quantised one is built with deferred linear weights
    /// ([`crate::nn::DeferLinearWeights`]), so its load never holds the bf16 block projections.
    pub fn load(config: &Config, path: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        if path.is_file() {
            let ck = Checkpoint::open_file(path)?;
            if Self::is_fp8_checkpoint(&ck) {
                let mut model = {
                    let _zero = super::layers::NoRandomInit::new();
                    let _defer = crate::nn::DeferLinearWeights::new();
                    Self::new(config, device, kind)?
                };
                model.load_fp8_checkpoint(&ck)?;
                return Ok(model);
            }
        }
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(config, device, kind)?
        };
        model.load_weights(path)?;
        Ok(model)
    }

    /// Loads weights from `path` (see [`Flux::load`]) into this model.
    pub fn load_weights(&self, path: &Path) -> Result<(), EngineError> {
        if path.is_dir() {
            let ck = Checkpoint::open_dir(path, "diffusion_pytorch_model")?;
            load_strict(
                &self.vs,
                &ck,
                "flux transformer (diffusers layout)",
                &diffusers_source,
                &|_| false,
            )
        } else {
            let ck = Checkpoint::open_file(path)?;
            load_strict(
                &self.vs,
                &ck,
                "flux transformer (original layout)",
                &|n| Source::Key(n.to_string()),
                &|_| false,
            )
        }
    }

    /// Position ids: text `(txt_len, 3)` zeros then image `(h/2 * w/2, 3)` = (0, row, col).
    pub fn position_ids(txt_len: i64, latent_h: i64, latent_w: i64, device: Device) -> Res<Tensor> {
        let (ph, pw) = (latent_h / 2, latent_w / 2);
        let rows = Tensor::f_arange(ph, (Kind::Float, device))?
            .f_unsqueeze(1)?
            .f_expand([ph, pw], false)?;
        let cols = Tensor::f_arange(pw, (Kind::Float, device))?
            .f_unsqueeze(0)?
            .f_expand([ph, pw], false)?;
        let zeros = Tensor::f_zeros([ph, pw], (Kind::Float, device))?;
        let img = Tensor::f_stack(&[zeros, rows, cols], -1)?.f_reshape([ph * pw, 3])?;
        let txt = Tensor::f_zeros([txt_len, 3], (Kind::Float, device))?;
        Tensor::f_cat(&[txt, img], 0)
    }

    /// RoPE tables for `ids` (see [`Flux::position_ids`]); compute once per generation.
    pub fn rope(&self, ids: &Tensor) -> Res<Rope> {
        Rope::new(ids, &self.config.axes_dim, self.config.theta)
    }

    /// Text-side inputs that do not change across steps: `txt_in(txt)`.
    pub fn embed_txt(&self, txt: &Tensor) -> Res<Tensor> {
        self.part.input_layer(&self.txt_in, "txt_in")?.forward(txt)
    }

    /// Conditioning vector `(b, h)` for timesteps `t` and guidance (both as FluxPipeline passes
    /// them: `sigma` and the guidance scale) and pooled CLIP `y`. Like diffusers, `t` and the
    /// guidance are cast to the model dtype BEFORE the x1000 (in bf16, guidance 3.5 becomes 3504).
    pub fn vec(&self, t: &Tensor, y: &Tensor, guidance: Option<&Tensor>) -> Res<Tensor> {
        let kind = self.kind();
        let scaled = |x: &Tensor| x.f_to_kind(kind)?.f_mul_scalar(1000.0);
        let temb = timestep_embedding(&scaled(t)?, 256)?.f_to_kind(kind)?;
        let mut vec = self.time_in.forward(&temb)?;
        if let Some(g_in) = &self.guidance_in {
            let g = match guidance {
                Some(g) => g.shallow_clone(),
                None => Tensor::f_zeros_like(t)?,
            };
            let gemb = timestep_embedding(&scaled(&g)?, 256)?.f_to_kind(kind)?;
            vec = vec.f_add(&g_in.forward(&gemb)?)?;
        }
        vec.f_add(&self.vector_in.forward(&y.f_to_kind(kind)?)?)
    }

    /// One forward pass with precomputed text embedding, vec and RoPE.
    /// img `(b, img_seq, in_channels)`, txt `(b, txt_seq, h)` (already `txt_in`), vec `(b, h)`.
    pub fn forward_prepared(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, pe: &Rope) -> Res<Tensor> {
        self.forward_with(img, txt, vec, pe, &LocalAttention)
    }

    /// [`Flux::forward_prepared`] on the tokens this rank holds (`img` and `txt` may be slices of
    /// the sequence; `pe` covers exactly `txt` then `img`), with `attn` computing the joint
    /// attention over the whole sequence.
    pub fn forward_with(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        attn: &dyn JointAttention,
    ) -> Res<Tensor> {
        self.forward_opts(img, txt, vec, pe, attn, Opts::get())
    }

    /// [`Flux::forward_with`] with the formulations `opts` instead of the process-wide ones (the
    /// fused paths are checked against the reference formulation with it).
    pub fn forward_opts(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        attn: &dyn JointAttention,
        opts: Opts,
    ) -> Res<Tensor> {
        self.part.require_full(&self.config)?;
        let ctx = Ctx { pe, attn, opts };
        let h = self.config.hidden_size;
        // `vec`: the conditioning vector, or a row of the modulation table (each block its slice).
        let table = vec.size()[1] != h;
        if table && vec.size()[1] != self.modulation_width() {
            return Err(tch::TchError::Shape(format!(
                "conditioning of width {}: expected {h} or this model's modulation table ({})",
                vec.size()[1],
                self.modulation_width()
            )));
        }
        let mut conds = Conds::new(vec, h);
        let mut cond = |w: i64| conds.next(w);
        let img = self.part.input_layer(&self.img_in, "img_in")?.forward(img)?; // (b, img_seq, h)
        let (mut img, mut txt) = (Hidden::Ready(img), Hidden::Ready(txt.shallow_clone()));
        for block in &self.double_blocks {
            (img, txt) = block.forward_chained(img, txt, &cond(12 * h)?, ctx)?;
        }
        let (img, txt) = (img.materialize()?, txt.materialize()?);
        let txt_len = txt.size()[1];
        let mut x = Hidden::Ready(Tensor::f_cat(&[txt, img], 1)?); // (b, txt+img, h)
        for block in &self.single_blocks {
            x = block.forward_chained(x, &cond(3 * h)?, ctx)?;
        }
        let x = x.materialize()?;
        let img = x.f_narrow(1, txt_len, x.size()[1] - txt_len)?;
        let last = self
            .final_layer
            .as_ref()
            .ok_or_else(|| self.part.missing("final_layer"))?;
        last.forward(&img, &cond(2 * h)?) // (b, img_seq, in_channels)
    }

    /// Width of one row of [`Flux::modulation_table`]: 12h per double block, 3h per single
    /// block, 2h for the final layer (of the blocks this part holds).
    pub fn modulation_width(&self) -> i64 {
        let h = self.config.hidden_size;
        12 * h * self.double_blocks.len() as i64
            + 3 * h * self.single_blocks.len() as i64
            + if self.final_layer.is_some() { 2 * h } else { 0 }
    }

    /// Every block's adaLN modulation for every step at once: `vecs` `(steps, h)` ->
    /// `(steps, modulation_width)` (double blocks' img then txt, single blocks, final layer).
    /// A row passed as `vec` to the forward replaces 77 matrix-vector products per step (they
    /// read 6.5 GB of weights on Flux.1-dev, ~2 ms/step on an H200) by slices of one matmul per
    /// layer per job.
    pub fn modulation_table(&self, vecs: &Tensor) -> Res<Tensor> {
        modulation_table_of(
            &self.double_blocks,
            &self.single_blocks,
            self.final_layer.as_ref(),
            vecs,
        )
    }

    /// Full forward pass. img `(b, img_seq, in_ch)`, ids `(txt+img, 3)`, txt `(b, txt_seq,
    /// context_in_dim)`, t `(b,)` (sigma), y `(b, vec_in_dim)`, guidance `(b,)`.
    pub fn forward(
        &self,
        img: &Tensor,
        ids: &Tensor,
        txt: &Tensor,
        t: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Res<Tensor> {
        let pe = self.rope(ids)?;
        let vec = self.vec(t, y, guidance)?;
        self.forward_prepared(img, &self.embed_txt(txt)?, &vec, &pe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flux::layers::{LayerNorm, RmsNorm};

    /// Text tokens and latent size of the tiny-model tests (5 text + 2x3 image tokens).
    const TXT: i64 = 5;
    const LH: i64 = 4;
    const LW: i64 = 6;

    /// The tiny config, a model seeded with `seed` (fp32, CPU) and its RoPE table over
    /// `TXT` text tokens and an `LH` x `LW` latent.
    fn tiny_model(seed: i64) -> Res<(Config, Flux, Rope)> {
        tch::manual_seed(seed);
        let cfg = Config::tiny();
        let model =
            Flux::new(&cfg, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let pe = model.rope(&Flux::position_ids(TXT, LH, LW, Device::Cpu)?)?;
        Ok((cfg, model, pe))
    }

    /// Random packed latent `(1, img, in_channels)` and embedded text `(1, TXT, h)` for an
    /// `LH` x `LW` latent.
    fn random_inputs(cfg: &Config, model: &Flux) -> Res<(Tensor, Tensor)> {
        let img = Tensor::f_randn(
            [1, (LH / 2) * (LW / 2), cfg.in_channels],
            (Kind::Float, Device::Cpu),
        )?;
        let txt = model.embed_txt(&Tensor::f_randn(
            [1, TXT, cfg.context_in_dim],
            (Kind::Float, Device::Cpu),
        )?)?;
        Ok((img, txt))
    }

    #[test]
    fn opts_parse() {
        assert_eq!(Opts::parse(""), Opts::ALL);
        assert_eq!(Opts::parse("all"), Opts::ALL);
        assert_eq!(Opts::parse("none"), Opts::NONE);
        assert_eq!(
            Opts::parse("all,-gelu"),
            Opts {
                gelu: false,
                ..Opts::ALL
            }
        );
        assert_eq!(
            Opts::parse("all,-overlap"),
            Opts {
                overlap: false,
                ..Opts::ALL
            }
        );
        assert_eq!(
            Opts::parse("rope, rms"),
            Opts {
                rope: true,
                rms: true,
                ..Opts::NONE
            }
        );
    }

    /// The forward fed rows of the modulation table (every block's modulation for every step,
    /// computed once per job) computes what it computes from the conditioning vectors; a row of
    /// the wrong width is refused with the widths it accepts.
    #[test]
    fn the_modulation_table_gives_the_forward_of_the_conditioning_vectors() -> Res<()> {
        let _g = tch::no_grad_guard();
        let (cfg, model, pe) = tiny_model(4)?;
        let steps = 3;
        let (img, txt) = random_inputs(&cfg, &model)?;
        let vecs = Tensor::f_randn([steps, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let table = model.modulation_table(&vecs)?;
        assert_eq!(table.size(), vec![steps, model.modulation_width()]);
        for i in 0..steps {
            let want = model.forward_prepared(&img, &txt, &vecs.f_narrow(0, i, 1)?, &pe)?;
            let got = model.forward_prepared(&img, &txt, &table.f_narrow(0, i, 1)?, &pe)?;
            let diff = f64::try_from(got.f_sub(&want)?.f_abs()?.f_max()?)?;
            assert!(diff < 1e-5, "step {i}: max abs diff {diff}");
        }
        let bad = Tensor::f_zeros([1, 7], (Kind::Float, Device::Cpu))?;
        let err = model
            .forward_prepared(&img, &txt, &bad, &pe)
            .unwrap_err()
            .to_string();
        assert!(err.contains("width 7"), "{err}");
        Ok(())
    }

    /// Carrying each block's closing residual into the next block ([`Opts::chain`], [`Hidden`])
    /// computes the same forward: across double -> double, double -> single (the streams are
    /// joined), single -> single and single -> final layer. On the CPU the carried residual is
    /// added by the same ops as without, so the result is bit-identical; a dropped or doubled
    /// residual anywhere would not be.
    #[test]
    fn carrying_each_blocks_residual_into_the_next_block_computes_the_same_forward() -> Res<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(5);
        let mut cfg = Config::tiny();
        cfg.depth = 2; // two of each block: every kind of boundary
        let model =
            Flux::new(&cfg, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let pe = model.rope(&Flux::position_ids(TXT, LH, LW, Device::Cpu)?)?;
        assert!(cfg.depth_single_blocks >= 2);
        let (img, txt) = random_inputs(&cfg, &model)?;
        let vec = Tensor::f_randn([1, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let chained = Opts {
            chain: true,
            ..Opts::NONE
        };
        let want = model.forward_opts(&img, &txt, &vec, &pe, &LocalAttention, Opts::NONE)?;
        let got = model.forward_opts(&img, &txt, &vec, &pe, &LocalAttention, chained)?;
        assert!(
            bool::try_from(got.f_eq_tensor(&want)?.f_all()?)?,
            "chained forward differs"
        );
        // And against the blocks one by one, each closing its own residual.
        let ctx = Ctx {
            pe: &pe,
            attn: &LocalAttention,
            opts: Opts::NONE,
        };
        let table = model.modulation_table(&vec)?;
        let h = cfg.hidden_size;
        let mut off = 0;
        let mut cond = |w: i64| {
            off += w;
            table.narrow(1, off - w, w)
        };
        let (mut i, mut t) = (model.img_in.as_ref().unwrap().forward(&img)?, txt.shallow_clone());
        for b in &model.double_blocks {
            (i, t) = b.forward(&i, &t, &cond(12 * h), ctx)?;
        }
        let mut x = Tensor::f_cat(&[t, i], 1)?;
        for b in &model.single_blocks {
            x = b.forward(&x, &cond(3 * h), ctx)?;
        }
        let by_block = model
            .final_layer
            .as_ref()
            .unwrap()
            .forward(&x.f_narrow(1, TXT, x.size()[1] - TXT)?, &cond(2 * h))?;
        let diff = f64::try_from(by_block.f_sub(&want)?.f_abs()?.f_max()?)?;
        assert!(diff < 1e-5, "block by block vs forward: max abs diff {diff}");
        Ok(())
    }

    /// A single block run as its attention and MLP halves (split `linear1` / `linear2`, in-place
    /// accumulation: what [`Opts::split`] runs on CUDA) computes the block's function.
    #[test]
    fn single_block_halves_match_the_fused_linear_layers() -> Res<()> {
        let _g = tch::no_grad_guard();
        let (cfg, model, pe) = tiny_model(3)?;
        let (txt_len, lh, lw) = (TXT, LH, LW);
        let seq = txt_len + (lh / 2) * (lw / 2);
        let x = Tensor::f_randn([1, seq, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let vec = Tensor::f_randn([1, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let block = &model.single_blocks[0];
        let ctx = Ctx {
            pe: &pe,
            attn: &LocalAttention,
            opts: Opts::NONE,
        };
        let reference = block.forward(&x, &vec, ctx)?;
        let m = block.modulation.forward(&vec)?;
        let x_mod = modulate(&block.pre_norm, &x, &m[0], &m[1])?;
        let halves = block.forward_halves(&x, &x_mod, &m[2], ctx)?;
        let diff = f64::try_from(halves.f_sub(&reference)?.f_abs()?.f_max()?)?;
        let scale = f64::try_from(reference.f_abs()?.f_max()?)?;
        assert!(
            diff < 1e-5 * scale.max(1.0),
            "max abs diff {diff} (scale {scale})"
        );
        Ok(())
    }

    /// The fused formulations compute the reference ops' function (fp32, CPU).
    #[test]
    fn fused_ops_match_reference() -> Res<()> {
        tch::manual_seed(7);
        let ids = Flux::position_ids(5, 4, 6, Device::Cpu)?; // 5 txt + 2x3 img tokens
        let rope = Rope::new(&ids, &[4, 6, 6], 10_000.0)?;
        let x = Tensor::f_randn([2, 3, 11, 16], (Kind::Float, Device::Cpu))?;
        let a = rope.apply_complex(&x)?;
        let b = rope.apply_reference(&x)?;
        assert!(f64::try_from(a.f_sub(&b)?.f_abs()?.f_max()?)? < 1e-5);

        let norm = RmsNorm {
            scale: Tensor::f_randn([16], (Kind::Float, Device::Cpu))?,
            eps: 1e-6,
        };
        let fused = x.f_internal_fused_rms_norm([16], Some(&norm.scale), norm.eps)?.0;
        assert!(f64::try_from(fused.f_sub(&norm.forward(&x)?)?.f_abs()?.f_max()?)? < 1e-5);

        let ln = LayerNorm::plain(16, 1e-6);
        let (shift, scale) = (
            Tensor::f_randn([1, 1, 16], (Kind::Float, Device::Cpu))?,
            Tensor::f_randn([1, 1, 16], (Kind::Float, Device::Cpu))?,
        );
        let x1 = x.f_reshape([1, 66, 16])?;
        let reference = ln.forward(&x1)?.f_mul(&scale.f_add_scalar(1.0)?)?.f_add(&shift)?;
        let got = modulate(&ln, &x1, &shift, &scale)?; // batch 1: LayerNorm affine (if enabled)
        assert!(f64::try_from(got.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        let x2 = x.f_reshape([2, 33, 16])?;
        let (shift2, scale2) = (
            shift.f_expand([2, 1, 16], false)?,
            scale.f_expand([2, 1, 16], false)?,
        );
        let reference = ln
            .forward(&x2)?
            .f_mul(&scale2.f_add_scalar(1.0)?)?
            .f_add(&shift2)?;
        let got = modulate(&ln, &x2, &shift2, &scale2)?; // batch 2: addcmul (if enabled)
        assert!(f64::try_from(got.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        Ok(())
    }
}
