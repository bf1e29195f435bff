//! Flux with FP8 block projections (issue 20) on the CPU, where the FP8 arithmetic is emulated
//! exactly (the quantised operands dequantised to fp32): which layers are FP8, how far the
//! generation moves from the full-precision one, pre-quantised checkpoints written and read back,
//! and the jobs an FP8 version refuses. The GPU kernels' agreement with this arithmetic is checked
//! by `fp8_bench` on the device (docs/benchmarks-flux-1gpu.md).

use std::collections::BTreeMap;

use ditfleet_engine::flux::Pipeline;
use ditfleet_engine::flux::fp8::FP8_CHECKPOINT;
use ditfleet_engine::flux::transformer::Flux;
use ditfleet_engine::flux::weights::{Checkpoint, write_safetensors};
use ditfleet_engine::nn::{DeferLinearWeights, NoRandomInit, is_deferred, materialize_deferred};
use ditfleet_engine::{Control, EngineError, GenerateRequest, LoraRef, Precision};
use tch::{Device, Kind, Tensor};

fn request() -> GenerateRequest {
    GenerateRequest {
        model: "flux-dev".into(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 4,
        guidance: 3.5,
        true_cfg_scale: 1.0,
        plan: None,
        seed: 7,
        scheduler: None,
        loras: Vec::new(),
    }
}

fn latents(p: &Pipeline, req: &GenerateRequest) -> Tensor {
    let (txt, pooled) = p.encode_prompt(&req.prompt).unwrap();
    p.denoise(&txt, &pooled, None, req, &mut |_| Control::Continue)
        .unwrap()
        .0
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).norm() / b.norm()).unwrap()
}

/// One transformer forward on fixed random inputs.
fn forward(m: &Flux) -> Tensor {
    let _g = tch::no_grad_guard();
    let c = &m.config;
    let draw = |shape: &[i64], seed: i64| {
        let _lock = ditfleet_engine::flux::rng_lock();
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    };
    let img = draw(&[1, 6, c.in_channels], 1);
    let txt = draw(&[1, 5, c.context_in_dim], 2);
    let y = draw(&[1, c.vec_in_dim], 3);
    let ids = Flux::position_ids(5, 4, 6, Device::Cpu).unwrap();
    let t = Tensor::from_slice(&[0.7f32]);
    let guidance = Tensor::from_slice(&[3.5f32]);
    m.forward(&img, &ids, &txt, &t, &y, Some(&guidance)).unwrap()
}

#[test]
fn an_fp8_version_quantises_every_block_projection_and_keeps_the_rest_in_full_precision() {
    let p = Pipeline::tiny_random_precision(5, Precision::Fp8).unwrap();
    let t = &p.transformer;
    assert!(t.is_fp8());
    assert_eq!(p.precision(), Precision::Fp8);
    assert_eq!(ditfleet_engine::Engine::info(&p).precision, Precision::Fp8);
    assert_eq!(
        ditfleet_engine::Engine::info(&p).model_versions,
        ["flux-dev@tiny-random-5-fp8"]
    );
    for b in &t.double_blocks {
        for l in [&b.img_attn.qkv, &b.img_attn.proj, &b.img_mlp.fc0, &b.img_mlp.fc2] {
            assert_eq!(l.weight.kind(), Kind::Float8e4m3fn);
            let f = l.fp8.as_ref().unwrap();
            assert_eq!(f.scale.size(), [1, l.weight.size()[0]]);
        }
        for l in [&b.txt_attn.qkv, &b.txt_attn.proj, &b.txt_mlp.fc0, &b.txt_mlp.fc2] {
            assert!(l.is_fp8());
        }
        assert!(!b.img_mod.lin.is_fp8() && b.img_mod.lin.weight.kind() == Kind::Float);
    }
    for b in &t.single_blocks {
        assert!(b.linear1.is_fp8() && b.linear2.is_fp8());
        assert!(!b.modulation.lin.is_fp8());
    }
    assert!(!t.img_in.as_ref().unwrap().is_fp8());
    assert!(!t.final_layer.as_ref().unwrap().linear.is_fp8());
    // The bf16/fp32 copies of the quantised weights have left the variable store.
    let vars = t.vs.variables();
    assert!(!vars.contains_key("double_blocks.0.img_attn.qkv.weight"));
    assert!(!vars.contains_key("single_blocks.0.linear1.weight"));
    assert!(vars.contains_key("double_blocks.0.img_attn.qkv.bias"));
    assert!(vars.contains_key("double_blocks.0.img_mod.lin.weight"));
}

#[test]
fn an_fp8_generation_stays_near_the_full_precision_one_without_being_it() {
    let req = request();
    let full = latents(&Pipeline::tiny_random(5).unwrap(), &req);
    let fp8 = latents(&Pipeline::tiny_random_precision(5, Precision::Fp8).unwrap(), &req);
    let d = rel_l2(&fp8, &full);
    // e4m3 keeps 3 mantissa bits: each operand is within 1/16 of itself; over a few layers and
    // steps the latent moves by a few 1e-3 on this model.
    assert!(d > 1e-5 && d < 0.05, "fp8 vs fp32 latent rel L2 {d}");
}

#[test]
fn a_saved_fp8_checkpoint_loads_back_to_the_same_outputs_and_a_broken_one_names_its_gaps() {
    let dir = std::env::temp_dir().join(format!("ditfleet-fp8-ck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(FP8_CHECKPOINT);
    let p = Pipeline::tiny_random_precision(5, Precision::Fp8).unwrap();
    let t = &p.transformer;
    t.save_fp8(&path).unwrap();
    let ck = Checkpoint::open_file(&path).unwrap();
    assert!(Flux::is_fp8_checkpoint(&ck));
    assert_eq!(
        ck.tensors["double_blocks.0.img_attn.qkv.weight"].kind,
        Kind::Float8e4m3fn
    );
    assert_eq!(
        ck.tensors["double_blocks.0.img_attn.qkv.weight_scale"].shape,
        [t.double_blocks[0].img_attn.qkv.weight.size()[0]]
    );
    let back = Flux::load(&t.config, &path, Device::Cpu, Kind::Float).unwrap();
    assert!(back.is_fp8());
    // Built with deferred linear weights, loaded with every one filled: it holds what the
    // quantised-at-load model holds.
    assert!(back.vs.variables().values().all(|v| !is_deferred(v)));
    assert_eq!(back.weight_bytes(), t.weight_bytes());
    assert!(
        forward(&back).equal(&forward(t)),
        "reloaded fp8 model computes differently"
    );

    // Without one layer's scales: the load fails and says which layer and what is missing.
    let mut named: BTreeMap<String, Tensor> = ck
        .tensors
        .keys()
        .map(|k| (k.clone(), ck.read(k).unwrap()))
        .collect();
    named.remove("single_blocks.1.linear2.weight_scale");
    let broken = dir.join("broken.safetensors");
    write_safetensors(&named, &broken).unwrap();
    let err = Flux::load(&t.config, &broken, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("single_blocks.1.linear2") && err.contains("no weight_scale"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_lora_job_on_an_fp8_version_is_refused_with_the_reason() {
    let mut p = Pipeline::tiny_random_precision(5, Precision::Fp8).unwrap();
    let mut req = request();
    req.loras = vec![LoraRef {
        name: "style".into(),
        version: "v1".into(),
        scale: 1.0,
        path: None,
        checksum: None,
    }];
    match p.apply_loras(&req) {
        Err(EngineError::InvalidRequest(m)) => {
            assert!(m.contains("fp8") && m.contains("bf16 version"), "{m}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    // Without adapters the same pipeline generates.
    req.loras.clear();
    p.apply_loras(&req).unwrap();
}

#[test]
fn an_fp8_version_written_from_a_bf16_one_loads_as_fp8_and_generates_what_quantising_at_load_does() {
    use ditfleet_engine::flux::PipelineOptions;
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/small/pipeline");
    let dst = std::env::temp_dir().join(format!("ditfleet-fp8-version-{}", std::process::id()));
    std::fs::remove_dir_all(&dst).ok();
    let mut stages = Vec::new();
    let report =
        ditfleet_engine::flux::fp8::write_fp8_version(&src, &dst, Device::Cpu, &mut |s| stages.push(s))
            .unwrap();
    assert!(report.files > 5 && report.transformer_bytes > 0, "{report:?}");
    // Progress: the load (with its bytes), every layer quantised in turn, then the write.
    use ditfleet_engine::flux::fp8::Fp8VersionStage as S;
    assert!(
        matches!(stages.first(), Some(S::Loading { bytes }) if *bytes > 0),
        "{stages:?}"
    );
    assert_eq!(stages.last(), Some(&S::Writing), "{stages:?}");
    let quantised: Vec<(usize, usize)> = stages
        .iter()
        .filter_map(|s| match s {
            S::Quantising { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    let total = quantised.len();
    assert!(total > 0);
    assert_eq!(quantised, (1..=total).map(|d| (d, total)).collect::<Vec<_>>());
    assert!(dst.join("transformer").join(FP8_CHECKPOINT).is_file());
    assert!(dst.join("vae").is_dir() && dst.join("ditfleet.json").is_file());
    // Writing over an existing version is refused.
    let again = ditfleet_engine::flux::fp8::write_fp8_version(&src, &dst, Device::Cpu, &mut |_| {});
    assert!(again.unwrap_err().to_string().contains("exists"));

    let opts = PipelineOptions::new(Device::Cpu, Kind::Float);
    // Asked for bf16: the pre-quantised transformer still loads as fp8.
    let pre = Pipeline::load(&dst, opts.clone()).unwrap();
    assert_eq!(pre.precision(), Precision::Fp8);
    let at_load = Pipeline::load(
        &src,
        PipelineOptions {
            precision: Precision::Fp8,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(at_load.precision(), Precision::Fp8);
    let bf16 = Pipeline::load(&src, opts).unwrap();
    assert_eq!(bf16.precision(), Precision::Bf16);
    let req = request();
    let a = latents(&pre, &req);
    assert!(
        a.equal(&latents(&at_load, &req)),
        "pre-quantised and quantised-at-load differ"
    );
    assert!(!a.equal(&latents(&bf16, &req)));
    std::fs::remove_dir_all(&dst).ok();
}

#[test]
fn a_pre_quantised_load_builds_linear_weights_without_memory_until_each_is_replaced_or_filled() {
    // So loading an FP8 version never holds its bf16 block projections: the model is built with
    // deferred linear weights (one zero expanded, strides 0), the FP8 layers replace theirs, and
    // only the linear weights that stay in full precision get memory, before their values.
    let config = Pipeline::tiny_random(5).unwrap().transformer.config.clone();
    let held = |m: &Flux| -> usize {
        m.vs.variables()
            .values()
            .map(|t| {
                let n = if is_deferred(t) { 1 } else { t.numel() };
                n * t.kind().elt_size_in_bytes()
            })
            .sum()
    };
    let full = {
        let _z = NoRandomInit::new();
        Flux::new(&config, Device::Cpu, Kind::Float).unwrap()
    };
    let deferred = {
        let _z = NoRandomInit::new();
        let _d = DeferLinearWeights::new();
        Flux::new(&config, Device::Cpu, Kind::Float).unwrap()
    };
    for (name, l) in deferred.block_linears() {
        assert!(is_deferred(&l.weight), "{name} holds memory");
        assert_eq!(
            l.weight.size(),
            full.vs.variables()[&format!("{name}.weight")].size()
        );
    }
    let (a, b) = (held(&deferred), held(&full));
    assert!(a * 5 < b, "deferred build holds {a} of {b} bytes");
    // Outside the guard layers are built as usual.
    assert!(full.vs.variables().values().all(|v| !is_deferred(v)));

    let linears = deferred
        .vs
        .variables()
        .values()
        .filter(|v| is_deferred(v))
        .count();
    assert_eq!(materialize_deferred(&deferred.vs).unwrap(), linears);
    assert_eq!(held(&deferred), b);
    assert_eq!(materialize_deferred(&deferred.vs).unwrap(), 0, "idempotent");
    // The layer's own handle sees the memory the store's entry got: writing through one shows in
    // the other.
    let qkv = &deferred.double_blocks[0].img_attn.qkv.weight;
    assert!(!qkv.stride().contains(&0));
    {
        let _g = tch::no_grad_guard();
        let _ = deferred.vs.variables()["double_blocks.0.img_attn.qkv.weight"]
            .shallow_clone()
            .fill_(1.0);
    }
    assert_eq!(f64::try_from(qkv.sum(Kind::Double)).unwrap(), qkv.numel() as f64);
}
