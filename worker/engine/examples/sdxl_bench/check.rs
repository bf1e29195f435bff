//! `sdxl_bench --check`: the fast paths' numerics on this device (see `main.rs`).

use std::time::Instant;

use anyhow::Result;
use ditfleet_engine::aten::{self, AttnKernel};
use ditfleet_engine::flux::vae::Decoder;
use ditfleet_engine::models::sdxl::fast::{Perf, StepGraphs, set_conv_layout, to_channels_last};
use ditfleet_engine::models::sdxl::unet::{Config, Unet};
use ditfleet_engine::models::sdxl::vae::{self, Vae};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use super::{Args, median, sync};

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?);
    Ok(f64::try_from(a.f_sub(&b)?.f_norm()?)? / f64::try_from(b.f_norm()?)?)
}

fn ms_median(d: Device, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        let _ = f()?;
    }
    let mut v = Vec::new();
    for _ in 0..reps {
        sync(d);
        let t = Instant::now();
        let _ = f()?;
        sync(d);
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&v))
}

/// The fused kernels and the attention kernels on SDXL's shapes against fp32.
pub fn kernels(dev: Device, tiny: bool) -> Result<Value> {
    let kind = Kind::BFloat16;
    let gn: &[(i64, i64, i64)] = if tiny {
        &[(16, 8, 12), (32, 4, 6)]
    } else {
        &[
            (320, 128, 128),
            (640, 64, 64),
            (960, 64, 64),
            (1280, 32, 32),
            (2560, 32, 32),
            (128, 1024, 1024),
        ]
    };
    let mut cases = Vec::new();
    for &(c, h, w) in gn {
        for (nhwc, add, act) in [
            (false, false, true),
            (true, false, true),
            (true, true, true),
            (true, false, false),
        ] {
            let groups = 32.min(c / 2);
            let b = if c == 128 { 1 } else { 2 };
            let x = Tensor::f_randn([b, c, h, w], (kind, dev))?
                .f_mul_scalar(2.0)?
                .f_add_scalar(0.5)?;
            let x = if nhwc { to_channels_last(&x)? } else { x };
            let wt = Tensor::f_randn([c], (kind, dev))?
                .f_mul_scalar(0.3)?
                .f_add_scalar(1.0)?;
            let bs = Tensor::f_randn([c], (kind, dev))?.f_mul_scalar(0.1)?;
            let a = Tensor::f_randn([b, c], (kind, dev))?;
            let f = |t: &Tensor| t.f_to_kind(Kind::Float);
            let x32 = if add {
                f(&x)?.f_add(&f(&a)?.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
            } else {
                f(&x)?
            };
            let mut want = x32.f_group_norm(groups, Some(&f(&wt)?), Some(&f(&bs)?), 1e-5, false)?;
            if act {
                want = want.f_silu()?;
            }
            let xa = if add {
                x.f_add(&a.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
            } else {
                x.shallow_clone()
            };
            let mut aten_bf16 = xa.f_group_norm(groups, Some(&wt), Some(&bs), 1e-5, false)?;
            if act {
                aten_bf16 = aten_bf16.f_silu()?;
            }
            let fused = if dev.is_cuda() {
                let y = aten::group_norm(&x, &wt, &bs, add.then_some(&a), groups, 1e-5, act)?;
                json!({"rel_l2": rel_l2(&y, &want)?, "layout_kept": y.stride() == x.stride(),
                       "ms": ms_median(dev, 10, || Ok(aten::group_norm(&x, &wt, &bs, add.then_some(&a), groups, 1e-5, act)?))?})
            } else {
                json!("not CUDA")
            };
            cases.push(json!({"shape": [b, c, h, w], "nhwc": nhwc, "add": add, "silu": act,
                "aten_bf16_rel_l2": rel_l2(&aten_bf16, &want)?, "fused": fused,
                "aten_ms": ms_median(dev, 10, || { let y = xa.f_group_norm(groups, Some(&wt), Some(&bs), 1e-5, false)?; Ok(if act { y.f_silu()? } else { y }) })?}));
        }
    }
    let (rows, n) = if tiny { (96, 64) } else { (8192, 2560) };
    let hh = Tensor::f_randn([2, rows / 2, 2 * n], (kind, dev))?;
    let parts = hh.f_to_kind(Kind::Float)?.f_chunk(2, -1)?;
    let want = parts[0].f_mul(&parts[1].f_gelu("none")?)?;
    let ref16 = {
        let p = hh.f_chunk(2, -1)?;
        p[0].f_mul(&p[1].f_gelu("none")?)?
    };
    let geglu = json!({
        "aten_bf16_rel_l2": rel_l2(&ref16, &want)?,
        "fused": if dev.is_cuda() { json!({"rel_l2": rel_l2(&aten::geglu(&hh)?, &want)?,
            "ms": ms_median(dev, 10, || Ok(aten::geglu(&hh)?))?}) } else { json!("not CUDA") },
        "aten_ms": ms_median(dev, 10, || { let p = hh.f_chunk(2, -1)?; Ok(p[0].f_mul(&p[1].f_gelu("none")?)?) })?,
    });
    // The residual add + LayerNorm kernel at the 64x64 level's token stream: the sum must be
    // ATen's bf16 sum bit for bit, the norm near fp32's.
    let (rows, n) = if tiny { (96, 64) } else { (8192, 640) };
    let (x, y) = (
        Tensor::f_randn([2, rows / 2, n], (kind, dev))?,
        Tensor::f_randn([2, rows / 2, n], (kind, dev))?,
    );
    let (w, b) = (
        Tensor::f_randn([n], (kind, dev))?
            .f_mul_scalar(0.5)?
            .f_add_scalar(1.0)?,
        Tensor::f_randn([n], (kind, dev))?.f_mul_scalar(0.1)?,
    );
    let sum16 = x.f_add(&y)?;
    let f = |t: &Tensor| t.f_to_kind(Kind::Float);
    let want = f(&sum16)?.f_layer_norm([n], Some(&f(&w)?), Some(&f(&b)?), 1e-5, false)?;
    let ref16 = sum16.f_layer_norm([n], Some(&w), Some(&b), 1e-5, false)?;
    let add_ln = json!({
        "aten_bf16_rel_l2": rel_l2(&ref16, &want)?,
        "fused": if dev.is_cuda() {
            let (xo, h) = aten::add_layer_norm(&x, &y, &w, &b, 1e-5)?;
            json!({"sum_bit_identical": xo.f_equal(&sum16)?, "rel_l2": rel_l2(&h, &want)?,
                "ms": ms_median(dev, 10, || Ok(aten::add_layer_norm(&x, &y, &w, &b, 1e-5)?.1))?})
        } else { json!("not CUDA") },
        "aten_ms": ms_median(dev, 10, || Ok(x.f_add(&y)?.f_layer_norm([n], Some(&w), Some(&b), 1e-5, false)?))?,
    });
    // (name, batch, heads, queries, keys): the UNet's self- and cross-attention at 1024².
    let shapes: &[(&str, i64, i64, i64, i64)] = if tiny {
        &[("self", 2, 2, 96, 96), ("cross", 2, 2, 96, 77)]
    } else {
        &[
            ("self_64x64", 2, 10, 4096, 4096),
            ("self_32x32", 2, 20, 1024, 1024),
            ("cross_64x64", 2, 10, 4096, 77),
            ("cross_32x32", 2, 20, 1024, 77),
        ]
    };
    let mut attn = serde_json::Map::new();
    for &(name, b, heads, lq, lk) in shapes {
        // As the model lays them out: (b, n, heads, 64) projections viewed as (b, heads, n, 64).
        let q = Tensor::f_randn([b, lq, heads, 64], (kind, dev))?.f_transpose(1, 2)?;
        let k = Tensor::f_randn([b, lk, heads, 64], (kind, dev))?.f_transpose(1, 2)?;
        let v = Tensor::f_randn([b, lk, heads, 64], (kind, dev))?.f_transpose(1, 2)?;
        let f = |t: &Tensor| t.f_to_kind(Kind::Float);
        let want = ditfleet_engine::nn::sdpa(&f(&q)?, &f(&k)?, &f(&v)?, None, false, None)?;
        let mut row = serde_json::Map::new();
        for kernel in [
            AttnKernel::Sdpa,
            AttnKernel::Cudnn,
            AttnKernel::Flash,
            AttnKernel::Efficient,
        ] {
            let r = aten::attention(&q, &k, &v, kernel)
                .map_err(anyhow::Error::from)
                .and_then(|o| {
                    Ok(json!({"rel_l2": rel_l2(&o, &want)?,
                          "ms": ms_median(dev, 20, || Ok(aten::attention(&q, &k, &v, kernel)?))?}))
                });
            row.insert(
                kernel.name().into(),
                r.unwrap_or_else(|e| json!({"error": e.to_string()})),
            );
        }
        attn.insert(name.into(), Value::Object(row));
    }
    Ok(json!({"group_norm": cases, "geglu": geglu, "add_layer_norm": add_ln, "attention": attn}))
}

/// Every UNet formulation against the fp32 UNet on the same weights, a graph replay against the
/// eager forward, and the VAE decode likewise.
pub fn models(args: &Args) -> Result<Value> {
    let dev = args.device;
    let c = if args.tiny {
        Config::tiny()
    } else {
        Config::sdxl_base()
    };
    tch::manual_seed(args.seed as i64);
    let mut u16 = Unet::new(&c, dev, Kind::BFloat16)?;
    for (name, mut t) in u16.vs.variables() {
        if t.dim() == 1 && name.contains("norm") {
            let noise = Tensor::f_randn_like(&t)?.f_mul_scalar(0.2)?;
            let noise = if name.ends_with("weight") {
                noise.f_add_scalar(1.0)?
            } else {
                noise
            };
            t.f_copy_(&noise)?;
        }
    }
    let mut u32 = {
        let _zero = ditfleet_engine::nn::NoRandomInit::new();
        Unet::new(&c, dev, Kind::Float)?
    };
    u32.vs.copy(&u16.vs)?;
    let (h, w) = (i64::from(args.size) / 8, i64::from(args.size) / 8);
    let o16 = (Kind::BFloat16, dev);
    let sample = Tensor::f_randn([2, c.in_channels, h, w], o16)?;
    let ctx = Tensor::f_randn([2, 77, c.cross_attention_dim], o16)?;
    let text = Tensor::f_randn([2, c.text_embeds_dim()], o16)?;
    let s = f64::from(args.size) as f32;
    let ids = Tensor::f_from_slice(&[s, s, 0., 0., s, s])?
        .f_reshape([1, 6])?
        .f_expand([2, 6], false)?
        .f_to_device(dev)?;
    let t = Tensor::from(500.0f32).f_to_device(dev)?;
    let f = |x: &Tensor| x.f_to_kind(Kind::Float);
    let want = u32.forward(&f(&sample)?, &t, &f(&ctx)?, &f(&text)?, &f(&ids)?)?;
    drop(u32);
    let mut unet = serde_json::Map::new();
    for spec in [
        "reference",
        "cl",
        "fused",
        "qkv",
        "cl,fused,qkv",
        "cl,fused,addln,qkv",
        "cl,fused,addln,cbias,qkv",
        "cl,fused,qkv,attn=cudnn",
        "cl,fused,qkv,attn=flash",
        "cl,fused,qkv,attn=efficient",
    ] {
        u16.set_perf(Perf::parse(spec).map_err(anyhow::Error::msg)?)?;
        let r = u16
            .forward(&sample, &t, &ctx, &text, &ids)
            .map_err(anyhow::Error::from)
            .and_then(|o| Ok(json!(rel_l2(&o, &want)?)));
        unet.insert(spec.into(), r.unwrap_or_else(|e| json!({"error": e.to_string()})));
    }
    // The fused bias (+ residual) add claims ATen's bits: with and without it, the same output.
    u16.set_perf(Perf::parse("cl,fused,addln,qkv").map_err(anyhow::Error::msg)?)?;
    let without = u16.forward(&sample, &t, &ctx, &text, &ids)?;
    u16.set_perf(Perf::parse("cl,fused,addln,cbias,qkv").map_err(anyhow::Error::msg)?)?;
    let cbias_bit_identical = u16.forward(&sample, &t, &ctx, &text, &ids)?.equal(&without);
    unet.insert("cbias_bit_identical".into(), json!(cbias_bit_identical));
    let eager = u16.forward(&sample, &t, &ctx, &text, &ids)?;
    let graphs = StepGraphs::default();
    let fwd = |x: &[Tensor]| u16.forward(&x[0], &x[1], &x[2], &x[3], &x[4]);
    let inputs = [&sample, &t, &ctx, &text, &ids];
    let first = graphs.run(&inputs, &fwd)?;
    let replay = graphs.run(&inputs, &fwd)?;
    let graph = json!({"captures_replays": graphs.counts(), "first_equals_eager": first.equal(&eager),
                       "replay_equals_eager": replay.equal(&eager)});
    drop((graphs, u16));
    let vcfg = if args.tiny {
        ditfleet_engine::flux::vae::Config {
            block_out_channels: vec![16, 16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..vae::config()
        }
    } else {
        vae::config()
    };
    let d16 = Decoder::new(&vcfg, dev, Kind::BFloat16)?;
    let mut d32 = Decoder::new(&vcfg, dev, Kind::Float)?;
    d32.vs.copy(&d16.vs)?;
    let z = Tensor::f_randn([1, 4, h, w], o16)?;
    let want = d32.decode(&f(&z)?)?;
    drop(d32);
    let vae = Vae { decoder: d16 };
    let mut vae_rows = serde_json::Map::new();
    for spec in ["reference", "cl", "fused", "cl,fused", "cl,fused,cbias"] {
        let perf = Perf::parse(spec).map_err(anyhow::Error::msg)?;
        set_conv_layout(&vae.decoder.vs, perf.channels_last)?;
        let r = vae
            .decode_fast(&z, &perf)
            .map_err(anyhow::Error::from)
            .and_then(|o| Ok(json!(rel_l2(&o, &want)?)));
        vae_rows.insert(spec.into(), r.unwrap_or_else(|e| json!({"error": e.to_string()})));
    }
    Ok(
        json!({"unet_rel_l2_vs_fp32": unet, "graph": graph, "vae_rel_l2_vs_fp32": vae_rows,
              "note": "bf16 formulations against the fp32 UNet/VAE (reference formulation) on the same weights"}),
    )
}
