//! SDXL's fast paths on one CUDA device, each behind a switch of [`Perf`] so that a benchmark can
//! compare them in one process:
//!
//! * `graphs`: each step's UNet forward (the CFG batch of 2) is captured once per latent size as a
//!   CUDA graph and replayed ([`StepGraphs`], over the engine's [`GraphCache`]): one launch instead
//!   of the forward's ~1,500 kernel launches, which otherwise leave the GPU waiting on the host;
//! * `cl`: convolution weights and the activations between them in channels-last (NHWC) memory
//!   layout, converted once ([`set_conv_layout`]) and at the UNet's entry: cuDNN's bf16 convolutions
//!   on Hopper run NHWC natively (NCHW costs a transpose around each), and a transformer's
//!   `(b, c, h, w) -> (b, h*w, c)` token view is then free;
//! * `fused`: GroupNorm with its SiLU (and a resnet's time-embedding add) and GEGLU as the fused
//!   kernels of `csrc/sdxl_kernels.cu.inc` ([`crate::aten::group_norm`], [`crate::aten::geglu`]):
//!   ATen's GroupNorm makes NHWC input contiguous first (a transpose in, NCHW out), and the
//!   unfused forms write every intermediate;
//! * `addln`: a transformer block's residual add and the LayerNorm that reads its sum as one
//!   kernel ([`crate::aten::add_layer_norm`]; the feed-forward's add joins the next block's
//!   `norm1`), one pass over the token stream fewer per add;
//! * `cbias`: a convolution's bias (and a resnet's residual) added into its channels-last output
//!   by one vectorised kernel ([`crate::aten::bias_add`]) instead of ATen's broadcast add after
//!   cuDNN (and a second add for the residual); the same bits;
//! * `qkv`: the attention projections that read one input as one matmul (self-attention's q, k,
//!   v; cross-attention's k, v), their weights stacked once in place
//!   ([`super::unet_blocks::Attention::fuse_projections`]);
//! * `attn=KERNEL`: the attention kernel ([`AttnKernel`]; `sdpa` lets ATen pick).
//!
//! Off CUDA, or in another dtype than bf16 where the kernels do not apply, the model computes the
//! reference formulations: [`Perf::REFERENCE`] is exactly the goldens' forward.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor, nn};

use crate::EngineError;
pub use crate::aten::AttnKernel;
use crate::nn::spatial::{SpatialOps, group_norm_silu_reference};
use crate::nn::{Conv2d, GroupNorm, Res};
use crate::parallel::graphs::{self, GraphCache, StepKey};

/// Which fast paths run (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perf {
    pub cuda_graphs: bool,
    pub channels_last: bool,
    pub fused: bool,
    pub addln: bool,
    pub cbias: bool,
    pub qkv: bool,
    pub attention: AttnKernel,
}

impl Perf {
    /// Every fast path off: the reference formulations (the CPU goldens' forward).
    pub const REFERENCE: Perf = Perf {
        cuda_graphs: false,
        channels_last: false,
        fused: false,
        addln: false,
        cbias: false,
        qkv: false,
        attention: AttnKernel::Sdpa,
    };

    /// Every fast path on, attention as ATen picks it.
    pub const ALL: Perf = Perf {
        cuda_graphs: true,
        channels_last: true,
        fused: true,
        addln: true,
        cbias: true,
        qkv: true,
        attention: AttnKernel::Sdpa,
    };

    /// What a pipeline on `device` in `kind` runs unless told otherwise: [`Perf::ALL`] for bf16
    /// on CUDA, the reference elsewhere (the fused kernels are bf16-only, and CUDA graphs and
    /// NHWC convolutions buy nothing on the CPU).
    pub fn default_for(device: Device, kind: Kind) -> Perf {
        if device.is_cuda() && kind == Kind::BFloat16 {
            Perf::ALL
        } else {
            Perf::REFERENCE
        }
    }

    /// Comma-separated switches applied left to right: `all`, `reference` (or `none`), `graphs`,
    /// `cl`, `fused`, `addln`, `cbias`, `qkv`, each negated with a leading `-`, and
    /// `attn=sdpa|cudnn|flash|efficient`;
    /// e.g. `all,-graphs` or `cl,graphs,attn=cudnn`.
    pub fn parse(spec: &str) -> Result<Perf, String> {
        let mut p = Perf::REFERENCE;
        for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if let Some(k) = word.strip_prefix("attn=") {
                p.attention = AttnKernel::parse(k).ok_or_else(|| {
                    format!("{word:?}: the attention kernel is one of sdpa, cudnn, flash, efficient")
                })?;
                continue;
            }
            let (on, name) = match word.strip_prefix('-') {
                Some(n) => (false, n),
                None => (true, word),
            };
            match name {
                "all" if on => p = Perf::ALL,
                "reference" | "none" if on => p = Perf::REFERENCE,
                "graphs" => p.cuda_graphs = on,
                "cl" | "channels_last" => p.channels_last = on,
                "fused" => p.fused = on,
                "addln" => p.addln = on,
                "cbias" => p.cbias = on,
                "qkv" => p.qkv = on,
                _ => {
                    return Err(format!(
                        "{word:?}: expected all, reference, [-]graphs, [-]cl, [-]fused, [-]addln, [-]cbias, [-]qkv or attn=KERNEL"
                    ));
                }
            }
        }
        Ok(p)
    }

    /// The canonical spelling, e.g. `graphs,cl,fused,addln,cbias,qkv,attn=cudnn` (`reference` when all are off).
    pub fn name(&self) -> String {
        let mut parts: Vec<String> = [
            (self.cuda_graphs, "graphs"),
            (self.channels_last, "cl"),
            (self.fused, "fused"),
            (self.addln, "addln"),
            (self.cbias, "cbias"),
            (self.qkv, "qkv"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n.to_string())
        .collect();
        if self.attention != AttnKernel::Sdpa {
            parts.push(format!("attn={}", self.attention.name()));
        }
        if parts.is_empty() {
            "reference".into()
        } else {
            parts.join(",")
        }
    }
}

/// Whether `x` `(b, c, h, w)` is laid out channels-last (NHWC) and not plainly contiguous.
pub fn is_channels_last(x: &Tensor) -> bool {
    let (size, stride) = (x.size(), x.stride());
    size.len() == 4 && !x.is_contiguous() && {
        let (c, w) = (size[1], size[3]);
        stride[1] == 1 && stride[3] == c && stride[2] == c * w && stride[0] == c * w * size[2]
    }
}

/// `x` `(b, c, h, w)` with the same values in channels-last memory (NHWC).
pub fn to_channels_last(x: &Tensor) -> Res<Tensor> {
    x.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])
}

/// Converts every 4-D variable of `vs` (the convolution weights) in place to channels-last
/// memory, or back to contiguous: each variable's storage is replaced (`set_data`), so the layers
/// holding it see the new layout and no second copy of the weights stays alive.
pub fn set_conv_layout(vs: &nn::VarStore, channels_last: bool) -> Result<(), EngineError> {
    let _guard = tch::no_grad_guard();
    for (_, mut t) in vs.variables() {
        if t.dim() != 4 {
            continue;
        }
        let relaid = if channels_last {
            to_channels_last(&t)?
        } else {
            t.f_contiguous()?
        };
        t.f_set_data(&relaid)?;
    }
    Ok(())
}

/// The image-space operations of one device with the fast paths of [`Perf`]: ATen's convolution
/// and upsampling (both keep a channels-last input channels-last), the fused GroupNorm where it
/// applies, attention through the chosen kernel. With everything off it computes exactly
/// [`crate::nn::spatial::SingleDevice`]'s operations.
#[derive(Debug, Clone, Copy)]
pub struct LocalOps {
    pub fused: bool,
    pub cbias: bool,
    pub attention: AttnKernel,
}

impl LocalOps {
    pub fn new(perf: &Perf) -> Self {
        Self {
            fused: perf.fused,
            cbias: perf.cbias,
            attention: perf.attention,
        }
    }

    /// Whether `conv(x)`'s bias (and a residual) go through [`crate::aten::bias_add`]: a
    /// channels-last bf16 output on CUDA with a multiple of 8 channels, aligned operands.
    fn bias_fuses(&self, conv: &Conv2d, x: &Tensor) -> bool {
        let out_ch = conv.weight.size()[0];
        fused_kernels_apply(self.cbias, x)
            && is_channels_last(x)
            && conv.weight.kind() == Kind::BFloat16
            && conv.bias.kind() == Kind::BFloat16
            && out_ch % 8 == 0
            && conv.bias.is_contiguous()
            && crate::aten::aligned16(&conv.bias)
    }

    /// The convolution without its bias, then `bias_add` (with `residual`) on the output; None
    /// where the output is not as the kernel needs it (the caller computes it the ATen way).
    fn conv_fused(&self, conv: &Conv2d, x: &Tensor, residual: Option<&Tensor>) -> Res<Option<Tensor>> {
        if !self.bias_fuses(conv, x) {
            return Ok(None);
        }
        let s = [conv.stride, conv.stride];
        let p = [conv.padding, conv.padding];
        let h = x.f_conv2d(&conv.weight, None::<&Tensor>, s, p, [1, 1], 1)?;
        let fits = |t: &Tensor| is_channels_last(t) && crate::aten::aligned16(t);
        if !fits(&h) || residual.is_some_and(|r| r.size() != h.size() || r.stride() != h.stride() || !fits(r))
        {
            // Add the bias the ATen way and let the caller add the residual.
            let mut h = h;
            let _ = h.f_add_(&conv.bias.f_view([1, -1, 1, 1])?)?;
            return Ok(match residual {
                Some(r) => Some(h.f_add_(r)?),
                None => Some(h),
            });
        }
        crate::aten::bias_add(&h, &conv.bias, residual)?;
        Ok(Some(h))
    }

    /// Whether the fused GroupNorm computes `norm` of `x`: a dense NCHW or NHWC bf16 image of at
    /// most 4096 channels and 2^31 values, bf16 parameters (else ATen's GroupNorm does).
    fn fuses(&self, norm: &GroupNorm, x: &Tensor) -> bool {
        let size = x.size();
        fused_kernels_apply(self.fused, x)
            && norm.weight.kind() == Kind::BFloat16
            && size.len() == 4
            && size[1] <= 4096
            && size[1..].iter().product::<i64>() < 1 << 31
            && (x.is_contiguous() || is_channels_last(x))
    }
}

/// Whether the fused kernels compute for `x`: switched on, bf16 on a CUDA device where they
/// compiled.
pub fn fused_kernels_apply(fused: bool, x: &Tensor) -> bool {
    match x.device() {
        Device::Cuda(i) => fused && x.kind() == Kind::BFloat16 && crate::aten::sdxl_kernels_available(i),
        _ => false,
    }
}

impl SpatialOps for LocalOps {
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        match self.conv_fused(conv, x, None)? {
            Some(h) => Ok(h),
            None => conv.forward(x),
        }
    }

    fn conv_add(&self, conv: &Conv2d, x: &Tensor, residual: &Tensor) -> Res<Tensor> {
        match self.conv_fused(conv, x, Some(residual))? {
            Some(h) => Ok(h),
            None => {
                let mut h = conv.forward(x)?;
                h.f_add_(residual)
            }
        }
    }

    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
        if self.fuses(norm, x) {
            crate::aten::group_norm(x, &norm.weight, &norm.bias, None, norm.groups, norm.eps, false)
        } else {
            norm.forward(x)
        }
    }

    fn group_norm_silu(&self, norm: &GroupNorm, x: Tensor, add: Option<&Tensor>) -> Res<Tensor> {
        if self.fuses(norm, &x) && add.is_none_or(|a| a.kind() == Kind::BFloat16) {
            crate::aten::group_norm(&x, &norm.weight, &norm.bias, add, norm.groups, norm.eps, true)
        } else {
            group_norm_silu_reference(self, norm, x, add)
        }
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        crate::aten::attention(q, k, v, self.attention)
    }

    fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
        x.f_upsample_nearest2d(size, None, None)
    }
}

/// The captured UNet steps of one pipeline: one CUDA graph per (batch, latent size, text length),
/// least recently used dropped beyond `DITFLEET_CUDA_GRAPHS_MAX`. A graph holds its own memory
/// pool for the forward's activations and reads the weights by address: [`StepGraphs::clear`]
/// before the weights move (a layout change) or the forward changes (other [`Perf`]).
#[derive(Default)]
pub struct StepGraphs(Mutex<GraphCache>);

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        write!(
            f,
            "StepGraphs({} graphs, {} captures, {} replays)",
            g.len(),
            g.captures,
            g.replays
        )
    }
}

impl StepGraphs {
    fn lock(&self) -> std::sync::MutexGuard<'_, GraphCache> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// `(captures, replays)` so far.
    pub fn counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.captures, g.replays)
    }

    /// `forward(inputs)` by replaying the graph of these input shapes (captured on first use),
    /// on a CUDA device where graphs are enabled (`DITFLEET_CUDA_GRAPHS`); else `forward` itself.
    /// A failed capture turns graphs off for the process and this step runs eagerly.
    pub fn run(&self, inputs: &[&Tensor], forward: &graphs::Forward<'_>) -> Result<Tensor, EngineError> {
        let device = inputs.first().map_or(Device::Cpu, |t| t.device());
        let Device::Cuda(ordinal) = device else {
            return Ok(forward(&shallow(inputs))?);
        };
        if !graphs::enabled(device, 1) {
            return Ok(forward(&shallow(inputs))?);
        }
        let key = StepKey(inputs.iter().flat_map(|t| t.size()).collect());
        let out = self.lock().step(ordinal, &key, inputs, &[], forward);
        match out {
            Ok(o) => Ok(o),
            // The capture failed and turned graphs off: this step eagerly, the next ones too.
            Err(e) if !graphs::enabled(device, 1) => {
                tracing::warn!(error = %e, "SDXL step graph capture failed; running eagerly");
                Ok(forward(&shallow(inputs))?)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn shallow(inputs: &[&Tensor]) -> Vec<Tensor> {
    inputs.iter().map(|t| t.shallow_clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_specs_apply_left_to_right_and_print_canonically() {
        assert_eq!(Perf::parse("").unwrap(), Perf::REFERENCE);
        assert_eq!(Perf::parse("all").unwrap(), Perf::ALL);
        let p = Perf::parse("all,-graphs,attn=cudnn").unwrap();
        assert!(!p.cuda_graphs && p.channels_last && p.fused);
        assert_eq!(p.attention, AttnKernel::Cudnn);
        assert_eq!(p.name(), "cl,fused,addln,cbias,qkv,attn=cudnn");
        assert_eq!(Perf::parse(&p.name()).unwrap(), p);
        assert_eq!(Perf::REFERENCE.name(), "reference");
        assert_eq!(Perf::parse("graphs,cl").unwrap().name(), "graphs,cl");
        for bad in ["fast", "attn=xformers", "-all"] {
            assert!(Perf::parse(bad).unwrap_err().contains(bad), "{bad}");
        }
        assert_eq!(Perf::default_for(Device::Cpu, Kind::BFloat16), Perf::REFERENCE);
        assert_eq!(Perf::default_for(Device::Cuda(0), Kind::Float), Perf::REFERENCE);
        assert_eq!(Perf::default_for(Device::Cuda(0), Kind::BFloat16), Perf::ALL);
    }

    #[test]
    fn relaying_the_weights_changes_what_every_holder_sees_and_keeps_the_values() {
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv2d::new(vs.root() / "conv", 6, 5, 3).unwrap();
        let before = conv.weight.copy();
        set_conv_layout(&vs, true).unwrap();
        // The layer's own handle sees the new layout: the storage was replaced, not copied aside.
        assert!(is_channels_last(&conv.weight), "{:?}", conv.weight.stride());
        assert!(conv.weight.equal(&before));
        assert!(!is_channels_last(&conv.bias));
        set_conv_layout(&vs, false).unwrap();
        assert!(conv.weight.is_contiguous() && conv.weight.equal(&before));
    }

    #[test]
    fn channels_last_is_detected_from_the_strides() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&x));
        let y = to_channels_last(&x).unwrap();
        assert!(is_channels_last(&y) && y.equal(&x));
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
    }

    /// Records whether every convolution's input is channels-last, computing on one device.
    #[derive(Default)]
    struct LayoutProbe {
        convs: std::cell::Cell<usize>,
        nchw: std::cell::Cell<usize>,
    }

    impl SpatialOps for LayoutProbe {
        fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
            self.convs.set(self.convs.get() + 1);
            if !is_channels_last(x) {
                self.nchw.set(self.nchw.get() + 1);
            }
            conv.forward(x)
        }
        fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
            norm.forward(x)
        }
        fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
            crate::nn::sdpa(q, k, v, None, false, None)
        }
        fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
            x.f_upsample_nearest2d(size, None, None)
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from(a.f_sub(b).unwrap().abs().max()).unwrap()
    }

    /// The channels-last forward keeps the activations NHWC from `conv_in` to `conv_out` (no
    /// silent conversion back to NCHW anywhere in the blocks) and computes the reference forward.
    #[test]
    fn a_channels_last_unet_stays_nhwc_throughout_and_computes_the_reference_forward() {
        use super::super::unet::{Config, Unet};
        let _g = tch::no_grad_guard();
        tch::manual_seed(5);
        let c = Config::tiny();
        let mut model = Unet::new(&c, Device::Cpu, Kind::Float).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let sample = Tensor::randn([2, 4, 8, 12], opts);
        let ctx = Tensor::randn([2, 7, c.cross_attention_dim], opts);
        let text = Tensor::randn([2, c.text_embeds_dim()], opts);
        let ids = Tensor::from_slice(&[64f32, 96., 0., 0., 64., 96.]).expand([2, 6], false);
        let t = Tensor::from(700.0f32);
        let want = model.forward(&sample, &t, &ctx, &text, &ids).unwrap();
        model.set_perf(Perf::parse("cl").unwrap()).unwrap();
        assert!(is_channels_last(&model.conv_in.weight));
        let got = model.forward(&sample, &t, &ctx, &text, &ids).unwrap();
        assert!(got.is_contiguous());
        assert!(max_abs_diff(&got, &want) < 1e-4, "{}", max_abs_diff(&got, &want));
        let probe = LayoutProbe::default();
        let emb = model.embed(&t, &text, &ids).unwrap();
        let probed = model.forward_embedded(&sample, &emb, &ctx, &probe).unwrap();
        assert!(max_abs_diff(&probed, &got) < 1e-6);
        assert_eq!(probe.convs.get(), 17 * 2 + 10 + 2 + 2 + 2);
        assert_eq!(probe.nchw.get(), 0, "convolutions that got an NCHW input");
        // Back to the reference: the same forward, bit for bit.
        model.set_perf(Perf::REFERENCE).unwrap();
        assert!(
            model
                .forward(&sample, &t, &ctx, &text, &ids)
                .unwrap()
                .equal(&want)
        );
    }

    /// Stacked attention projections compute the same forward, keep one copy of the weights (the
    /// projections' variables become views of the stacked weight) and see weights written into the
    /// variables afterwards (a load, a copy from another model).
    #[test]
    fn stacked_attention_projections_compute_the_reference_and_see_later_loads() {
        use super::super::unet::{Config, Unet};
        let _g = tch::no_grad_guard();
        tch::manual_seed(6);
        let c = Config::tiny();
        let mut model = Unet::new(&c, Device::Cpu, Kind::Float).unwrap();
        let other = Unet::new(&c, Device::Cpu, Kind::Float).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let sample = Tensor::randn([2, 4, 8, 8], opts);
        let ctx = Tensor::randn([2, 5, c.cross_attention_dim], opts);
        let text = Tensor::randn([2, c.text_embeds_dim()], opts);
        let ids = Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.]).expand([2, 6], false);
        let t = Tensor::from(300.0f32);
        let run = |m: &Unet| m.forward(&sample, &t, &ctx, &text, &ids).unwrap();
        let want = run(&model);
        let params = model.num_parameters();
        model.set_perf(Perf::parse("qkv").unwrap()).unwrap();
        let attn = &model.down_blocks[1].attentions[0].transformer_blocks[0].attn1;
        let (q, v) = (
            attn.to_q.weight.data_ptr() as usize,
            attn.to_v.weight.data_ptr() as usize,
        );
        let row_bytes = attn.to_q.weight.size()[1] as usize * 4;
        assert_eq!(
            v - q,
            2 * attn.to_q.weight.size()[0] as usize * row_bytes,
            "q and v rows of one tensor"
        );
        assert_eq!(model.num_parameters(), params);
        assert!(max_abs_diff(&run(&model), &want) < 1e-5);
        model.vs.copy(&other.vs).unwrap();
        assert!(max_abs_diff(&run(&model), &run(&other)) < 1e-5);
        model.set_perf(Perf::parse("cl,qkv").unwrap()).unwrap();
        assert!(max_abs_diff(&run(&model), &run(&other)) < 1e-4);
    }

    /// With every fast path switched on, a CPU pipeline runs the only one that applies there
    /// (channels-last; no graphs, no fused kernels off CUDA) and makes the reference image.
    #[test]
    fn a_pipeline_with_every_fast_path_on_makes_the_reference_image_on_the_cpu() {
        use crate::models::{self, DiffusionModel};
        let mut p = super::super::SdxlPipeline::tiny_random(2).unwrap();
        let request = crate::GenerateRequest {
            model: super::super::pipeline::MODEL.into(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 64,
            height: 48,
            steps: 2,
            guidance: 5.0,
            true_cfg_scale: 1.0,
            seed: 9,
            plan: None,
            scheduler: None,
            loras: Vec::new(),
        };
        let run = |p: &super::super::SdxlPipeline| {
            models::generate(p, &request, None, 0, &mut |_| {}, &mut |_| {
                crate::Control::Continue
            })
            .unwrap()
        };
        let want = run(&p);
        p.set_perf(Perf::ALL).unwrap();
        assert!(is_channels_last(&p.vae.decoder.conv_in.weight));
        let got = run(&p);
        assert_eq!(p.graph_counts(), (0, 0), "no graphs off CUDA");
        let worst = got
            .rgb
            .iter()
            .zip(&want.rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 1, "8-bit images differ by up to {worst}");
        let z = Tensor::randn([1, 4, 6, 8], (Kind::Float, Device::Cpu));
        let fast = p.vae.decode_fast(&z, &Perf::ALL).unwrap();
        let reference = p.vae.decode(&z).unwrap();
        assert!(fast.is_contiguous() && max_abs_diff(&fast, &reference) < 1e-4);
        let _ = p.compute_device();
    }

    #[test]
    fn step_graphs_off_cuda_run_the_forward_itself() {
        let g = StepGraphs::default();
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        let out = g.run(&[&x], &|t: &[Tensor]| t[0].f_mul_scalar(3.0)).unwrap();
        assert_eq!(Vec::<f32>::try_from(out).unwrap(), vec![3.0, 6.0]);
        assert_eq!(g.counts(), (0, 0));
    }
}
