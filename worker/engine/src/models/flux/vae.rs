//! The AutoencoderKL decoder of Flux (16 latent channels, no post-quant conv) and SDXL (4 latent
//! channels, a 1x1 `post_quant_conv` before the decoder), with diffusers' key names
//! (`decoder.up_blocks.N.resnets.M.conv1`, `decoder.mid_block.attentions.0.to_q`, ...).

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{Conv2d, GroupNorm, Linear, Res};
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;
use crate::nn::spatial::{SingleDevice, SpatialDecoder, SpatialOps};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub latent_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// diffusers' `use_post_quant_conv`: a 1x1 latent-to-latent conv applied before the decoder.
    pub post_quant_conv: bool,
}

impl Config {
    pub fn flux() -> Self {
        Self {
            latent_channels: 16,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
            post_quant_conv: false,
        }
    }

    pub fn dev() -> Self {
        Self::flux()
    }

    pub fn schnell() -> Self {
        Self::flux()
    }

    /// Same depth (so the 8x spatial factor holds), tiny widths.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![16, 16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..Self::flux()
        }
    }

    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// A diffusers `AutoencoderKL` `config.json`; absent fields take diffusers' defaults
    /// (`scaling_factor` 0.18215, no shift, a post-quant conv).
    pub fn from_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let blocks = v
            .get("block_out_channels")
            .and_then(|b| b.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect::<Vec<_>>())
            .ok_or_else(|| EngineError::Load(format!("{}: no block_out_channels", path.display())))?;
        // Per-channel latent statistics would change the unscaling; no supported model has them.
        for k in ["latents_mean", "latents_std"] {
            if v.get(k).is_some_and(|x| !x.is_null()) {
                return Err(EngineError::Load(format!(
                    "{}: {k} is not supported",
                    path.display()
                )));
            }
        }
        Ok(Self {
            latent_channels: i("latent_channels")?,
            out_channels: i("out_channels")?,
            block_out_channels: blocks,
            layers_per_block: i("layers_per_block")?,
            norm_num_groups: i("norm_num_groups")?,
            scaling_factor: f("scaling_factor", 0.18215),
            shift_factor: f("shift_factor", 0.0),
            post_quant_conv: v
                .get("use_post_quant_conv")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
        })
    }
}

#[derive(Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64, groups: i64) -> Res<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&p / "norm1", groups, cin, 1e-6)?,
            conv1: Conv2d::new(&p / "conv1", cin, cout, 3)?,
            norm2: GroupNorm::new(&p / "norm2", groups, cout, 1e-6)?,
            conv2: Conv2d::new(&p / "conv2", cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p / "conv_shortcut", cin, cout, 1)?)
            } else {
                None
            },
        })
    }

    /// SiLU and the residual add run in place on fresh tensors (the norm's and the conv's
    /// outputs): at 1024² each is a (1, 128, 1024, 1024) activation the decode's peak would hold.
    fn forward_with(&self, x: &Tensor, ops: &dyn SpatialOps) -> Res<Tensor> {
        let h = ops.conv(&self.conv1, &ops.group_norm(&self.norm1, x)?.f_silu_()?)?;
        let mut h = ops.conv(&self.conv2, &ops.group_norm(&self.norm2, &h)?.f_silu_()?)?;
        match &self.conv_shortcut {
            Some(c) => h.f_add_(&ops.conv(c, x)?),
            None => h.f_add_(x),
        }
    }
}

/// Single-head spatial self-attention of the mid block.
#[derive(Debug)]
pub struct AttentionBlock {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl AttentionBlock {
    fn new(p: nn::Path<'_>, ch: i64, groups: i64) -> Res<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(&p / "group_norm", groups, ch, 1e-6)?,
            to_q: Linear::new(&p / "to_q", ch, ch, true)?,
            to_k: Linear::new(&p / "to_k", ch, ch, true)?,
            to_v: Linear::new(&p / "to_v", ch, ch, true)?,
            to_out: Linear::new(&p / "to_out" / 0, ch, ch, true)?,
        })
    }

    fn forward_with(&self, x: &Tensor, ops: &dyn SpatialOps) -> Res<Tensor> {
        let (b, c, h, w) = x.size4()?;
        let t = ops
            .group_norm(&self.group_norm, x)?
            .f_reshape([b, c, h * w])?
            .f_transpose(1, 2)?; // (b, hw, c)
        let q = self.to_q.forward(&t)?.f_unsqueeze(1)?; // (b, 1, hw, c)
        let k = self.to_k.forward(&t)?.f_unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.f_unsqueeze(1)?;
        let a = ops.attention(&q, &k, &v)?.f_squeeze_dim(1)?; // (b, hw, c)
        let a = self
            .to_out
            .forward(&a)?
            .f_transpose(1, 2)?
            .f_reshape([b, c, h, w])?;
        x.f_add(&a)
    }
}

#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsampler: Option<Conv2d>,
}

#[derive(Debug)]
pub struct Decoder {
    pub config: Config,
    pub post_quant_conv: Option<Conv2d>,
    pub conv_in: Conv2d,
    pub mid_resnets: Vec<ResnetBlock>,
    pub mid_attention: AttentionBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub vs: nn::VarStore,
}

impl Decoder {
    pub fn new(c: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let post_quant_conv = if c.post_quant_conv {
            let l = c.latent_channels;
            Some(Conv2d::new(vs.root() / "post_quant_conv", l, l, 1)?)
        } else {
            None
        };
        let r = vs.root() / "decoder";
        let g = c.norm_num_groups;
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let Some(&top) = rev.first() else {
            return Err(EngineError::Load("vae config has no block_out_channels".into()));
        };
        let conv_in = Conv2d::new(&r / "conv_in", c.latent_channels, top, 3)?;
        let mid = &r / "mid_block";
        let mid_resnets = (0..2)
            .map(|i| ResnetBlock::new(&mid / "resnets" / i, top, top, g))
            .collect::<Res<Vec<_>>>()?;
        let mid_attention = AttentionBlock::new(&mid / "attentions" / 0, top, g)?;
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &ch) in rev.iter().enumerate() {
            let p = &r / "up_blocks" / i;
            let mut resnets = Vec::new();
            for j in 0..=c.layers_per_block {
                let cin = if j == 0 { prev } else { ch };
                resnets.push(ResnetBlock::new(&p / "resnets" / j, cin, ch, g)?);
            }
            let upsampler = if i + 1 < rev.len() {
                Some(Conv2d::new(&p / "upsamplers" / 0 / "conv", ch, ch, 3)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = ch;
        }
        let conv_norm_out = GroupNorm::new(&r / "conv_norm_out", g, prev, 1e-6)?;
        let conv_out = Conv2d::new(&r / "conv_out", prev, c.out_channels, 3)?;
        vs.freeze();
        Ok(Self {
            config: c.clone(),
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out,
            conv_out,
            vs,
        })
    }

    /// A copy of these weights on `device` (each rank of a patch-parallel decode holds one; the
    /// decoder is ~100 MB in bf16).
    pub fn replicate(&self, device: Device) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        let kind = self.conv_in.weight.kind();
        let mut copy = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(&self.config, device, kind)?
        };
        copy.vs.copy(&self.vs)?;
        Ok(copy)
    }

    /// Loads the decoder from a diffusers `vae/` folder; the encoder half (`encoder.*`,
    /// `quant_conv.*`) is skipped.
    pub fn load(c: &Config, dir: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let ck = Checkpoint::open_dir(dir, "diffusion_pytorch_model")?;
        Self::load_from(
            c,
            &ck,
            "vae decoder",
            &|n| Source::Key(n.to_string()),
            &|k| k.starts_with("encoder.") || k.starts_with("quant_conv."),
            device,
            kind,
        )
    }

    /// Strictly loads the decoder from `ck` (see [`load_strict`]: `source` maps each variable
    /// name to its checkpoint tensors, `ignore` names the keys of `ck` that are not the decoder's).
    pub fn load_from(
        c: &Config,
        ck: &Checkpoint,
        what: &str,
        source: &dyn Fn(&str) -> Source,
        ignore: &dyn Fn(&str) -> bool,
        device: Device,
        kind: Kind,
    ) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(c, device, kind)?
        };
        load_strict(&model.vs, ck, what, source, ignore)?;
        Ok(model)
    }

    /// Scaled latents `z` `(b, latent_ch, h, w)` (as the transformer produces them) -> image in
    /// [-1, 1] `(b, 3, 8h, 8w)`. Applies `z / scaling + shift` first.
    pub fn decode(&self, z: &Tensor) -> Res<Tensor> {
        self.forward(&self.unscale(z)?)
    }

    /// Raw decoder on unscaled latents (post-quant conv included, as diffusers'
    /// `AutoencoderKL.decode`).
    pub fn forward(&self, z: &Tensor) -> Res<Tensor> {
        self.forward_with(z, &SingleDevice)
    }

    /// `z / scaling + shift`: the transformer's latent space -> the decoder's input.
    pub(crate) fn unscale(&self, z: &Tensor) -> Res<Tensor> {
        z.f_div_scalar(self.config.scaling_factor)?
            .f_add_scalar(self.config.shift_factor)
    }

    /// The decoder with its image-space operations supplied by `ops` ([`SingleDevice`] on one
    /// device; a row-split decode passes halo-exchanging ones, see `crate::parallel::spatial`).
    pub fn forward_with(&self, z: &Tensor, ops: &dyn SpatialOps) -> Res<Tensor> {
        let mut h = match &self.post_quant_conv {
            Some(pq) => ops.conv(&self.conv_in, &ops.conv(pq, z)?)?,
            None => ops.conv(&self.conv_in, z)?,
        };
        h = self.mid_resnets[0].forward_with(&h, ops)?;
        h = self.mid_attention.forward_with(&h, ops)?;
        h = self.mid_resnets[1].forward_with(&h, ops)?;
        for up in &self.up_blocks {
            for r in &up.resnets {
                h = r.forward_with(&h, ops)?;
            }
            if let Some(conv) = &up.upsampler {
                let (_, _, rows, w) = h.size4()?;
                h = ops.conv(conv, &ops.upsample_nearest(&h, [2 * rows, 2 * w])?)?;
            }
        }
        let h = ops.group_norm(&self.conv_norm_out, &h)?.f_silu_()?;
        ops.conv(&self.conv_out, &h)
    }
}

impl SpatialDecoder for Decoder {
    /// [`Decoder::decode`] with the image-space operations of `ops`.
    fn decode_with(&self, z: &Tensor, ops: &dyn SpatialOps) -> Res<Tensor> {
        self.forward_with(&self.unscale(z)?, ops)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;
    use crate::parallel::comm::balanced_split;
    use crate::parallel::spatial::Bands;
    use crate::parallel::threads::ThreadComm;

    fn bytes(t: &Tensor) -> i64 {
        (t.numel() * t.kind().elt_size_in_bytes()) as i64
    }

    /// Records the largest tensor any of the decoder's spatial operations takes or returns (the
    /// activations between them are the same size or smaller).
    struct Traced<'a> {
        inner: &'a dyn SpatialOps,
        peak: Cell<i64>,
    }

    impl Traced<'_> {
        fn see(&self, ts: &[&Tensor]) {
            for t in ts {
                self.peak.set(self.peak.get().max(bytes(t)));
            }
        }
    }

    impl SpatialOps for Traced<'_> {
        fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
            let y = self.inner.conv(conv, x)?;
            self.see(&[x, &y]);
            Ok(y)
        }

        fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
            let y = self.inner.group_norm(norm, x)?;
            self.see(&[x, &y]);
            Ok(y)
        }

        fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
            let y = self.inner.attention(q, k, v)?;
            self.see(&[q, k, v, &y]);
            Ok(y)
        }

        fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
            let y = self.inner.upsample_nearest(x, size)?;
            self.see(&[x, &y]);
            Ok(y)
        }
    }

    /// The largest activation each rank holds, patch-parallel vs one device (Flux's block
    /// structure at a quarter of its widths: the ratio is what the docs' estimate scales).
    #[test]
    fn patch_parallel_decode_divides_the_largest_activation() {
        let _g = tch::no_grad_guard();
        let cfg = Config {
            block_out_channels: vec![32, 64, 128, 128],
            ..Config::flux()
        };
        let (dec, z) = {
            let _lock = crate::flux::rng_lock();
            tch::manual_seed(3);
            let dec = Decoder::new(&cfg, Device::Cpu, Kind::Float).unwrap();
            (dec, Tensor::randn([1, 16, 8, 6], (Kind::Float, Device::Cpu)))
        };
        let whole = Traced {
            inner: &SingleDevice,
            peak: Cell::new(0),
        };
        let want = dec.decode_with(&z, &whole).unwrap();
        let single = whole.peak.get();
        eprintln!(
            "VAE decode 64x48 px, widths {:?}: largest activation {} KiB on one device",
            cfg.block_out_channels,
            single / 1024
        );
        for n in [2usize, 4] {
            let rows = balanced_split(8, n);
            let comms = ThreadComm::group(n, Device::Cpu, Duration::from_secs(120));
            let out: Vec<(Tensor, i64)> = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .iter()
                    .enumerate()
                    .map(|(r, c)| {
                        let d = dec.replicate(Device::Cpu).unwrap();
                        let band = z.narrow(2, rows[r].0, rows[r].1).copy();
                        let rows = &rows;
                        s.spawn(move || {
                            let ops = Bands::new(c, rows, 6).unwrap();
                            let traced = Traced {
                                inner: &ops,
                                peak: Cell::new(0),
                            };
                            let img = d.decode_with(&band, &traced).unwrap();
                            (img, traced.peak.get())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let peaks: Vec<i64> = out.iter().map(|o| o.1).collect();
            let got = Tensor::cat(&out.iter().map(|o| o.0.shallow_clone()).collect::<Vec<_>>(), 2);
            let d = f64::try_from(got.f_sub(&want).unwrap().abs().max()).unwrap();
            assert!(d <= 1e-5, "{n} ranks: max abs diff {d:e}");
            let worst = *peaks.iter().max().unwrap();
            eprintln!(
                "  {n} ranks (rows {rows:?}): largest activation per rank {:?} KiB = {:.3} of one device",
                peaks.iter().map(|p| p / 1024).collect::<Vec<_>>(),
                worst as f64 / single as f64
            );
            assert!(
                worst * n as i64 <= single * 3 / 2,
                "{n} ranks: {peaks:?} vs {single}"
            );
        }
    }
}
