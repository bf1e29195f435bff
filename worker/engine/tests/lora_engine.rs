//! Per-job LoRA through the Flux engines (`Engine::generate` with `GenerateRequest::loras`): the
//! one-device pipeline and the multi-rank engine on the threads backend (Ulysses, PipeFusion),
//! with random adapters at the tiny model's real module names written to safetensors files, as
//! the worker hands them over (a verified local file and its checksum).
//!
//! What is proved: a stack changes the image and stays applied (hot) after the job; a job without
//! adapters afterwards gets the base model's image from bit-identical base weights; interleaved
//! stacks each give the image of an engine that only ever ran that stack; a bad adapter (corrupt
//! file, NaN, wrong shape, unknown keys, no file) fails its job with the reason and leaves the
//! base weights; the engine reports what it holds; a step checkpoint resumes only under its
//! stack; every rank of a plan merges the stack into the weights it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ditfleet_engine::flux::pipeline::Pipeline;
use ditfleet_engine::flux::rng_lock;
use ditfleet_engine::flux::transformer::Config;
use ditfleet_engine::lora::flux::FluxLora;
use ditfleet_engine::lora::{Family, Format};
use ditfleet_engine::parallel::{ParallelPipeline, ThreadsFactory};
use ditfleet_engine::{Control, Engine, EngineError, GenerateRequest, LoraRef, StepCheckpoint};
use tch::{Device, Kind, Tensor};

fn config() -> Config {
    Config {
        num_heads: 4,
        axes_dim: vec![4, 6, 6],
        ..Config::tiny()
    }
}

/// 2 double + 4 single blocks: 2 PipeFusion stages.
fn pf_config() -> Config {
    Config {
        depth: 2,
        depth_single_blocks: 4,
        ..config()
    }
}

fn pipeline(c: &Config) -> Pipeline {
    Pipeline::tiny_random_with(c, 12, 5).unwrap()
}

fn request(loras: Vec<LoraRef>) -> GenerateRequest {
    GenerateRequest {
        model: "flux-dev".into(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: None,
        width: 64,
        height: 80,
        steps: 3,
        guidance: 3.5,
        true_cfg_scale: 1.0,
        plan: None,
        seed: 42,
        scheduler: None,
        loras,
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ditfleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random PEFT adapter on the modules of `family` that `pick` keeps (transformers' CLIP names
/// only, not their aliases), rank `rank`, written to `dir/<name>.safetensors`.
fn write_adapter(
    dir: &Path,
    name: &str,
    seed: i64,
    family: &FluxLora,
    pick: impl Fn(&str) -> bool,
    rank: i64,
) -> PathBuf {
    let _lock = rng_lock();
    tch::manual_seed(seed);
    let mut named = Vec::new();
    for (module, place) in family.modules(Format::Peft) {
        if module.starts_with("text_encoder.encoder.") || !pick(module) {
            continue;
        }
        let cols = family.shape(&place.slices[0].var).unwrap()[1];
        let a = Tensor::randn([rank, cols], (Kind::Float, Device::Cpu)) / (cols as f64).sqrt();
        let b = Tensor::randn([place.out, rank], (Kind::Float, Device::Cpu)) * (0.5 / (rank as f64).sqrt());
        named.push((format!("{module}.lora_A.weight"), a));
        named.push((format!("{module}.lora_B.weight"), b));
    }
    assert!(!named.is_empty());
    let path = dir.join(format!("{name}.safetensors"));
    Tensor::write_safetensors(&named, &path).unwrap();
    path
}

fn lora(name: &str, path: &Path, scale: f32) -> LoraRef {
    LoraRef {
        name: name.into(),
        version: "1".into(),
        scale,
        path: Some(path.to_path_buf()),
        checksum: Some(format!("c0ffee{}", name.len())),
    }
}

/// The adapters of these tests: `a` on every transformer and CLIP module, `b` on the double
/// blocks' attention only, `c` on the single blocks' MLP rows and the embedders.
struct Adapters {
    _dir: Scratch,
    a: PathBuf,
    b: PathBuf,
    c: PathBuf,
}

fn adapters(tag: &str, c: &Config) -> Adapters {
    let dir = Scratch::new(&format!("lora-engine-{tag}"));
    let clip = ditfleet_engine::flux::clip::Config::tiny();
    let family = FluxLora::new(c, Some(&clip));
    let a = write_adapter(&dir.0, "a", 1, &family, |_| true, 4);
    let b = write_adapter(&dir.0, "b", 2, &family, |m| m.contains(".attn."), 2);
    let cc = write_adapter(
        &dir.0,
        "c",
        3,
        &family,
        |m| m.contains("proj_mlp") || m.contains("embedder"),
        3,
    );
    Adapters {
        _dir: dir,
        a,
        b,
        c: cc,
    }
}

fn run(e: &mut dyn Engine, req: &GenerateRequest) -> Result<Vec<u8>, EngineError> {
    e.generate(req, &mut |_| Control::Continue).map(|i| i.rgb)
}

/// Every variable's bytes (transformer and CLIP).
fn snapshot(p: &Pipeline) -> BTreeMap<String, Tensor> {
    let mut all = BTreeMap::new();
    let clip = p.resident_clip().unwrap();
    for (c, vs) in [("transformer", &p.transformer.vs), ("clip", &clip.vs)] {
        for (n, t) in vs.variables() {
            all.insert(
                format!("{c}.{n}"),
                t.flatten(0, -1).view_dtype(Kind::Uint8).copy(),
            );
        }
    }
    all
}

fn assert_bit_identical(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert!(t.equal(&b[name]), "{name} differs from the base weights");
    }
}

fn worst(a: &[u8], b: &[u8]) -> i16 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (i16::from(*x) - i16::from(*y)).abs())
        .max()
        .unwrap()
}

#[test]
fn a_stack_changes_the_image_stays_hot_and_a_plain_job_after_it_gets_the_base_weights_and_image() {
    let c = config();
    let ad = adapters("hot", &c);
    let mut p = pipeline(&c);
    let base_w = snapshot(&p);
    let base = run(&mut p, &request(vec![])).unwrap();
    let stack = vec![lora("a", &ad.a, 0.8), lora("b", &ad.b, -0.5)];
    let with = run(&mut p, &request(stack.clone())).unwrap();
    assert!(worst(&with, &base) > 10, "the stack barely changes the image");
    let s = p.lora_status();
    assert_eq!(s.applied.len(), 2);
    assert_eq!((s.applied[0].name.as_str(), s.applied[0].scale), ("a", 0.8));
    assert!(s.applied.iter().all(|r| r.path.is_none()));
    assert_eq!((s.cache_hits, s.cache_misses), (0, 2));
    assert_eq!(s.cached.len(), 2);
    assert!(s.cached.contains(&"b@1".to_string()), "{:?}", s.cached);
    assert!(s.cache_bytes > 0 && s.cache_capacity_bytes >= s.cache_bytes);
    assert!(s.last_apply_ms > 0.0);
    // The same stack again: hot, nothing read or merged, the same image.
    let again = run(&mut p, &request(stack.clone())).unwrap();
    assert_eq!(again, with);
    let s = p.lora_status();
    assert_eq!((s.cache_hits, s.cache_misses, s.last_apply_ms), (0, 2, 0.0));
    assert_eq!(s.applied.len(), 2, "the stack stays applied after its job");
    // A plain job: base weights, bit for bit, and the base image.
    let plain = run(&mut p, &request(vec![])).unwrap();
    assert_eq!(plain, base);
    assert_bit_identical(&base_w, &snapshot(&p));
    assert!(p.lora_status().applied.is_empty());
    // The model seam's one-device run (which cannot apply a stack) refuses a request whose stack
    // is not the applied one rather than give the base model's image.
    let m = match ditfleet_engine::models::denoise_request(
        &p,
        &request(stack.clone()),
        None,
        0,
        &mut |_| {},
        &mut |_| Control::Continue,
    ) {
        Err(EngineError::InvalidRequest(m)) => m,
        other => panic!("ran a stack that was not applied: {}", other.is_ok()),
    };
    assert!(m.contains("not the one merged"), "{m}");
    // Back to the stack: read from the host cache this time.
    assert_eq!(run(&mut p, &request(stack)).unwrap(), with);
    assert_eq!(p.lora_status().cache_hits, 2);
}

#[test]
fn interleaved_stacks_on_one_engine_give_the_images_of_engines_that_only_ran_them() {
    let c = config();
    let ad = adapters("interleaved", &c);
    let stacks: Vec<Vec<LoraRef>> = vec![
        vec![lora("a", &ad.a, 1.0)],
        vec![lora("b", &ad.b, 0.7), lora("c", &ad.c, 1.5)],
        vec![lora("a", &ad.a, 0.5)], // another scale: another stack
    ];
    let mut shared = pipeline(&c);
    let mut seen: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for i in [0, 1, 2, 0, 1, 2, 1] {
        let img = run(&mut shared, &request(stacks[i].clone())).unwrap();
        if let Some(prev) = seen.get(&i) {
            assert_eq!(&img, prev, "stack {i} changed after other stacks");
        }
        seen.insert(i, img);
    }
    for (i, img) in &seen {
        let mut alone = pipeline(&c);
        assert_eq!(
            &run(&mut alone, &request(stacks[*i].clone())).unwrap(),
            img,
            "stack {i}: differs from an engine that only ran it"
        );
    }
}

fn invalid(r: Result<Vec<u8>, EngineError>) -> String {
    match r {
        Err(EngineError::InvalidRequest(m)) => m,
        other => panic!("expected an invalid request, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn a_bad_adapter_fails_its_job_with_the_reason_and_the_engine_keeps_serving_the_base_model() {
    let c = config();
    let ad = adapters("bad", &c);
    let dir = &ad._dir.0;
    let mut p = pipeline(&c);
    let base_w = snapshot(&p);
    let base = run(&mut p, &request(vec![])).unwrap();
    let good = run(&mut p, &request(vec![lora("a", &ad.a, 1.0)])).unwrap();
    // Not random: an unseeded draw here would shift the seeded draws of tests running beside it.
    let t = |s: &[i64]| Tensor::full(s, 0.01, (Kind::Float, Device::Cpu));
    let write = |name: &str, named: Vec<(&str, Tensor)>| {
        let path = dir.join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&named, &path).unwrap();
        path
    };
    let garbage = dir.join("corrupt.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file").unwrap();
    let nan = write(
        "nan",
        vec![
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                t(&[2, 64]).fill(f64::NAN),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                t(&[64, 2]),
            ),
        ],
    );
    let wide = write(
        "wide",
        vec![
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                t(&[2, 65]),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                t(&[64, 2]),
            ),
        ],
    );
    let unknown = write(
        "unknown",
        vec![
            (
                "transformer.transformer_blocks.9.attn.to_q.lora_A.weight",
                t(&[2, 64]),
            ),
            (
                "transformer.transformer_blocks.9.attn.to_q.lora_B.weight",
                t(&[64, 2]),
            ),
            (
                "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
                t(&[2, 32]),
            ),
            (
                "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight",
                t(&[32, 2]),
            ),
        ],
    );
    let huge = write(
        "huge",
        vec![
            (
                "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                t(&[2, 64]).ones_like() * 1e25,
            ),
            (
                "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight",
                t(&[256, 2]).ones_like() * 1e25,
            ),
        ],
    );
    let mut no_path = lora("a", &ad.a, 1.0);
    no_path.path = None;
    no_path.checksum = Some("other".into());
    let mut escape = lora("a", &ad.a, 1.0);
    escape.name = "../a".into();
    let cases: Vec<(LoraRef, &[&str])> = vec![
        (lora("corrupt", &garbage, 1.0), &["corrupt@1"]),
        (lora("nan", &nan, 1.0), &["nan@1", "to_q.lora_A.weight", "NaN"]),
        (
            lora("wide", &wide, 1.0),
            &["wide@1", "to_q.lora_B.weight", "img_attn.qkv"],
        ),
        (
            lora("unknown", &unknown, 1.0),
            &[
                "match nothing",
                "transformer.transformer_blocks.9.attn.to_q.lora_A.weight",
                "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight",
            ],
        ),
        (
            lora("huge", &huge, 1.0),
            &["NaN or Inf", "single_blocks.0.linear1"],
        ),
        (no_path, &["no local file"]),
        (escape, &["name must be"]),
    ];
    for (bad, want) in cases {
        // After the good stack (hot), a stack holding the bad adapter: the job fails naming it.
        run(&mut p, &request(vec![lora("a", &ad.a, 1.0)])).unwrap();
        let m = invalid(run(&mut p, &request(vec![lora("a", &ad.a, 1.0), bad.clone()])));
        for w in want {
            assert!(m.contains(w), "{}: {m:?} should mention {w:?}", bad.name);
        }
        assert!(p.lora_status().applied.is_empty(), "{}", bad.name);
        assert_bit_identical(&base_w, &snapshot(&p));
        assert_eq!(run(&mut p, &request(vec![])).unwrap(), base, "{}", bad.name);
    }
    // And stacks still apply afterwards.
    assert_eq!(run(&mut p, &request(vec![lora("a", &ad.a, 1.0)])).unwrap(), good);
}

#[test]
fn a_step_checkpoint_resumes_only_under_the_stack_it_was_written_with() {
    let c = config();
    let ad = adapters("checkpoint", &c);
    let mut p = pipeline(&c);
    let mut req = request(vec![lora("a", &ad.a, 1.0)]);
    req.steps = 4;
    let mut saved: Vec<StepCheckpoint> = Vec::new();
    let want = p
        .generate_resumable(&req, None, 2, &mut |c| saved.push(c), &mut |_| Control::Continue)
        .unwrap();
    let ck = saved.first().expect("a checkpoint at step 2").clone();
    for other in [vec![], vec![lora("a", &ad.a, 0.9)], vec![lora("b", &ad.b, 1.0)]] {
        let mut r = req.clone();
        r.loras = other;
        match p.generate_resumable(&r, Some(&ck), 0, &mut |_| {}, &mut |_| Control::Continue) {
            Err(EngineError::BadCheckpoint(m)) => assert!(m.contains("a@1"), "{m}"),
            other => panic!("resumed under another stack: {:?}", other.map(|i| i.rgb.len())),
        }
    }
    // From base weights (another job ran meanwhile) the same stack resumes to the same image.
    run(&mut p, &request(vec![])).unwrap();
    let got = p
        .generate_resumable(&req, Some(&ck), 0, &mut |_| {}, &mut |_| Control::Continue)
        .unwrap();
    assert_eq!(got.rgb, want.rgb);
    // The multi-rank engine refuses it under another stack too.
    let mut par = ParallelPipeline::new(
        vec![pipeline(&c)],
        &[Device::Cpu; 2],
        "ulysses=2".parse().unwrap(),
        Box::new(ThreadsFactory::cpu()),
    )
    .unwrap();
    let r = request(vec![]);
    assert!(matches!(
        par.generate_resumable(&r, Some(&ck), 0, &mut |_| {}, &mut |_| Control::Continue),
        Err(EngineError::BadCheckpoint(_))
    ));
}

/// A multi-rank engine on 2 CPU "devices" with the threads backend.
fn threads_engine(c: &Config, plan: &str) -> ParallelPipeline<Pipeline> {
    ParallelPipeline::new(
        vec![pipeline(c)],
        &[Device::Cpu; 2],
        plan.parse().unwrap(),
        Box::new(ThreadsFactory::cpu()),
    )
    .unwrap()
}

/// On a plan, interleaved stacks give each the image of an engine of that plan that only ran it,
/// a plain job the base image, and (sequence parallel, exact up to rounding) the one-device image.
fn check_plan(c: &Config, plan: &str, tag: &str) {
    let ad = adapters(tag, c);
    let stacks: Vec<Vec<LoraRef>> = vec![
        vec![],
        vec![lora("a", &ad.a, 1.0)],
        vec![lora("b", &ad.b, 0.7), lora("c", &ad.c, 1.5)],
    ];
    let mut e = threads_engine(c, plan);
    let mut seen: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for i in [1, 2, 0, 1, 2, 0] {
        let img = run(&mut e, &request(stacks[i].clone())).unwrap();
        if let Some(prev) = seen.get(&i) {
            assert_eq!(&img, prev, "{plan}: stack {i} changed after other stacks");
        }
        seen.insert(i, img);
    }
    assert!(
        worst(&seen[&1], &seen[&0]) > 10,
        "{plan}: the stack barely changes the image"
    );
    let s = e.lora_status();
    assert!(s.applied.is_empty() && s.cached.len() == 3, "{s:?}");
    for i in [1, 2] {
        let mut alone = threads_engine(c, plan);
        assert_eq!(
            run(&mut alone, &request(stacks[i].clone())).unwrap(),
            seen[&i],
            "{plan}: stack {i} differs from an engine that only ran it"
        );
        if plan.starts_with("ulysses") {
            let mut one = pipeline(c);
            let want = run(&mut one, &request(stacks[i].clone())).unwrap();
            let d = worst(&want, &seen[&i]);
            assert!(d <= 1, "{plan}: stack {i} differs from one device by {d}");
        }
    }
}

#[test]
fn ulysses_ranks_each_merge_the_stack_and_give_the_one_device_image() {
    check_plan(&config(), "ulysses=2", "ulysses");
}

#[test]
fn pipefusion_stages_each_merge_their_blocks_and_interleaved_stacks_stay_exact() {
    check_plan(&pf_config(), "pipefusion=2", "pipefusion");
}

/// A plan switch hands the leader back and splits it again: the leader must go back with its
/// base weights (the new replicas are copies of it), and the engine's adapter cache survives.
#[test]
fn a_plan_switch_after_a_stack_splits_the_base_weights_and_keeps_the_cache() {
    use ditfleet_engine::parallel::ResilientParallel;
    let c = config();
    let ad = adapters("switch", &c);
    let mut one = pipeline(&c);
    let base = run(&mut one, &request(vec![])).unwrap();
    let with_a = run(&mut one, &request(vec![lora("a", &ad.a, 1.0)])).unwrap();
    let mut e = ResilientParallel::new(
        vec![Device::Cpu; 2],
        "ulysses=2".parse().unwrap(),
        Box::new(move |_| Pipeline::tiny_random_with(&config(), 12, 5)),
        Box::new(|_| Box::new(ThreadsFactory::cpu())),
        None,
    )
    .unwrap();
    let mut req = request(vec![lora("a", &ad.a, 1.0)]);
    let first = run(&mut e, &req).unwrap();
    assert!(
        worst(&first, &with_a) <= 1,
        "ulysses=2 with the stack differs from one device by {} (from the base image by {})",
        worst(&first, &with_a),
        worst(&first, &base)
    );
    req.plan = Some("ring=2".into());
    req.loras.clear();
    let got = run(&mut e, &req).unwrap();
    assert_eq!(e.plan().map(|p| p.to_string()).as_deref(), Some("ring=2"));
    assert!(
        worst(&got, &base) <= 1,
        "the new plan's replicas kept the merged stack"
    );
    req.loras = vec![lora("a", &ad.a, 1.0)];
    assert!(worst(&run(&mut e, &req).unwrap(), &with_a) <= 1);
    // The ranks resolve the stack through the engine's one cache, counted once per job: read for
    // the first job, found for the last.
    let s = e.lora_status();
    assert_eq!((s.cache_misses, s.cache_hits), (1, 1), "{s:?}");
    assert_eq!(s.cached, ["a@1"]);
}

/// A stack that only one PipeFusion stage cannot merge (its product overflows in a block that
/// stage holds) fails the job with the reason on every plan, the other ranks are released, and
/// the engine serves the base model and other stacks afterwards.
#[test]
fn a_bad_adapter_on_a_plan_fails_the_job_with_its_reason_and_the_plan_keeps_serving() {
    let c = pf_config();
    let ad = adapters("plan-bad", &c);
    let huge = ad._dir.0.join("huge.safetensors");
    let big = |s: &[i64]| Tensor::full(s, 1e25, (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[
            (
                "transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight",
                big(&[2, 64]),
            ),
            (
                "transformer.single_transformer_blocks.3.proj_mlp.lora_B.weight",
                big(&[256, 2]),
            ),
        ],
        &huge,
    )
    .unwrap();
    for plan in ["ulysses=2", "pipefusion=2"] {
        let mut e = threads_engine(&c, plan);
        let base = run(&mut e, &request(vec![])).unwrap();
        let good = vec![lora("a", &ad.a, 1.0)];
        let with_a = run(&mut e, &request(good.clone())).unwrap();
        let m = invalid(run(&mut e, &request(vec![lora("huge", &huge, 1.0)])));
        assert!(
            m.contains("NaN or Inf") && m.contains("single_blocks.3.linear1"),
            "{plan}: {m}"
        );
        assert!(
            e.lora_status().applied.is_empty(),
            "{plan}: a failed job's stack is not held"
        );
        // The good stack again: merged afresh from the base weights on every rank.
        assert_eq!(run(&mut e, &request(good.clone())).unwrap(), with_a, "{plan}");
        assert_eq!(run(&mut e, &request(vec![])).unwrap(), base, "{plan}");
        assert_eq!(run(&mut e, &request(good)).unwrap(), with_a, "{plan}");
    }
}
