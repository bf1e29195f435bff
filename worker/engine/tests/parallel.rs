//! Every parallel strategy on the in-process threads backend (CPU, fp32, a tiny Flux config with 4
//! heads) against the single-rank pipeline: exact strategies must match the single-rank latent
//! to 1e-5 (max abs), and the whole multi-rank engine must produce the single-rank image.
//! PipeFusion is exact while every step is a warm-up step; after that its distance is measured.

use std::sync::Arc;

use ditfleet_engine::flux::Pipeline;
use ditfleet_engine::flux::parallel::pipefusion::stage_parts;
use ditfleet_engine::flux::parallel::runner::{Conditioning, RankCtx, denoise_rank};
use ditfleet_engine::flux::transformer::{Config, Flux, Part};
use ditfleet_engine::parallel::rank::StepGate;
use ditfleet_engine::parallel::{ParallelPipeline, Plan, RankComms, ThreadsFactory};
use ditfleet_engine::{Control, Engine, EngineError, GenerateRequest};
use tch::{Device, Kind, Tensor};

fn config() -> Config {
    Config {
        num_heads: 4,
        axes_dim: vec![4, 6, 6],
        ..Config::tiny()
    }
}

/// A multi-rank engine on `n` CPU "devices" with the threads backend.
fn threads_engine(leaders: Vec<Pipeline>, n: usize, plan: Plan) -> ParallelPipeline<Pipeline> {
    ParallelPipeline::new(
        leaders,
        &vec![Device::Cpu; n],
        plan,
        Box::new(ThreadsFactory::cpu()),
    )
    .unwrap()
}

fn pipeline(t5_len: usize) -> Pipeline {
    Pipeline::tiny_random_with(&config(), t5_len, 5).unwrap()
}

/// 2 double + 4 single blocks: enough for 4 PipeFusion stages (4 stages: [d0], [d1], [s0, s1],
/// [s2, s3]; 2 stages: [d0, d1, s0], [s1, s2, s3]: cuts between double blocks, at the
/// double/single boundary and inside a stage that holds both).
fn pf_config() -> Config {
    Config {
        depth: 2,
        depth_single_blocks: 4,
        ..config()
    }
}

fn pf_pipeline(t5_len: usize) -> Pipeline {
    Pipeline::tiny_random_with(&pf_config(), t5_len, 5).unwrap()
}

fn request(true_cfg: bool) -> GenerateRequest {
    GenerateRequest {
        model: "flux-dev".into(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: true_cfg.then(|| "blurry".into()),
        // 8x8 latent of the tiny VAE -> 4x5 = 20 packed image tokens (split unevenly over 3).
        width: 64,
        height: 80,
        steps: 4,
        guidance: 3.5,
        true_cfg_scale: if true_cfg { 2.5 } else { 1.0 },
        plan: None,
        seed: 42,
        scheduler: None,
        loras: Vec::new(),
    }
}

/// The part of `src` rank `c` holds: its PipeFusion stage's blocks, or all of them.
fn copy_for(src: &Flux, c: &RankComms, plan: &Plan) -> Flux {
    let part = if plan.pipefusion > 1 {
        stage_parts(&src.config, plan.pipefusion).unwrap()[c.sp.rank()].clone()
    } else {
        Part::full(&src.config)
    };
    // Zero-initialised before the copy: drawing random weights here would race with seeded noise
    // in other tests.
    src.copy_part(&part, Device::Cpu).unwrap()
}

/// The single-rank denoised latent.
fn single(p: &Pipeline, req: &GenerateRequest) -> Tensor {
    let (txt, pooled) = p.encode_prompt(&req.prompt).unwrap();
    let neg = req
        .true_cfg()
        .then(|| p.encode_prompt(req.negative_prompt.as_ref().unwrap()).unwrap());
    p.denoise(&txt, &pooled, neg.as_ref().map(|(a, b)| (a, b)), req, &mut |_| {
        Control::Continue
    })
    .unwrap()
    .0
}

/// The latent of `plan` run on threads ranks, each with its own copy of the weights.
fn parallel(p: &Pipeline, req: &GenerateRequest, plan: Plan) -> Tensor {
    plan.validate(4, 8).unwrap();
    let comms = RankComms::build(plan.mesh(), &ThreadsFactory::cpu(), 0).unwrap();
    let (txt, pooled) = p.encode_prompt(&req.prompt).unwrap();
    let neg = req
        .true_cfg()
        .then(|| p.encode_prompt(req.negative_prompt.as_ref().unwrap()).unwrap());
    let gate = Arc::new(StepGate::default());
    for s in 1..=req.steps {
        gate.publish(s, false);
    }
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let flux = copy_for(&p.transformer, &c, &plan);
            let cond = Conditioning {
                txt: txt.copy(),
                pooled: pooled.copy(),
                neg: neg.as_ref().map(|(a, b)| (a.copy(), b.copy())),
            };
            let (req, gate, sched) = (req.clone(), gate.clone(), p.scheduler.clone());
            let scale = p.vae.config.scale_factor();
            std::thread::spawn(move || {
                let ctx = RankCtx {
                    flux: &flux,
                    comms: &c,
                    plan: &plan,
                    scheduler: &sched,
                    vae_scale: scale,
                    device: Device::Cpu,
                    kind: Kind::Float,
                    fault_at: None,
                    graphs: None,
                    resume: None,
                    checkpoints: None,
                };
                denoise_rank(&ctx, &req, &cond, &gate, None)
            })
        })
        .collect();
    let mut out = None;
    for h in handles {
        if let Some(x) = h.join().unwrap().unwrap() {
            out = Some(x);
        }
    }
    out.expect("world rank 0 returns the latent")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from(a.f_sub(b).unwrap().abs().max()).unwrap()
}

fn assert_exact(t5_len: usize, plans: &[&str], true_cfg: bool) {
    assert_exact_on(&pipeline(t5_len), t5_len, plans, true_cfg);
}

fn assert_exact_on(p: &Pipeline, t5_len: usize, plans: &[&str], true_cfg: bool) {
    let req = request(true_cfg);
    let reference = single(p, &req);
    for s in plans {
        let plan: Plan = s.parse().unwrap();
        let got = parallel(p, &req, plan);
        assert_eq!(got.size(), reference.size(), "{s}");
        let d = max_diff(&got, &reference);
        assert!(
            d <= 1e-5,
            "plan {s}, {t5_len} text tokens: max abs diff {d:e} > 1e-5"
        );
        eprintln!("plan {s:<28} text {t5_len:>2}: max abs diff {d:.2e}");
    }
}

#[test]
fn sequence_parallel_plans_match_one_rank_with_split_text() {
    // 12 text tokens: split over 2, 3 and 4 ranks.
    assert_exact(
        12,
        &[
            "ulysses=2",
            "ulysses=4",
            "ring=2",
            "ring=3",
            "ring=4",
            "ring=2,ulysses=2",
        ],
        false,
    );
}

#[test]
fn sequence_parallel_plans_match_one_rank_with_unevenly_split_and_replicated_text() {
    // 13 text tokens: split unevenly (7 + 6, 4 + 3 + 3 + 3), or held whole by every rank with
    // text=replicated (keys counted once).
    assert_exact(
        13,
        &[
            "ulysses=2",
            "ulysses=4",
            "ring=2",
            "ring=4",
            "ring=2,ulysses=2",
            "ulysses=2,text=replicated",
            "ring=4,text=replicated",
            "ring=2,ulysses=2,text=replicated",
        ],
        false,
    );
    assert_exact(
        12,
        &["ulysses=2,text=replicated", "ring=4,text=replicated"],
        false,
    );
}

#[test]
fn cfg_parallel_matches_sequential_true_cfg() {
    assert_exact(
        12,
        &[
            "cfg=2",
            "cfg=2,ulysses=2",
            "cfg=2,ring=2",
            "cfg=2,ring=2,ulysses=2",
        ],
        true,
    );
    // Sequence parallel with true CFG run on the same ranks, one after the other.
    assert_exact(12, &["ulysses=2", "ring=2"], true);
}

#[test]
fn cfg_parallel_plan_refuses_a_request_without_true_cfg() {
    let p = pipeline(12);
    let mut e = threads_engine(vec![pipeline(12)], 2, "cfg=2".parse().unwrap());
    drop(p);
    let err = e
        .generate(&request(false), &mut |_| Control::Continue)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidRequest(ref m) if m.contains("needs true CFG")),
        "{err}"
    );
    // The engine recovers: a true-CFG request on the same plan succeeds afterwards.
    e.generate(&request(true), &mut |_| Control::Continue).unwrap();
}

fn assert_same_image(want: &[u8], got: &[u8], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}");
    let worst = want
        .iter()
        .zip(got)
        .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "{what}: pixel values differ by {worst}");
}

#[test]
fn parallel_engine_produces_the_single_rank_image_and_reports_every_step() {
    let mut one = pipeline(12);
    let req = request(false);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    // The VAE decode is patch-parallel by default (8x10 latent = 5 packed rows: bands of 3+2,
    // 2+1+1+1 and 2+2+1 packed rows); `vae=single` decodes on the leader.
    for s in ["ulysses=2", "ring=2,ulysses=2", "ring=3", "ulysses=2,vae=single"] {
        let plan: Plan = s.parse().unwrap();
        let mut e = threads_engine(vec![pipeline(12)], 4, plan);
        assert_eq!(e.info().parallel_degree as usize, plan.group_size());
        let mut steps = Vec::new();
        let got = e
            .generate(&req, &mut |ev| {
                steps.push(ev.step);
                Control::Continue
            })
            .unwrap();
        assert_eq!(steps, vec![1, 2, 3, 4], "{s}");
        assert_same_image(&want.rgb, &got.rgb, s);
    }
}

#[test]
fn cfg_parallel_engine_decodes_on_the_first_branch_only() {
    let mut one = pipeline(12);
    let req = request(true);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    let mut e = threads_engine(vec![pipeline(12)], 4, "cfg=2,ulysses=2".parse().unwrap());
    let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_same_image(&want.rgb, &got.rgb, "cfg=2,ulysses=2");
}

#[test]
fn data_parallel_groups_generate_different_images_of_a_batch() {
    let mut one = pipeline(12);
    let reqs: Vec<GenerateRequest> = (0..3)
        .map(|i| GenerateRequest {
            seed: 100 + i,
            ..request(false)
        })
        .collect();
    let want: Vec<_> = reqs
        .iter()
        .map(|r| one.generate(r, &mut |_| Control::Continue).unwrap().rgb)
        .collect();
    let mut e = threads_engine(
        vec![pipeline(12), pipeline(12)],
        4,
        "dp=2,ulysses=2".parse().unwrap(),
    );
    let got = e.generate_batch(&reqs, &mut |_| Control::Continue).unwrap();
    assert_eq!(got.len(), 3);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let worst = g
            .rgb
            .iter()
            .zip(w)
            .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "image {i}: pixel values differ by {worst}");
    }
    assert_ne!(got[0].rgb, got[1].rgb, "different seeds give different images");
}

#[test]
fn cancel_stops_every_rank_at_the_same_step() {
    let mut e = threads_engine(vec![pipeline(12)], 2, "ring=2".parse().unwrap());
    let err = e
        .generate(&request(false), &mut |ev| {
            if ev.step == 2 {
                Control::Cancel
            } else {
                Control::Continue
            }
        })
        .unwrap_err();
    // The ranks learn the driver's decision one step late (they do not wait for it before
    // launching the next step): every rank stops after step 3.
    assert!(matches!(err, EngineError::Cancelled { step: 3 }), "{err}");
    // The ranks are still in step with each other: the next job runs.
    e.generate(&request(false), &mut |_| Control::Continue).unwrap();
}

#[test]
fn patch_parallel_decode_of_a_one_packed_row_image_leaves_a_rank_without_rows() {
    // 16 px high: one packed latent row, so the second rank's band is empty.
    let req = GenerateRequest {
        height: 16,
        ..request(false)
    };
    let want = pipeline(12).generate(&req, &mut |_| Control::Continue).unwrap();
    let mut e = threads_engine(vec![pipeline(12)], 2, "ring=2".parse().unwrap());
    let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!((got.width, got.height), (64, 16));
    assert_same_image(&want.rgb, &got.rgb, "ring=2, 64x16");
}

#[test]
fn pipefusion_is_exact_while_every_step_is_a_warmup_step() {
    // 4 steps, all warm-up: the stages run the whole sequence one after the other, each with its
    // own part of the blocks; the split over stages (inside the double blocks, across the
    // double/single boundary, single-only stages) must not change a bit of the math.
    let p = pf_pipeline(12);
    assert_exact_on(
        &p,
        12,
        &[
            "pipefusion=2,patches=2,warmup=4",
            "pipefusion=2,patches=4,warmup=4",
            "pipefusion=4,patches=4,warmup=4",
            "pipefusion=4,patches=8,warmup=4",
        ],
        false,
    );
    // True CFG: both prompts through the same stages (sequential), or on two pipelines.
    assert_exact_on(
        &p,
        12,
        &["pipefusion=2,warmup=4", "cfg=2,pipefusion=2,warmup=4"],
        true,
    );
}

/// `(max abs, relative L2)` of `got` against `want`.
fn distance(got: &Tensor, want: &Tensor) -> (f64, f64) {
    let rel = f64::try_from(got.f_sub(want).unwrap().norm()).unwrap() / f64::try_from(want.norm()).unwrap();
    (max_diff(got, want), rel)
}

#[test]
fn pipefusion_with_stale_kv_lands_near_one_rank() {
    let p = pf_pipeline(12);
    let with_steps = |steps| GenerateRequest {
        steps,
        ..request(false)
    };
    // The sampler's own discretisation error, 4 steps against 12: a scale for the error PipeFusion
    // adds (it must stay well below what choosing fewer steps already costs).
    let (_, discretisation) = distance(&single(&p, &with_steps(4)), &single(&p, &with_steps(12)));
    eprintln!("one rank, 4 steps vs 12 steps: rel L2 {discretisation:.3e}");
    for steps in [4, 12] {
        let req = with_steps(steps);
        let reference = single(&p, &req);
        let mut by_patches = std::collections::HashMap::new();
        for s in [
            "pipefusion=2,patches=2,warmup=1",
            "pipefusion=2,patches=4,warmup=1",
            "pipefusion=4,patches=4,warmup=1",
            "pipefusion=4,patches=8,warmup=1",
            "pipefusion=4,patches=4,warmup=2",
        ] {
            let plan: Plan = s.parse().unwrap();
            let got = parallel(&p, &req, plan);
            let (abs, rel) = distance(&got, &reference);
            eprintln!("{steps:>2} steps, plan {s:<32}: max abs {abs:.3e}, rel L2 {rel:.3e}");
            assert!(abs.is_finite() && rel.is_finite(), "{s}");
            assert!(
                abs > 0.0,
                "{s}: stale K/V should make a difference after the warm-up"
            );
            assert!(
                rel < 0.2 * discretisation,
                "{s}, {steps} steps: rel L2 {rel:.3e} is not small against the 4-vs-12-step \
                 difference {discretisation:.3e}"
            );
            // The staleness depends on the patches only: how the blocks are split over stages
            // does not change the result.
            if let Some(prev) = by_patches.insert((plan.patches, plan.warmup_steps), got.shallow_clone()) {
                assert_eq!(max_diff(&prev, &got), 0.0, "{s}: stage count changed the result");
            }
        }
    }
}

#[test]
fn pipefusion_ranks_hold_only_their_stage_weights() {
    let p = pf_pipeline(12);
    let full = p.transformer.parameters();
    let shared = {
        // time_in, vector_in, guidance_in: on every stage.
        let t = &p.transformer;
        t.vs.variables()
            .iter()
            .filter(|(n, _)| {
                ["time_in.", "vector_in.", "guidance_in."]
                    .iter()
                    .any(|x| n.starts_with(x))
            })
            .map(|(_, v)| v.numel())
            .sum::<usize>()
    };
    for stages in [2, 4] {
        let parts = stage_parts(&p.transformer.config, stages).unwrap();
        let mut total = 0;
        for (s, part) in parts.iter().enumerate() {
            let f = p.transformer.copy_part(part, Device::Cpu).unwrap();
            for name in f.vs.variables().keys() {
                let block = |prefix: &str, r: &std::ops::Range<usize>| {
                    name.strip_prefix(prefix)
                        .and_then(|x| x.split('.').next())
                        .map(|i| r.contains(&i.parse::<usize>().unwrap()))
                };
                let ok = block("double_blocks.", &part.double)
                    .or_else(|| block("single_blocks.", &part.single))
                    .unwrap_or_else(|| {
                        name.starts_with("time_in.")
                            || name.starts_with("vector_in.")
                            || name.starts_with("guidance_in.")
                            || (s == 0 && (name.starts_with("img_in.") || name.starts_with("txt_in.")))
                            || (s == stages - 1 && name.starts_with("final_layer."))
                    });
                assert!(ok, "stage {s} of {stages} holds {name}");
            }
            total += f.parameters();
        }
        assert_eq!(
            total,
            full + (stages - 1) * shared,
            "{stages} stages hold every weight once"
        );

        // The engine gives each rank (the leader too) only its stage's part.
        let e = threads_engine(
            vec![pf_pipeline(12)],
            4,
            format!("pipefusion={stages}").parse().unwrap(),
        );
        let per_rank = e.rank_parameters();
        assert_eq!(per_rank.len(), stages);
        assert_eq!(per_rank.iter().sum::<usize>(), total);
        for (s, n) in per_rank.iter().enumerate() {
            eprintln!("{stages} stages: rank {s} holds {n} of {full} weights");
            assert!(*n < full * 3 / 4, "rank {s} holds {n} of {full}");
        }
    }
}

#[test]
fn pipefusion_engine_produces_an_image_reports_every_step_and_cancels() {
    let mut one = pf_pipeline(12);
    let req = request(false);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    for (s, exact) in [
        ("pipefusion=2,warmup=4", true),
        ("pipefusion=2,patches=4,warmup=1", false),
        ("cfg=2,pipefusion=2,warmup=1", false),
    ] {
        let plan: Plan = s.parse().unwrap();
        let mut e = threads_engine(vec![pf_pipeline(12)], 4, plan);
        assert_eq!(e.info().parallel_degree as usize, plan.group_size());
        let req = if plan.cfg == 2 { request(true) } else { req.clone() };
        let mut steps = Vec::new();
        let got = e
            .generate(&req, &mut |ev| {
                steps.push(ev.step);
                Control::Continue
            })
            .unwrap();
        assert_eq!(steps, vec![1, 2, 3, 4], "{s}");
        assert_eq!(got.rgb.len(), want.rgb.len());
        if exact {
            let worst = want
                .rgb
                .iter()
                .zip(&got.rgb)
                .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
                .max()
                .unwrap();
            assert!(worst <= 1, "{s}: pixel values differ by {worst}");
        }
        // Cancel after step 2: every stage stops at the next step (the decision arrives one step
        // late), and the next job runs.
        let err = e
            .generate(&req, &mut |ev| {
                if ev.step == 2 {
                    Control::Cancel
                } else {
                    Control::Continue
                }
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled { step: 3 }), "{s}: {err}");
        let again = e.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(again.rgb, got.rgb, "{s}: deterministic after a cancelled job");
    }
}

/// GPU isolation on 4 "GPUs" (threads backend): the device in slot 2 fails at step 3; the engine
/// quarantines it, rebuilds ring=4 as ring=3 on the other three, finishes the interrupted job
/// there (the same image as one rank), reports itself degraded, and serves the next job.
#[test]
fn a_failing_device_is_quarantined_and_the_job_completes_on_the_rest() {
    use ditfleet_engine::parallel::{InjectedFault, ResilientParallel};
    let mut one = pipeline(12);
    let req = request(false);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    let mut e = ResilientParallel::new(
        vec![Device::Cpu; 4],
        "ring=4".parse().unwrap(),
        Box::new(|_| Pipeline::tiny_random_with(&config(), 12, 5)),
        Box::new(|_| Box::new(ThreadsFactory::cpu())),
        Some(InjectedFault {
            slot: 2,
            step: 3,
            hang: false,
        }),
    )
    .unwrap();
    assert_eq!(e.degraded(), None);
    let mut steps = Vec::new();
    let got = e
        .generate(&req, &mut |ev| {
            steps.push(ev.step);
            Control::Continue
        })
        .unwrap();
    assert_same_image(&want.rgb, &got.rgb, "after quarantine");
    assert_eq!(got.timings.plan.as_deref(), Some("ring=3"));
    // The failed attempt's first steps (2 or 3: rank 0 may finish step 3 before the fault aborts
    // the group), then the retry's 1-4.
    let retry = steps.len() - 4;
    assert!((2..=3).contains(&retry), "{steps:?}");
    assert_eq!(steps[retry..], [1, 2, 3, 4], "{steps:?}");
    assert_eq!(
        steps[..retry],
        (1..=retry as u32).collect::<Vec<_>>()[..],
        "{steps:?}"
    );
    let why = e.degraded().expect("degraded after a quarantine");
    assert!(
        why.contains("slot 2") && why.contains("injected device fault at step 3"),
        "{why}"
    );
    assert!(why.contains("3 of 4 devices") && why.contains("ring=3"), "{why}");
    assert_eq!(e.info().parallel_degree, 3);
    // Later jobs succeed on the remaining devices.
    let again = e.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_same_image(&want.rgb, &again.rgb, "next job");
}

#[test]
fn ulysses_plans_shrink_to_a_valid_degree_and_a_last_device_serves_alone() {
    use ditfleet_engine::parallel::{InjectedFault, ResilientParallel};
    let req = request(false);
    // 4 heads: ulysses=4 on 4 devices; losing one leaves 3, which 4 heads cannot split: the
    // engine keeps Ulysses where it divides the heads and runs the rest as Ring (ulysses=1,ring=3).
    let mut e = ResilientParallel::new(
        vec![Device::Cpu; 4],
        "ulysses=4".parse().unwrap(),
        Box::new(|_| Pipeline::tiny_random_with(&config(), 12, 5)),
        Box::new(|_| Box::new(ThreadsFactory::cpu())),
        Some(InjectedFault {
            slot: 0,
            step: 1,
            hang: false,
        }),
    )
    .unwrap();
    let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!(got.timings.plan.as_deref(), Some("ring=3"));
    assert!(e.degraded().unwrap().contains("slot 0"));
}

fn resilient(n: usize, plan: &str) -> ditfleet_engine::parallel::ResilientParallel<Pipeline> {
    ditfleet_engine::parallel::ResilientParallel::new(
        vec![Device::Cpu; n],
        plan.parse().unwrap(),
        Box::new(|_| Pipeline::tiny_random_with(&pf_config(), 12, 5)),
        Box::new(|_| Box::new(ThreadsFactory::cpu())),
        None,
    )
    .unwrap()
}

/// Strategy selection: every valid plan for 4 "GPUs" is measured at two sizes, the table is
/// written to disk and read back for the same node only, and each request then runs the
/// table's fastest plan for its size, reported in its timings, with the single-rank image.
#[test]
fn autotune_measures_every_plan_caches_the_table_and_runs_each_request_with_the_fastest() {
    use ditfleet_engine::parallel::{PlanTable, autotune};
    let mut e = resilient(4, "single");
    let mut seen = Vec::new();
    let node = PlanTable::node("4x cpu", "tiny-random");
    let table = autotune(
        &mut e,
        "flux-dev",
        &node,
        &[(64, 64), (128, 128)],
        1,
        2,
        &mut |p| {
            seen.push((p.index, p.total, p.result.plan.clone(), p.result.ms_per_step));
        },
    )
    .unwrap();
    // single; 2 devices: ulysses=2, ring=2, pipefusion=2; 3: ring=3, pipefusion=3;
    // 4: ulysses=2,ring=2, ulysses=4, ring=4, pipefusion=4 -- at each of 2 sizes.
    let plans: Vec<&str> = table.sizes[0].results.iter().map(|m| m.plan.as_str()).collect();
    assert_eq!(plans.len(), 10, "{plans:?}");
    for want in [
        "single",
        "ulysses=2",
        "ring=2",
        "ulysses=2,ring=2",
        "ulysses=4",
        "ring=4",
    ] {
        assert!(plans.contains(&want), "{want} missing from {plans:?}");
    }
    assert_eq!(seen.len(), 20);
    assert_eq!(seen.last().unwrap().0, 20);
    assert!(
        seen.iter()
            .all(|(_, total, _, ms)| *total == 20 && ms.is_some_and(|v| v > 0.0)),
        "{seen:?}"
    );
    assert_eq!(
        e.plan(),
        Some(Plan::SINGLE),
        "autotune leaves the engine on its plan"
    );
    // It still holds (and accounts for) all four devices while the plan uses one.
    assert_eq!((e.info().devices.len(), e.info().parallel_degree), (4, 1));

    let path = std::env::temp_dir().join(format!("ditfleet-autotune-{}/plans.json", std::process::id()));
    table.save(&path).unwrap();
    let back = PlanTable::load(&path, &node)
        .unwrap()
        .expect("the same node's table loads");
    assert_eq!(
        (back.node.as_str(), back.steps, back.measured_at),
        (node.as_str(), table.steps, table.measured_at)
    );
    for (a, b) in back.sizes.iter().zip(&table.sizes) {
        assert_eq!(
            (a.width, a.height, a.results.len()),
            (b.width, b.height, b.results.len())
        );
        for (x, y) in a.results.iter().zip(&b.results) {
            assert_eq!(x.plan, y.plan);
            assert!(
                (x.ms_per_step.unwrap() - y.ms_per_step.unwrap()).abs() < 1e-9,
                "{x:?} vs {y:?}"
            );
        }
    }
    assert_eq!(
        PlanTable::load(&path, &PlanTable::node("2x cpu", "tiny-random")).unwrap(),
        None
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());

    let mut one = pf_pipeline(12);
    e.set_table(Some(table.clone()));
    for (w, h) in [(64, 64), (128, 128)] {
        let req = GenerateRequest {
            width: w,
            height: h,
            ..request(false)
        };
        let best = table.best(w, h, 4, false).unwrap();
        let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(
            got.timings.plan.as_deref(),
            Some(best.to_string().as_str()),
            "{w}x{h}"
        );
        if best.pipefusion == 1 {
            let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
            assert_same_image(&want.rgb, &got.rgb, &format!("{w}x{h} with {best}"));
        }
    }
}

/// A request may name its plan: the engine switches to it (reusing the leaders' weights) and
/// back; a plan that cannot run on the node is refused with the reason, and the engine serves on.
#[test]
fn a_request_runs_the_plan_it_names_and_an_impossible_plan_is_refused_with_the_reason() {
    let mut e = resilient(4, "ring=2");
    let want = pf_pipeline(12)
        .generate(&request(false), &mut |_| Control::Continue)
        .unwrap();
    for plan in ["ulysses=4", "ulysses=2,ring=2", "single"] {
        let req = GenerateRequest {
            plan: Some(plan.into()),
            ..request(false)
        };
        let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(got.timings.plan.as_deref(), Some(plan));
        assert_same_image(&want.rgb, &got.rgb, plan);
    }
    // Without a table, a request that names no plan runs the one the engine holds.
    let got = e.generate(&request(false), &mut |_| Control::Continue).unwrap();
    assert_eq!(got.timings.plan.as_deref(), Some("single"));
    assert_eq!(e.plan_switches(), 3);
    for (plan, why) in [
        ("ring=8", "needs 8 GPUs, the node has 4"),
        ("ulysses=3", "does not divide the 4 attention heads"),
        ("warp=2", "unknown plan item"),
    ] {
        let req = GenerateRequest {
            plan: Some(plan.into()),
            ..request(false)
        };
        let err = e.generate(&req, &mut |_| Control::Continue).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m.contains(why)),
            "{plan}: {err}"
        );
    }
    let got = e.generate(&request(false), &mut |_| Control::Continue).unwrap();
    assert_same_image(&want.rgb, &got.rgb, "after refused plans");
    // The single-device pipeline refuses a multi-device plan, and accepts `single`.
    let mut one = pf_pipeline(12);
    let req = GenerateRequest {
        plan: Some("ulysses=2".into()),
        ..request(false)
    };
    let err = one.generate(&req, &mut |_| Control::Continue).unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("single device")),
        "{err}"
    );
    let req = GenerateRequest {
        plan: Some("single".into()),
        ..request(false)
    };
    one.generate(&req, &mut |_| Control::Continue).unwrap();
}

/// A device that stops answering (no error from any rank): the step watchdog aborts the groups
/// after its timeout, the health probe names the device (injected here; NVML on GPUs), the engine
/// quarantines it, finishes the interrupted job on the other three and serves the next one.
#[test]
fn a_hung_device_is_caught_by_the_step_watchdog_quarantined_and_the_job_completes() {
    use ditfleet_engine::parallel::{InjectedFault, ResilientParallel};
    let mut one = pipeline(12);
    let req = request(false);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    let mut e = ResilientParallel::new(
        vec![Device::Cpu; 4],
        "ring=4".parse().unwrap(),
        Box::new(|_| Pipeline::tiny_random_with(&config(), 12, 5)),
        Box::new(|_| Box::new(ThreadsFactory::cpu())),
        Some(InjectedFault {
            slot: 1,
            step: 2,
            hang: true,
        }),
    )
    .unwrap();
    e.set_step_timeout(std::time::Duration::from_millis(1500));
    let t = std::time::Instant::now();
    let got = e.generate(&req, &mut |_| Control::Continue).unwrap();
    let took = t.elapsed();
    assert_same_image(&want.rgb, &got.rgb, "after the hang");
    assert_eq!(got.timings.plan.as_deref(), Some("ring=3"));
    assert!(
        took >= std::time::Duration::from_millis(1500),
        "{took:?}: the watchdog waited"
    );
    let why = e.degraded().expect("degraded after a quarantine");
    assert!(
        why.contains("slot 1")
            && why.contains("stopped answering")
            && why.contains("no step finished within"),
        "{why}"
    );
    let again = e.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_same_image(&want.rgb, &again.rgb, "next job");
}

/// Step checkpoints under a parallel plan: written every 2 steps and at a cancel, assembled from
/// the ranks' slices (with each rank's scheduler state), and resumable on the same plan, on
/// another plan and on one device, each giving the uninterrupted image.
#[test]
fn parallel_plans_write_step_checkpoints_that_resume_on_any_plan_to_the_same_image() {
    use ditfleet_engine::StepCheckpoint;
    use ditfleet_engine::checkpoint::LoopState;
    let mut req = request(false);
    req.steps = 6;
    let mut one = pipeline(12);
    let want = one.generate(&req, &mut |_| Control::Continue).unwrap();
    for s in ["ulysses=2", "ring=2,ulysses=2", "ring=3"] {
        let plan: Plan = s.parse().unwrap();
        let mut e = threads_engine(vec![pipeline(12)], 4, plan);
        let mut saved: Vec<StepCheckpoint> = Vec::new();
        let err = e
            .generate_resumable(&req, None, 2, &mut |c| saved.push(c), &mut |ev| {
                if ev.step == 3 {
                    Control::Cancel
                } else {
                    Control::Continue
                }
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled { step: 4 }), "{s}: {err}");
        assert_eq!(saved.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 4], "{s}");
        let state = LoopState::from_bytes(&saved[0].bytes).unwrap();
        assert_eq!(
            state.scheduler.len(),
            plan.mesh().sp(),
            "{s}: one scheduler part per slice"
        );
        assert_eq!(state.latents.size()[1], 5 * 4, "{s}: the whole packed sample");
        for c in &saved {
            let got = e
                .generate_resumable(&req, Some(c), 0, &mut |_| {}, &mut |_| Control::Continue)
                .unwrap();
            assert_same_image(&want.rgb, &got.rgb, &format!("{s} resumed after step {}", c.step));
            let mut other = threads_engine(vec![pipeline(12)], 2, "ring=2".parse().unwrap());
            let got = other
                .generate_resumable(&req, Some(c), 0, &mut |_| {}, &mut |_| Control::Continue)
                .unwrap();
            assert_same_image(
                &want.rgb,
                &got.rgb,
                &format!("{s} -> ring=2 after step {}", c.step),
            );
            let got = one
                .generate_resumable(&req, Some(c), 0, &mut |_| {}, &mut |_| Control::Continue)
                .unwrap();
            assert_same_image(
                &want.rgb,
                &got.rgb,
                &format!("{s} -> one device after step {}", c.step),
            );
        }
    }
    // And the other way: a one-device checkpoint resumes on a plan.
    let mut saved = Vec::new();
    one.generate_resumable(&req, None, 3, &mut |c| saved.push(c), &mut |_| Control::Continue)
        .unwrap();
    let mut e = threads_engine(vec![pipeline(12)], 2, "ulysses=2".parse().unwrap());
    let got = e
        .generate_resumable(&req, Some(&saved[0]), 0, &mut |_| {}, &mut |_| Control::Continue)
        .unwrap();
    assert_same_image(&want.rgb, &got.rgb, "one device -> ulysses=2");
}

#[test]
fn pipefusion_writes_step_checkpoints_and_resumes_from_them() {
    use ditfleet_engine::StepCheckpoint;
    let mut req = request(false);
    req.steps = 6;
    // All warm-up: PipeFusion is exact, so its resumed image is the uninterrupted one.
    let plan: Plan = "pipefusion=2,warmup=6".parse().unwrap();
    let mut e = threads_engine(vec![pf_pipeline(12)], 2, plan);
    let want = e.generate(&req, &mut |_| Control::Continue).unwrap();
    let mut saved: Vec<StepCheckpoint> = Vec::new();
    e.generate_resumable(&req, None, 2, &mut |c| saved.push(c), &mut |_| Control::Continue)
        .unwrap();
    assert_eq!(saved.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 4]);
    for c in &saved {
        let mut steps = Vec::new();
        let got = e
            .generate_resumable(&req, Some(c), 0, &mut |_| {}, &mut |ev| {
                steps.push(ev.step);
                Control::Continue
            })
            .unwrap();
        assert_eq!(steps, ((c.step + 1)..=6).collect::<Vec<_>>());
        assert_same_image(
            &want.rgb,
            &got.rgb,
            &format!("pipefusion resumed after step {}", c.step),
        );
    }
    // With stale K/V (patched steps) a resumed run warms up again and lands near the
    // uninterrupted image.
    let plan: Plan = "pipefusion=2,patches=2,warmup=1".parse().unwrap();
    let mut e = threads_engine(vec![pf_pipeline(12)], 2, plan);
    let want = e.generate(&req, &mut |_| Control::Continue).unwrap();
    let mut saved: Vec<StepCheckpoint> = Vec::new();
    e.generate_resumable(&req, None, 3, &mut |c| saved.push(c), &mut |_| Control::Continue)
        .unwrap();
    let got = e
        .generate_resumable(&req, Some(&saved[0]), 0, &mut |_| {}, &mut |_| Control::Continue)
        .unwrap();
    let worst = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (i16::from(*x) - i16::from(*y)).abs())
            .max()
            .unwrap()
    };
    // PipeFusion's own staleness is the yardstick: the resumed run (which warms up again) may
    // differ from the uninterrupted one by no more than that run differs from one device.
    let exact = pf_pipeline(12)
        .generate(&req, &mut |_| Control::Continue)
        .unwrap();
    let (resumed, stale) = (worst(&want.rgb, &got.rgb), worst(&exact.rgb, &want.rgb));
    eprintln!("stale K/V: uninterrupted vs one device {stale}/255, resumed vs uninterrupted {resumed}/255");
    assert!(stale > 0, "patched steps use stale K/V");
    assert!(
        resumed <= stale,
        "resumed PipeFusion image differs by {resumed}/255 (staleness {stale}/255)"
    );
}

#[test]
fn fp8_layers_keep_every_exact_plan_at_the_fp8_single_rank() {
    // Per-token activation scales and per-channel weight scales do not depend on how the tokens
    // are split, and PipeFusion's stages copy the FP8 layers as they are. What can differ is
    // fp32 rounding noise (Ring's merged partial attention) that moves a value across an e4m3
    // rounding boundary: 1 part in 16 of one operand. So each plan must be either within 1e-5
    // of the FP8 single rank or at most a tenth of FP8's own distance from full precision away
    // (CPU: the FP8 arithmetic emulated in fp32).
    let mut p = pf_pipeline(12);
    let req = request(false);
    let full = single(&p, &req);
    p.quantize_fp8().unwrap();
    assert!(p.transformer.is_fp8());
    let reference = single(&p, &req);
    let rel = |a: &Tensor, b: &Tensor| f64::try_from((a - b).norm() / b.norm()).unwrap();
    let fp8_err = rel(&reference, &full);
    assert!(
        fp8_err > 1e-6,
        "the FP8 pipeline computes what the full-precision one does"
    );
    for s in [
        "ulysses=2",
        "ulysses=4",
        "ring=2",
        "ulysses=2,ring=2",
        "pipefusion=2,warmup=4",
    ] {
        let plan: Plan = s.parse().unwrap();
        let got = parallel(&p, &req, plan);
        let (d, r) = (max_diff(&got, &reference), rel(&got, &reference));
        eprintln!("fp8 plan {s:<22}: max abs diff {d:.2e}, rel L2 {r:.2e} (fp8 vs full {fp8_err:.2e})");
        assert!(
            d <= 1e-5 || r <= fp8_err / 10.0,
            "fp8 plan {s}: max abs diff {d:e}, rel L2 {r:e} against fp8's own {fp8_err:e}"
        );
    }
    let mut cfg_req = request(true);
    cfg_req.steps = 2;
    let reference = single(&p, &cfg_req);
    let got = parallel(&p, &cfg_req, "cfg=2".parse().unwrap());
    assert!(max_diff(&got, &reference) <= 1e-5, "fp8 cfg=2");
}

#[test]
fn a_parallel_fp8_engine_reports_fp8_and_refuses_a_lora_job_with_the_reason() {
    let mut p = pipeline(12);
    p.quantize_fp8().unwrap();
    let mut e = threads_engine(vec![p], 2, "ulysses=2".parse().unwrap());
    assert_eq!(e.info().precision, ditfleet_engine::Precision::Fp8);
    let mut req = request(false);
    req.loras = vec![ditfleet_engine::LoraRef {
        name: "style".into(),
        version: "v1".into(),
        scale: 1.0,
        path: None,
        checksum: None,
    }];
    match e.generate(&req, &mut |_| Control::Continue) {
        Err(EngineError::InvalidRequest(m)) => assert!(m.contains("fp8"), "{m}"),
        Err(other) => panic!("expected InvalidRequest, got {other:?}"),
        Ok(_) => panic!("a LoRA job ran on an fp8 engine"),
    }
    req.loras.clear();
    e.generate(&req, &mut |_| Control::Continue).unwrap();
}
