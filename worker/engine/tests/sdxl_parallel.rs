//! SDXL's multi-GPU pieces on the threads backend (CPU, fp32) against one device: the
//! patch-parallel UNet (2, 3 and 4 bands; uneven, empty and odd-height bands), CFG parallel and
//! `cfg=2 x patch=N` against the single-device guided prediction (with and without
//! `guidance_rescale`), and the patch-parallel SDXL VAE decode. The UNet is the committed small
//! goldens' model (SDXL's block structure at tiny widths, random weights and norm affines).
//! Bar: relative L2 error <= 1e-5 against one device.

use std::path::Path;
use std::time::Duration;

use ditfleet_engine::flux::rng_lock;
use ditfleet_engine::flux::vae::Decoder;
use ditfleet_engine::guidance::Guidance;
use ditfleet_engine::models::sdxl::parallel::{
    TextConditioning, decode_band, forward_patch_parallel, guided_noise, unet_rows,
};
use ditfleet_engine::models::sdxl::unet::{Config, Unet};
use ditfleet_engine::models::sdxl::vae::{self, Vae};
use ditfleet_engine::parallel::{Plan, RankComms, ThreadComm, ThreadsFactory};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn unet() -> Unet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/sdxl_unet_small/unet");
    let config = Config::from_json(&dir.join("config.json")).unwrap();
    Unet::load(&config, &dir, Device::Cpu, Kind::Float).unwrap()
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shape");
    let (got, want) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let den = want.norm().double_value(&[]);
    assert!(den > 0.0, "the reference is all zeros");
    (&got - &want).norm().double_value(&[]) / den
}

/// Seeded normal noise (under the lock other tests' seeded draws take).
fn randn(seed: i64, shapes: &[&[i64]]) -> Vec<Tensor> {
    let _lock = rng_lock();
    tch::manual_seed(seed);
    shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
        .collect()
}

/// One prompt's conditioning for the small UNet (7 text tokens).
fn text(c: &Config, seed: i64, size: (i64, i64)) -> TextConditioning {
    let t = randn(seed, &[&[1, 7, c.cross_attention_dim], &[1, c.text_embeds_dim()]]);
    let (h, w) = (8.0 * size.0 as f32, 8.0 * size.1 as f32);
    TextConditioning {
        encoder_hidden_states: t[0].shallow_clone(),
        text_embeds: t[1].shallow_clone(),
        time_ids: Tensor::from_slice(&[h, w, 0., 0., h, w]).view([1, 6]),
    }
}

fn copy(t: &TextConditioning) -> TextConditioning {
    TextConditioning {
        encoder_hidden_states: t.encoder_hidden_states.copy(),
        text_embeds: t.text_embeds.copy(),
        time_ids: t.time_ids.copy(),
    }
}

#[test]
fn patch_parallel_unet_matches_one_rank_with_uneven_empty_and_odd_bands() {
    let _g = tch::no_grad_guard();
    let model = unet();
    let c = model.config.clone();
    let t = Tensor::from(700.0f32);
    // 13 rows: levels of 13, 7 and 4 rows (odd sizes at two levels; over 4 ranks the last band
    // is 1 row); 20 rows over 3: 8 + 4 + 8; 6 rows: 2 blocks of 4 rows, so over 3 or 4 ranks
    // the last bands are empty.
    for (h, w) in [(13, 10), (20, 6), (6, 5)] {
        let sample = randn(1, &[&[1, 4, h, w]]).remove(0);
        let cond = text(&c, 2, (h, w));
        let emb = model.embed(&t, &cond.text_embeds, &cond.time_ids).unwrap();
        let want = model
            .forward(
                &sample,
                &t,
                &cond.encoder_hidden_states,
                &cond.text_embeds,
                &cond.time_ids,
            )
            .unwrap();
        for n in [2usize, 3, 4] {
            let rows = unet_rows(&c, h, n);
            let comms = ThreadComm::group(n, Device::Cpu, Duration::from_secs(120));
            let bands: Vec<Tensor> = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .iter()
                    .zip(&rows)
                    .map(|(comm, &(start, len))| {
                        let band = sample.narrow(2, start, len).copy();
                        let (emb, ctx, rows) = (emb.copy(), cond.encoder_hidden_states.copy(), &rows);
                        s.spawn(move || {
                            let m = unet();
                            forward_patch_parallel(&m, &band, &emb, &ctx, comm, rows).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let e = rel_l2(&Tensor::cat(&bands, 2), &want);
            eprintln!("UNet {h}x{w} latent, bands {rows:?}: relative L2 {e:.2e}");
            assert!(e <= TOL, "bands {rows:?}: relative L2 {e:e}");
        }
    }
}

/// Runs one guided step of `plan` on threads ranks; returns every rank's band of the guided
/// prediction, in global rank order, with its patch-group rank.
fn guided_on_plan(
    plan: &Plan,
    latents: &Tensor,
    cond: &TextConditioning,
    uncond: &TextConditioning,
    guidance: Guidance,
) -> Vec<(usize, Tensor)> {
    plan.validate_unet(8).unwrap();
    let c = unet().config;
    let rows = unet_rows(&c, latents.size()[2], plan.patch);
    let comms = RankComms::build(plan.mesh(), &ThreadsFactory::cpu(), 0).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comms| {
            let band_idx = comms.sp.rank();
            let (start, len) = rows[band_idx];
            let band = latents.narrow(2, start, len).copy();
            let (cond, uncond, rows) = (copy(cond), copy(uncond), rows.clone());
            std::thread::spawn(move || {
                let m = unet();
                let t = Tensor::from(500.0f32);
                let out = guided_noise(&m, &comms, &rows, &band, &t, &cond, Some(&uncond), &guidance);
                (band_idx, out.unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn cfg_parallel_and_cfg_times_patch_match_the_single_device_guided_prediction() {
    let _g = tch::no_grad_guard();
    let model = unet();
    let c = model.config.clone();
    let (h, w) = (13, 6);
    let latents = randn(3, &[&[1, 4, h, w]]).remove(0);
    let (cond, uncond) = (text(&c, 4, (h, w)), text(&c, 5, (h, w)));
    let t = Tensor::from(500.0f32);
    let batch = |f: &dyn Fn(&TextConditioning) -> &Tensor| Tensor::cat(&[f(&uncond), f(&cond)], 0);
    // diffusers' batch of 2, [uncond, cond].
    let out = model
        .forward(
            &Tensor::cat(&[&latents, &latents], 0),
            &t,
            &batch(&|x| &x.encoder_hidden_states),
            &batch(&|x| &x.text_embeds),
            &batch(&|x| &x.time_ids),
        )
        .unwrap();
    for guidance in [
        Guidance::Cfg {
            scale: 5.0,
            rescale: 0.0,
        },
        Guidance::Cfg {
            scale: 7.5,
            rescale: 0.7,
        },
    ] {
        let want = guidance.combine_batched(&out).unwrap();
        for plan in ["cfg=2", "cfg=2,patch=2", "patch=3"] {
            let plan: Plan = plan.parse().unwrap();
            let ranks = guided_on_plan(&plan, &latents, &cond, &uncond, guidance);
            // Each CFG branch's patch group holds the whole guided prediction.
            for branch in ranks.chunks(plan.patch) {
                assert!(branch.iter().enumerate().all(|(i, r)| r.0 == i));
                let got = Tensor::cat(&branch.iter().map(|r| r.1.shallow_clone()).collect::<Vec<_>>(), 2);
                let e = rel_l2(&got, &want);
                eprintln!("{plan} {guidance:?}: relative L2 {e:.2e}");
                assert!(e <= TOL, "{plan} {guidance:?}: relative L2 {e:e}");
            }
        }
    }
}

#[test]
fn patch_parallel_sdxl_vae_decode_matches_the_single_decode() {
    let _g = tch::no_grad_guard();
    // SDXL's VAE (4 latent channels, post-quant conv, scaling 0.13025) at a quarter of its widths.
    let cfg = ditfleet_engine::flux::vae::Config {
        block_out_channels: vec![32, 64, 128, 128],
        ..vae::config()
    };
    let (vae, z) = {
        let _lock = rng_lock();
        tch::manual_seed(9);
        let dec = Decoder::new(&cfg, Device::Cpu, Kind::Float).unwrap();
        // Random norm affines: the default weight 1, bias 0 would hide a mistake applying them.
        for (name, mut t) in dec.vs.variables() {
            if name.contains("norm") {
                let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
                t.copy_(&if name.ends_with("weight") { r + 1.0 } else { r });
            }
        }
        let z = Tensor::randn([1, 4, 7, 5], (Kind::Float, Device::Cpu));
        (Vae { decoder: dec }, z)
    };
    let want = vae.decode(&z).unwrap();
    // The UNet's bands (aligned to 4 latent rows: 4 + 3, and 4 + 3 + 0 with an empty band).
    let unet_cfg = unet().config;
    for n in [2usize, 3] {
        let rows = unet_rows(&unet_cfg, 7, n);
        let comms = ThreadComm::group(n, Device::Cpu, Duration::from_secs(120));
        let bands: Vec<Tensor> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .zip(&rows)
                .map(|(comm, &(start, len))| {
                    let v = Vae {
                        decoder: vae.decoder.replicate(Device::Cpu).unwrap(),
                    };
                    let band = z.narrow(2, start, len).copy();
                    let rows = &rows;
                    s.spawn(move || decode_band(&v, &band, comm, rows).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let e = rel_l2(&Tensor::cat(&bands, 2), &want);
        eprintln!("SDXL VAE decode, latent 7x5, bands {rows:?}: relative L2 {e:.2e}");
        assert!(e <= TOL, "bands {rows:?}: relative L2 {e:e}");
    }
}

/// A tiny SDXL request (80x64 image: a 10x8 latent, bands of 4+6 over 2 ranks, 4+4+2 over 3).
fn sdxl_request(scheduler: &str, guidance: f32) -> ditfleet_engine::GenerateRequest {
    ditfleet_engine::GenerateRequest {
        model: "sdxl-base".into(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("blurry".into()),
        width: 64,
        height: 80,
        steps: 5,
        guidance,
        true_cfg_scale: 1.0,
        plan: None,
        seed: 9,
        scheduler: Some(scheduler.into()),
        loras: Vec::new(),
    }
}

fn sdxl_engine(
    n: usize,
    plan: &str,
) -> ditfleet_engine::parallel::ParallelPipeline<ditfleet_engine::models::sdxl::pipeline::SdxlPipeline> {
    ditfleet_engine::parallel::ParallelPipeline::new(
        vec![ditfleet_engine::models::sdxl::pipeline::SdxlPipeline::tiny_random(3).unwrap()],
        &vec![Device::Cpu; n],
        plan.parse().unwrap(),
        Box::new(ThreadsFactory::cpu()),
    )
    .unwrap()
}

fn worst(a: &[u8], b: &[u8]) -> i16 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (i16::from(*x) - i16::from(*y)).abs())
        .max()
        .unwrap()
}

/// The whole multi-GPU SDXL engine (rank threads, the one denoising loop on each rank's band,
/// the CFG pair, the banded decode gathered on rank 0) gives the one-device image for every plan
/// and sampler, and reports every step.
#[test]
fn sdxl_plans_on_the_parallel_engine_give_the_one_device_image() {
    use ditfleet_engine::{Control, Engine};
    let mut one = ditfleet_engine::models::sdxl::pipeline::SdxlPipeline::tiny_random(3).unwrap();
    for (scheduler, guidance) in [
        ("euler", 5.0),
        ("dpmpp_2m_karras", 5.0),
        ("euler_a", 5.0),
        ("euler", 1.0),
    ] {
        let req = sdxl_request(scheduler, guidance);
        let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
        for plan in ["patch=2", "patch=3", "cfg=2", "cfg=2,patch=2"] {
            let n = plan.parse::<Plan>().unwrap().world();
            let mut e = sdxl_engine(n, plan);
            let mut steps = Vec::new();
            let got = e
                .generate(&req, &mut |ev| {
                    steps.push(ev.step);
                    Control::Continue
                })
                .unwrap();
            assert_eq!(steps, vec![1, 2, 3, 4, 5], "{plan} {scheduler}");
            let w = worst(&want.rgb, &got.rgb);
            assert!(
                w <= 1,
                "{plan}, {scheduler}, guidance {guidance}: pixels differ by {w}/255"
            );
            assert_eq!(got.timings.plan.as_deref(), Some(plan));
        }
    }
}

/// Step checkpoints of an SDXL plan hold every band's latents and scheduler state (DPM++ 2M keeps
/// its previous output); they resume on the same plan, and a stateless sampler's also on another
/// plan and on one device, to the uninterrupted image.
#[test]
fn sdxl_plan_checkpoints_resume_to_the_uninterrupted_image() {
    use ditfleet_engine::checkpoint::LoopState;
    use ditfleet_engine::{Control, Engine, EngineError, StepCheckpoint};
    for scheduler in ["dpmpp_2m_karras", "euler"] {
        let req = sdxl_request(scheduler, 5.0);
        let mut one = ditfleet_engine::models::sdxl::pipeline::SdxlPipeline::tiny_random(3).unwrap();
        let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
        let mut e = sdxl_engine(4, "cfg=2,patch=2");
        let mut saved: Vec<StepCheckpoint> = Vec::new();
        let err = e
            .generate_resumable(&req, None, 2, &mut |c| saved.push(c), &mut |ev| {
                if ev.step == 2 {
                    Control::Cancel
                } else {
                    Control::Continue
                }
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled { step: 3 }), "{err}");
        assert_eq!(saved.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 3]);
        let state = LoopState::from_bytes(&saved[0].bytes).unwrap();
        assert_eq!(state.scheduler.len(), 2, "one scheduler part per band");
        assert_eq!(state.latents.size(), [1, 4, 10, 8]);
        for c in &saved {
            let got = e
                .generate_resumable(&req, Some(c), 0, &mut |_| {}, &mut |_| Control::Continue)
                .unwrap();
            let w = worst(&want.rgb, &got.rgb);
            assert!(w <= 1, "{scheduler}: resumed after step {}: {w}/255", c.step);
        }
        let mut other = sdxl_engine(3, "patch=3");
        let moved =
            other.generate_resumable(&req, Some(&saved[0]), 0, &mut |_| {}, &mut |_| Control::Continue);
        let on_one =
            one.generate_resumable(&req, Some(&saved[0]), 0, &mut |_| {}, &mut |_| Control::Continue);
        if scheduler == "euler" {
            assert!(
                worst(&want.rgb, &moved.unwrap().rgb) <= 1,
                "patch=2 bands -> patch=3"
            );
            assert!(
                worst(&want.rgb, &on_one.unwrap().rgb) <= 1,
                "patch=2 bands -> one device"
            );
        } else {
            // The multistep state is per band: another split cannot take it.
            assert!(matches!(moved, Err(EngineError::BadCheckpoint(_))), "{moved:?}");
            assert!(matches!(on_one, Err(EngineError::BadCheckpoint(_))), "{on_one:?}");
        }
    }
}
