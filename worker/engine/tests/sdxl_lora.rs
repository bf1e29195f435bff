//! Per-job LoRA on SDXL against diffusers 0.42.1 (`StableDiffusionXLPipeline.load_lora_weights`,
//! `set_adapters`, `fuse_lora`; goldens of tests/fixtures/gen_sdxl_lora_goldens.py in
//! tests/goldens/sdxl_lora_small): a PEFT adapter on every Linear of the UNet, the resnets'
//! 3x3 and 1x1 convolutions and both text encoders, a kohya adapter under the original
//! single-file module names (`lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…`), and the
//! two stacked with weights, on the committed small SDXL pipeline. Through the engine
//! (`GenerateRequest::loras` with the files), one device and `cfg=2` on the threads backend;
//! plus the base weights after a job, interleaved stacks, and bad adapters.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ditfleet_engine::models::sdxl::pipeline::SdxlPipeline;
use ditfleet_engine::models::sdxl::{PipelineOptions, Weights};
use ditfleet_engine::models::{self};
use ditfleet_engine::parallel::{ParallelPipeline, ThreadsFactory};
use ditfleet_engine::{Control, Engine, EngineError, GenerateRequest, LoraRef};
use tch::{Device, Kind, Tensor};

const LATENT_TOL: f64 = 1e-4;

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(goldens().join("sdxl_lora_small/manifest.json")).unwrap())
        .unwrap()
}

fn load() -> SdxlPipeline {
    SdxlPipeline::load_with(
        &goldens().join("sdxl_pipeline_small/pipeline"),
        &Weights::Diffusers,
        PipelineOptions::new(Device::Cpu, Kind::Float),
    )
    .unwrap()
}

fn adapter(name: &str, scale: f32) -> LoraRef {
    LoraRef {
        name: name.into(),
        version: "1".into(),
        scale,
        path: Some(goldens().join(format!("sdxl_lora_small/{name}.safetensors"))),
        checksum: Some("0123abcd".into()),
    }
}

/// The stack of a golden case, as gen_sdxl_lora_goldens.py's CASES has it.
fn stack(case: &str) -> Vec<LoraRef> {
    manifest()["cases"][case]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            adapter(
                e["adapter"].as_str().unwrap(),
                e["scale"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn request(loras: Vec<LoraRef>) -> GenerateRequest {
    let run = &manifest()["run"];
    GenerateRequest {
        model: "sdxl-base".into(),
        prompt: run["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().map(str::to_string),
        width: run["width"].as_u64().unwrap() as u32,
        height: run["height"].as_u64().unwrap() as u32,
        steps: run["num_inference_steps"].as_u64().unwrap() as u32,
        guidance: run["guidance_scale"].as_f64().unwrap() as f32,
        true_cfg_scale: 1.0,
        seed: run["seed"].as_u64().unwrap(),
        plan: None,
        scheduler: Some("euler".into()),
        loras,
    }
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    (&g - &w).norm().double_value(&[]) / w.norm().double_value(&[]).max(1e-30)
}

/// Every variable's bytes (UNet and both text encoders).
fn snapshot(p: &SdxlPipeline) -> BTreeMap<String, Tensor> {
    let mut all = BTreeMap::new();
    for (c, vs) in [
        ("unet", &p.unet.vs),
        ("text_encoder", &p.text.text_encoder.vs),
        ("text_encoder_2", &p.text.text_encoder_2.vs),
    ] {
        for (n, t) in vs.variables() {
            all.insert(
                format!("{c}.{n}"),
                t.flatten(0, -1).view_dtype(Kind::Uint8).copy(),
            );
        }
    }
    all
}

fn variable(p: &SdxlPipeline, name: &str) -> Tensor {
    let (c, rest) = name.split_once('.').unwrap();
    let vs = match c {
        "unet" => &p.unet.vs,
        "text_encoder" => &p.text.text_encoder.vs,
        "text_encoder_2" => &p.text.text_encoder_2.vs,
        _ => panic!("{name}"),
    };
    vs.variables()[rest].shallow_clone()
}

fn assert_bit_identical(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert!(t.equal(&b[name]), "{name} differs from the base weights");
    }
}

fn run(e: &mut dyn Engine, req: &GenerateRequest) -> Result<Vec<u8>, EngineError> {
    e.generate(req, &mut |_| Control::Continue).map(|i| i.rgb)
}

/// Each case's stack, applied by the engine from the files, gives diffusers' fused weights and
/// final latents; the base run matches diffusers' base run.
#[test]
fn peft_kohya_and_stacked_adapters_match_diffusers_fused_weights_and_latents() {
    let mut p = load();
    let base = read(&goldens().join("sdxl_lora_small/base.safetensors"));
    let latents = |p: &SdxlPipeline, r: &GenerateRequest| {
        models::denoise_request(p, r, None, 0, &mut |_| {}, &mut |_| Control::Continue)
            .unwrap()
            .latents
    };
    let e = rel_l2(&latents(&p, &request(vec![])), &base["latents"]);
    assert!(e <= LATENT_TOL, "base: relative L2 error {e:.3e}");
    for case in ["one", "two", "kohya"] {
        let req = request(stack(case));
        p.apply_loras(&req).unwrap();
        let want = read(&goldens().join(format!("sdxl_lora_small/case_{case}.safetensors")));
        for (name, w) in &want {
            if name == "latents" {
                continue;
            }
            let e = rel_l2(&variable(&p, name), w);
            assert!(e <= 1e-6, "{case}: fused {name}: relative L2 error {e:.3e}");
        }
        let got = latents(&p, &req);
        let e = rel_l2(&got, &want["latents"]);
        eprintln!("{case}: final latents relative L2 error {e:.3e}");
        assert!(e <= LATENT_TOL, "{case}: relative L2 error {e:.3e}");
        assert!(
            rel_l2(&base["latents"], &want["latents"]) > 100.0 * LATENT_TOL,
            "{case}: the stack barely changes the latents"
        );
    }
}

#[test]
fn after_a_job_with_adapters_the_base_weights_are_bit_identical_and_interleaved_stacks_are_exact() {
    let mut p = load();
    let base_w = snapshot(&p);
    let base = run(&mut p, &request(vec![])).unwrap();
    let mut seen: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for case in ["two", "kohya", "one", "two", "kohya"] {
        let img = run(&mut p, &request(stack(case))).unwrap();
        if let Some(prev) = seen.get(case) {
            assert_eq!(&img, prev, "{case} changed after other stacks");
        }
        assert_ne!(img, base, "{case}");
        seen.insert(case, img);
        assert_eq!(p.lora_status().applied.len(), stack(case).len());
    }
    assert_eq!(run(&mut p, &request(vec![])).unwrap(), base);
    assert_bit_identical(&base_w, &snapshot(&p));
    let s = p.lora_status();
    assert!(s.applied.is_empty());
    assert_eq!(s.cached.len(), 2);
    assert_eq!(s.cache_misses, 2, "each file read once: {s:?}");
    let mut alone = load();
    assert_eq!(run(&mut alone, &request(stack("kohya"))).unwrap(), seen["kohya"]);
}

#[test]
fn sdxl_cfg_parallel_ranks_apply_the_stack_and_give_the_one_device_image() {
    let mut one = load();
    let mut par = ParallelPipeline::new(
        vec![load()],
        &[Device::Cpu; 2],
        "cfg=2".parse().unwrap(),
        Box::new(ThreadsFactory::cpu()),
    )
    .unwrap();
    let mut seen: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for case in ["two", "base", "kohya", "two", "base"] {
        let loras = if case == "base" { vec![] } else { stack(case) };
        let img = run(&mut par, &request(loras.clone())).unwrap();
        if let Some(prev) = seen.get(case) {
            assert_eq!(&img, prev, "cfg=2: {case} changed after other stacks");
        }
        let want = run(&mut one, &request(loras)).unwrap();
        let d = want.iter().zip(&img).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(d <= 1, "cfg=2: {case}: pixels differ from one device by {d}");
        seen.insert(case, img);
    }
    assert_ne!(seen["two"], seen["base"]);
    assert_eq!(par.lora_status().cached.len(), 2);
}

#[test]
fn a_bad_sdxl_adapter_fails_its_job_naming_the_keys_and_the_base_model_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("ditfleet-sdxl-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = load();
    let base_w = snapshot(&p);
    let base = run(&mut p, &request(vec![])).unwrap();
    // Not random: an unseeded draw here would shift the seeded draws of tests running beside it.
    let t = |s: &[i64]| Tensor::full(s, 0.01, (Kind::Float, Device::Cpu));
    let write = |name: &str, named: Vec<(&str, Tensor)>| {
        let path = dir.join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&named, &path).unwrap();
        let mut r = adapter(name, 1.0);
        r.path = Some(path);
        r
    };
    // A 3x3 conv LoRA whose kernel is 1x1: does not fit conv1.
    let conv = write(
        "conv",
        vec![
            (
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
                t(&[2, 8, 1, 1]),
            ),
            (
                "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight",
                t(&[8, 2, 1, 1]),
            ),
        ],
    );
    let unknown = write(
        "unknown",
        vec![
            ("lora_unet_input_blocks_99_1_proj_in.lora_down.weight", t(&[2, 8])),
            ("lora_unet_input_blocks_99_1_proj_in.lora_up.weight", t(&[8, 2])),
            ("lora_te3_encoder_layers_0_q.lora_down.weight", t(&[2, 8])),
            ("lora_te3_encoder_layers_0_q.lora_up.weight", t(&[8, 2])),
        ],
    );
    let half = write(
        "half",
        vec![(
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight",
            t(&[2, 16]),
        )],
    );
    for (bad, want) in [
        (conv, &["conv@1", "in_layers_2.lora_up.weight", "conv1"][..]),
        (
            unknown,
            &[
                "match nothing",
                "lora_unet_input_blocks_99_1_proj_in.lora_down.weight",
                "lora_te3_encoder_layers_0_q.lora_up.weight",
            ][..],
        ),
        (half, &["incomplete", "proj_in.lora_A.weight"][..]),
    ] {
        run(&mut p, &request(stack("one"))).unwrap();
        let m = match run(&mut p, &request(vec![adapter("peft_a", 1.0), bad.clone()])) {
            Err(EngineError::InvalidRequest(m)) => m,
            other => panic!("{}: {:?}", bad.name, other.map(|v| v.len())),
        };
        for w in want {
            assert!(m.contains(w), "{}: {m:?} should mention {w:?}", bad.name);
        }
        assert_bit_identical(&base_w, &snapshot(&p));
        assert_eq!(run(&mut p, &request(vec![])).unwrap(), base, "{}", bad.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SDXL's fast paths stack the attention projections (their variables become views of the
/// stacked weight) and convert the convolutions to channels-last: a merged stack must reach the
/// weights they read, and switching them restores the base weights first.
#[test]
fn stacked_projections_and_channels_last_convolutions_see_the_merged_stack() {
    use ditfleet_engine::models::sdxl::fast::Perf;
    let mut p = load();
    let base_w = snapshot(&p);
    let req = request(stack("two"));
    p.apply_loras(&req).unwrap();
    p.set_perf(Perf::parse("cl,qkv").unwrap()).unwrap();
    assert!(
        p.lora().applied().is_empty(),
        "switching the fast paths restores the base weights"
    );
    let restored = snapshot(&p);
    for (name, t) in &base_w {
        // Same values, whatever the layout now.
        let (c, rest) = name.split_once('.').unwrap();
        let now = variable(&p, &format!("{c}.{rest}")).contiguous();
        let then = t.view_dtype(Kind::Float).reshape(now.size());
        assert!(now.equal(&then), "{name} differs after the switch");
        assert!(restored.contains_key(name));
    }
    p.apply_loras(&req).unwrap();
    let got = models::denoise_request(&p, &req, None, 0, &mut |_| {}, &mut |_| Control::Continue)
        .unwrap()
        .latents;
    let want = read(&goldens().join("sdxl_lora_small/case_two.safetensors"));
    let e = rel_l2(&got, &want["latents"]);
    assert!(
        e <= LATENT_TOL,
        "fast paths with the stack: relative L2 error {e:.3e}"
    );
}
