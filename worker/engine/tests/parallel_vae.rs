//! The patch-parallel VAE decode (`decode_patch_parallel`: row bands with halo-exchanged
//! convolutions and global GroupNorm statistics) on the in-process threads backend (CPU) against
//! the single decode: exact to fp32 reassociation in fp32, as close to fp32 as the single decode in
//! bf16.

use std::time::Duration;

use ditfleet_engine::flux::rng_lock;
use ditfleet_engine::flux::vae::{self, Decoder};
use ditfleet_engine::parallel::comm::balanced_split;
use ditfleet_engine::parallel::{ThreadComm, decode_patch_parallel};
use tch::{Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from(a.f_sub(b).unwrap().abs().max()).unwrap()
}

/// A random decoder with random GroupNorm affines (the default is weight 1, bias 0, which would
/// hide a mistake in applying them).
fn random_vae(cfg: &vae::Config, seed: i64) -> Decoder {
    let _g = tch::no_grad_guard();
    let _lock = rng_lock();
    tch::manual_seed(seed);
    let dec = Decoder::new(cfg, Device::Cpu, Kind::Float).unwrap();
    let mut names: Vec<_> = dec.vs.variables().into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut t) in names {
        if name.contains("norm") {
            let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu));
            let v = if name.ends_with("weight") {
                r * 0.3 + 1.0
            } else {
                r * 0.2
            };
            t.copy_(&v);
        }
    }
    dec
}

/// Decodes `z` split into `rows` bands, one threads rank each (each with its own copy of the
/// decoder), and stacks the bands.
fn decode_split(dec: &Decoder, z: &Tensor, rows: &[(i64, i64)]) -> Tensor {
    let comms = ThreadComm::group(rows.len(), Device::Cpu, Duration::from_secs(120));
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let d = dec.replicate(Device::Cpu).unwrap();
            let band = z.narrow(2, rows[r].0, rows[r].1).copy();
            let rows = rows.to_vec();
            std::thread::spawn(move || decode_patch_parallel(&d, &band, &c, &rows).unwrap())
        })
        .collect();
    let bands: Vec<Tensor> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    Tensor::cat(&bands, 2)
}

fn assert_split_decode_exact(cfg: &vae::Config, latent_hw: (i64, i64), splits: &[Vec<(i64, i64)>]) {
    let dec = random_vae(cfg, 11);
    let z = {
        let _lock = rng_lock();
        tch::manual_seed(12);
        Tensor::randn(
            [1, cfg.latent_channels, latent_hw.0, latent_hw.1],
            (Kind::Float, Device::Cpu),
        )
    };
    let want = tch::no_grad(|| dec.decode(&z).unwrap());
    let std = f64::try_from(want.std(true)).unwrap();
    assert!(std > 1e-3, "the reference image is not flat (std {std})");
    // 1e-5 relative to the image's peak: each band's convolutions run the algorithms oneDNN picks
    // for its shape on this CPU, so the fp32 sums are reassociated (1.1e-5 absolute on an AVX2-only
    // AMD EPYC against a peak above 1); a halo or statistics error is orders larger.
    let peak = f64::try_from(want.abs().max()).unwrap().max(1.0);
    for rows in splits {
        let got = decode_split(&dec, &z, rows);
        assert_eq!(got.size(), want.size(), "{rows:?}");
        let d = max_diff(&got, &want);
        eprintln!(
            "vae {:?} x{} latent {latent_hw:?} bands {rows:?}: max abs diff {d:.2e} (image std {std:.3}, peak {peak:.3})",
            cfg.block_out_channels, cfg.layers_per_block
        );
        assert!(
            d <= 1e-5 * peak,
            "bands {rows:?}: max abs diff {d:e} > 1e-5 x peak {peak:.3}"
        );
    }
}

#[test]
fn patch_parallel_vae_decode_matches_the_single_decode_on_the_tiny_vae() {
    let (h, w) = (10, 6);
    let mut splits: Vec<_> = [2, 3, 4].iter().map(|&n| balanced_split(h, n)).collect();
    // Unbalanced, with a 1-row band and an empty band.
    splits.push(vec![(0, 1), (1, 6), (7, 3)]);
    splits.push(vec![(0, 4), (4, 0), (4, 5), (9, 1)]);
    assert_split_decode_exact(&vae::Config::tiny(), (h, w), &splits);
    // Fewer latent rows than ranks: balanced_split leaves the last band empty.
    assert_split_decode_exact(&vae::Config::tiny(), (3, 4), &[balanced_split(3, 4)]);
}

#[test]
fn patch_parallel_vae_decode_matches_the_single_decode_on_a_wider_vae() {
    // Flux's block structure (2 resnets + 1 per up block, 32 groups, channel ratios 1:2:4:4) at
    // a quarter of its widths.
    let cfg = vae::Config {
        block_out_channels: vec![32, 64, 128, 128],
        ..vae::Config::flux()
    };
    let h = 7;
    let splits: Vec<_> = [2, 3, 4].iter().map(|&n| balanced_split(h, n)).collect();
    assert_split_decode_exact(&cfg, (h, 5), &splits);
}

#[test]
fn patch_parallel_vae_decode_matches_the_single_decode_with_sdxl_post_quant_conv() {
    // SDXL's structure (4 latent channels, a post-quant conv before the decoder) at a quarter
    // of its widths.
    let cfg = vae::Config {
        block_out_channels: vec![32, 64, 128, 128],
        ..ditfleet_engine::models::sdxl::vae::config()
    };
    let h = 7;
    let splits: Vec<_> = [2, 3].iter().map(|&n| balanced_split(h, n)).collect();
    assert_split_decode_exact(&cfg, (h, 5), &splits);
}

#[test]
fn patch_parallel_vae_decode_in_bf16_is_as_close_to_fp32_as_the_single_bf16_decode() {
    let cfg = vae::Config::tiny();
    let dec = random_vae(&cfg, 21);
    let dec16 = {
        let _zero = ditfleet_engine::flux::layers::NoRandomInit::new();
        let mut d = Decoder::new(&cfg, Device::Cpu, Kind::BFloat16).unwrap();
        d.vs.copy(&dec.vs).unwrap();
        d
    };
    let z = {
        let _lock = rng_lock();
        tch::manual_seed(22);
        Tensor::randn([1, 16, 9, 6], (Kind::Float, Device::Cpu))
    };
    let want = tch::no_grad(|| dec.decode(&z).unwrap());
    let z16 = z.to_kind(Kind::BFloat16);
    let single = tch::no_grad(|| dec16.decode(&z16).unwrap()).to_kind(Kind::Float);
    let split = decode_split(&dec16, &z16, &balanced_split(9, 4)).to_kind(Kind::Float);
    let (e_single, e_split) = (max_diff(&single, &want), max_diff(&split, &want));
    let between = max_diff(&split, &single);
    eprintln!(
        "bf16 vs fp32, max abs: single decode {e_single:.3e}, 4 bands {e_split:.3e} \
         (bands vs single bf16: {between:.3e})"
    );
    assert!(e_split <= 2.0 * e_single + 1e-2, "{e_split} vs {e_single}");
}
