//! LoRA merging (`ditfleet_engine::lora`) against diffusers 0.42.1 (`load_lora_weights`,
//! `set_adapters`, `fuse_lora`), on the committed small Flux pipeline with random adapters at the
//! real key names in both formats (tests/fixtures/gen_lora_goldens.py writes
//! `tests/goldens/lora_small`), and the properties the worker relies on: bit-exact restore, errors
//! that name the offending keys, no half-applied stack after an error, interleaved stacks, and
//! PipeFusion stages merging only their own weights.
//!
//! All fp32 on CPU; outputs within 1e-4 relative L2 of diffusers'.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ditfleet_engine::flux::clip::{self, ClipTextModel};
use ditfleet_engine::flux::parallel::pipefusion::stage_parts;
use ditfleet_engine::flux::transformer::{self, Flux};
use ditfleet_engine::lora::flux::{FluxLora, weights};
use ditfleet_engine::lora::{
    Adapter, AdapterKey, Applier, ApplyOptions, LoraError, MergeKernel, Weights, split_bf16,
};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    (&g - &w).norm().double_value(&[]) / w.norm().double_value(&[]).max(1e-30)
}

/// The small pipeline's transformer and CLIP text encoder (diffusers layout), fp32 on CPU.
struct Models {
    flux: Flux,
    clip: ClipTextModel,
}

impl Models {
    fn load(kind: Kind) -> Self {
        let p = goldens().join("small/pipeline");
        let tc = transformer::Config::from_diffusers_json(&p.join("transformer/config.json")).unwrap();
        let flux = Flux::load(&tc, &p.join("transformer"), Device::Cpu, kind).unwrap();
        let cc = clip::Config::from_json(&p.join("text_encoder/config.json")).unwrap();
        let clip = ClipTextModel::load(&cc, &p.join("text_encoder"), Device::Cpu, kind).unwrap();
        Self { flux, clip }
    }

    fn family(&self) -> Arc<FluxLora> {
        Arc::new(FluxLora::new(&self.flux.config, Some(&self.clip.config)))
    }

    fn applier(&self) -> Applier {
        Applier::new(
            self.family(),
            weights(&self.flux, Some(&self.clip)),
            ApplyOptions::default(),
        )
    }

    /// Transformer output on small/transformer_io's inputs and CLIP pooled output on
    /// small/clip_io's ids.
    fn run(&self) -> (Tensor, Tensor) {
        let _g = tch::no_grad_guard();
        let io = read(&goldens().join("small/transformer_io.safetensors"));
        let ids = Tensor::cat(&[&io["txt_ids"], &io["img_ids"]], 0);
        let k = self.flux.kind();
        let out = self
            .flux
            .forward(
                &io["img"].to_kind(k),
                &ids,
                &io["txt"].to_kind(k),
                &io["timestep"],
                &io["pooled"].to_kind(k),
                Some(&io["guidance"]),
            )
            .unwrap();
        let cio = read(&goldens().join("small/clip_io.safetensors"));
        let (_, pooled) = self.clip.forward(&cio["input_ids"]).unwrap();
        (out, pooled)
    }

    /// Every variable's bytes (transformer and CLIP).
    fn snapshot(&self) -> BTreeMap<String, Tensor> {
        let mut all = BTreeMap::new();
        for (c, vs) in [("transformer", &self.flux.vs), ("text_encoder", &self.clip.vs)] {
            for (n, t) in vs.variables() {
                all.insert(
                    format!("{c}.{n}"),
                    t.flatten(0, -1).view_dtype(Kind::Uint8).copy(),
                );
            }
        }
        all
    }
}

fn assert_bit_identical(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert!(t.equal(&b[name]), "{name} differs");
    }
}

fn adapter(name: &str) -> Arc<Adapter> {
    let path = goldens().join(format!("lora_small/{name}.safetensors"));
    Arc::new(Adapter::load(AdapterKey::new(name, "1", "golden"), &path, false).unwrap())
}

/// The stack of a golden case, as gen_lora_goldens.py's CASES has it.
fn stack(case: &str) -> Vec<(Arc<Adapter>, f64)> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(goldens().join("lora_small/manifest.json")).unwrap())
            .unwrap();
    manifest["cases"][case]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                adapter(e["adapter"].as_str().unwrap()),
                e["scale"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The case's stack merged into the small pipeline gives diffusers' fused outputs and weights.
fn check_case(case: &str) {
    let m = Models::load(Kind::Float);
    let mut applier = m.applier();
    let report = applier.apply(&stack(case)).unwrap();
    assert!(report.touched > 0 && report.elsewhere == 0, "{report:?}");
    let (out, pooled) = m.run();
    let want = read(&goldens().join(format!("lora_small/case_{case}.safetensors")));
    let base = read(&goldens().join("lora_small/base.safetensors"));
    for (what, got, w, b) in [
        ("transformer output", &out, &want["out"], &base["out"]),
        ("clip pooled output", &pooled, &want["pooled"], &base["pooled"]),
    ] {
        let e = rel_l2(got, w);
        eprintln!("{case}: {what}: relative L2 error {e:.3e}");
        assert!(e <= TOL, "{case}: {what}: relative L2 error {e:.3e} > {TOL:e}");
        // The stack moves the output far more than the tolerance: a missing term would show.
        assert!(
            rel_l2(b, w) > 100.0 * TOL,
            "{case}: {what}: the adapters barely change it"
        );
    }
    for (name, w) in &want {
        if let Some(var) = applier.weights().get(name) {
            let e = rel_l2(var, w);
            assert!(e <= 1e-6, "{case}: fused {name}: relative L2 error {e:.3e}");
        } else {
            assert!(name == "out" || name == "pooled", "{name} is no variable");
        }
    }
}

#[test]
fn one_peft_adapter_on_transformer_and_text_encoder_matches_diffusers() {
    check_case("one");
}

#[test]
fn two_peft_adapters_stacked_with_weights_match_diffusers() {
    check_case("two");
}

#[test]
fn kohya_adapter_with_text_encoder_modules_matches_diffusers() {
    check_case("kohya");
}

#[test]
fn base_weights_are_bit_identical_after_restore() {
    let m = Models::load(Kind::Float);
    let before = m.snapshot();
    let mut applier = m.applier();
    applier.apply(&stack("two")).unwrap();
    assert!(
        !m.snapshot()["transformer.single_blocks.0.linear1.weight"]
            .equal(&before["transformer.single_blocks.0.linear1.weight"])
    );
    applier.apply(&stack("kohya")).unwrap(); // a switch: from the originals, not from "two"
    let r = applier.restore().unwrap();
    assert!(r.restored > 0 && applier.applied().is_empty());
    assert_bit_identical(&before, &m.snapshot());
    let (out, pooled) = m.run();
    let base = read(&goldens().join("lora_small/base.safetensors"));
    assert!(rel_l2(&out, &base["out"]) <= TOL && rel_l2(&pooled, &base["pooled"]) <= TOL);
}

#[test]
fn applying_the_applied_stack_again_is_free_and_a_new_scale_is_a_new_stack() {
    let m = Models::load(Kind::Float);
    let mut applier = m.applier();
    let s = stack("one");
    assert!(!applier.apply(&s).unwrap().hot);
    let again = applier.apply(&s).unwrap();
    assert!(again.hot && again.touched == 0, "{again:?}");
    let rescaled = vec![(s[0].0.clone(), 0.5)];
    let r = applier.apply(&rescaled).unwrap();
    assert!(!r.hot && r.touched > 0);
}

#[test]
fn interleaved_stacks_each_give_their_own_output() {
    let shared = Models::load(Kind::Float);
    let mut applier = shared.applier();
    let mut outputs = BTreeMap::new();
    for case in ["one", "kohya", "two", "one", "two", "kohya"] {
        applier.apply(&stack(case)).unwrap();
        let (out, pooled) = shared.run();
        if let Some((o, p)) = outputs.get(case) {
            assert!(
                out.equal(o) && pooled.equal(p),
                "{case} changed after other stacks"
            );
        }
        outputs.insert(case, (out, pooled));
    }
    for (case, (out, pooled)) in &outputs {
        let alone = Models::load(Kind::Float);
        alone.applier().apply(&stack(case)).unwrap();
        let (o, p) = alone.run();
        assert!(
            out.equal(&o) && pooled.equal(&p),
            "{case}: differs from a model that only ran it"
        );
    }
}

/// A copy of the tensors of an adapter file, with `edit` applied, as a new adapter.
fn edited(name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> Result<Arc<Adapter>, LoraError> {
    let path = goldens().join(format!("lora_small/{name}.safetensors"));
    let mut named = Tensor::read_safetensors(&path).unwrap();
    edit(&mut named);
    Adapter::from_tensors(AdapterKey::new(format!("{name}-edited"), "1", "x"), named).map(Arc::new)
}

#[test]
fn unknown_and_partial_keys_are_listed_in_the_error() {
    let m = Models::load(Kind::Float);
    let before = m.snapshot();
    let t = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
    // Modules the model has no weight for: a block past its depth, a made-up layer, and T5.
    let bad = edited("peft_b", |n| {
        for k in [
            "transformer.transformer_blocks.7.attn.to_q",
            "transformer.not_a_layer",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
        ] {
            n.push((format!("{k}.lora_A.weight"), t(&[3, 32])));
            n.push((format!("{k}.lora_B.weight"), t(&[32, 3])));
        }
    })
    .unwrap();
    let mut applier = m.applier();
    let err = applier
        .apply(&[(stack("one")[0].0.clone(), 1.0), (bad, 1.0)])
        .unwrap_err();
    let LoraError::Unmatched { unknown, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(unknown.len(), 6, "{unknown:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("transformer.transformer_blocks.7.attn.to_q.lora_A.weight"),
        "{msg}"
    );
    assert!(msg.contains("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"));
    assert!(applier.applied().is_empty());
    assert_bit_identical(&before, &m.snapshot());
    // Half a pair, and a kohya module of the T5 encoder (which takes no LoRA in Flux).
    let err = edited("kohya_c", |n| {
        n.retain(|(k, _)| k != "lora_unet_img_in.lora_up.weight")
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("lora_unet_img_in.lora_down.weight"),
        "{err}"
    );
    let t5 = edited("kohya_c", |n| {
        n.push((
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight".into(),
            t(&[4, 32]),
        ));
        n.push((
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight".into(),
            t(&[32, 4]),
        ));
    })
    .unwrap();
    let err = applier.apply(&[(t5, 1.0)]).unwrap_err();
    assert!(
        err.to_string()
            .contains("lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight")
    );
}

#[test]
fn a_shape_that_does_not_fit_its_target_is_rejected_naming_it() {
    let m = Models::load(Kind::Float);
    let before = m.snapshot();
    let t = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
    let wide = edited("peft_b", |n| {
        n.retain(|(k, _)| !k.starts_with("transformer.x_embedder."));
        n.push(("transformer.x_embedder.lora_A.weight".into(), t(&[3, 65])));
        n.push(("transformer.x_embedder.lora_B.weight".into(), t(&[32, 3])));
    })
    .unwrap();
    let err = m.applier().apply(&[(wide, 1.0)]).unwrap_err();
    assert!(
        matches!(&err, LoraError::Shape { key, .. } if key == "transformer.x_embedder.lora_B.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("img_in"), "{err}");
    assert_bit_identical(&before, &m.snapshot());
}

#[test]
fn a_nan_adapter_is_rejected_and_an_overflowing_stack_leaves_the_base_weights() {
    let err = edited("peft_a", |n| {
        for (k, v) in n.iter_mut() {
            if k == "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" {
                *v = v.fill(f64::NAN);
            }
        }
    })
    .unwrap_err();
    assert!(
        matches!(&err, LoraError::NonFinite { what, .. } if what.contains("to_k.lora_B")),
        "{err}"
    );
    // Finite values whose product overflows fp32: found after some weights were written.
    let m = Models::load(Kind::Float);
    let before = m.snapshot();
    let huge = edited("peft_b", |n| {
        for (k, v) in n.iter_mut() {
            if k.starts_with("transformer.single_transformer_blocks.1.proj_mlp.") {
                *v = v.ones_like() * 1e25;
            }
        }
    })
    .unwrap();
    let mut applier = m.applier();
    applier.apply(&stack("one")).unwrap();
    let err = applier.apply(&[(huge, 1.0)]).unwrap_err();
    assert!(
        matches!(&err, LoraError::NonFinite { what, .. } if what.contains("single_blocks.1.linear1")),
        "{err}"
    );
    assert!(applier.applied().is_empty());
    assert_bit_identical(&before, &m.snapshot());
    // And the applier keeps serving.
    applier.apply(&stack("one")).unwrap();
    let want = read(&goldens().join("lora_small/case_one.safetensors"));
    assert!(rel_l2(&m.run().0, &want["out"]) <= TOL);
}

#[test]
fn each_pipefusion_stage_merges_the_weights_it_holds_as_the_whole_model_does() {
    let full = Models::load(Kind::Float);
    let parts = stage_parts(&full.flux.config, 2).unwrap();
    let stages: Vec<Flux> = parts
        .iter()
        .map(|p| full.flux.copy_part(p, Device::Cpu).unwrap())
        .collect();
    let family = full.family();
    let s = stack("kohya");
    full.applier().apply(&s).unwrap();
    let merged = full.snapshot();
    for stage in &stages {
        let mut applier = Applier::new(family.clone(), weights(stage, None), ApplyOptions::default());
        let r = applier.apply(&s).unwrap();
        assert!(r.touched > 0 && r.elsewhere > 0, "{r:?}");
        for (name, t) in stage.vs.variables() {
            let got = t.flatten(0, -1).view_dtype(Kind::Uint8);
            assert!(got.equal(&merged[&format!("transformer.{name}")]), "{name}");
        }
    }
}

#[test]
fn bf16_weights_get_the_fp32_merge_rounded_once_and_restore_bit_exactly() {
    let m = Models::load(Kind::BFloat16);
    let before = m.snapshot();
    let name = "lora_unet_double_blocks_0_img_attn_qkv";
    let a = adapter("kohya_c");
    let i = a.modules.iter().position(|x| x.name == name).unwrap();
    let (down, up) = a.pair(i);
    let var = "transformer.double_blocks.0.img_attn.qkv.weight";
    let scale = 0.7;
    let coeff = scale * a.modules[i].scale();
    let w0 = m.flux.vs.variables()["double_blocks.0.img_attn.qkv.weight"].to_kind(Kind::Float);
    let want = w0 + (up * coeff).mm(&down);
    let mut applier = m.applier();
    applier.apply(&[(a, scale)]).unwrap();
    let got = applier.weights().get(var).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    assert!(
        got.equal(&want.to_kind(Kind::BFloat16)),
        "not one rounding of the fp32 merge"
    );
    applier.restore().unwrap();
    assert_bit_identical(&before, &m.snapshot());
}

#[test]
fn weights_view_names_every_variable_by_component() {
    let m = Models::load(Kind::Float);
    let w: Weights = weights(&m.flux, Some(&m.clip));
    let n = m.flux.vs.variables().len() + m.clip.vs.variables().len();
    assert_eq!(w.names().count(), n);
    assert!(
        w.get("transformer.final_layer.adaLN_modulation.1.weight")
            .is_some()
    );
    assert!(
        w.get("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight")
            .is_some()
    );
}

/// Merging in bf16 gives the fp32 merge from the same base values, rounded: for modules landing
/// on overlapping rows of one weight (PEFT `to_q` / `to_k` / `to_v` and a kohya fused `qkv`), and
/// for modules covering only some rows of one (PEFT `to_q` and `to_k` but no `to_v`: the `v` rows
/// keep their base values).
#[test]
fn bf16_merges_of_overlapping_and_partial_row_ranges_give_the_fp32_merge_rounded() {
    let _g = tch::no_grad_guard();
    let bf = Models::load(Kind::BFloat16);
    let fp = Models::load(Kind::Float);
    for (b, f) in [(&bf.flux.vs, &fp.flux.vs), (&bf.clip.vs, &fp.clip.vs)] {
        let bv = b.variables();
        for (n, mut t) in f.variables() {
            t.copy_(&bv[&n].to_kind(Kind::Float));
        }
    }
    let base = bf.snapshot();
    let (mut ab, mut af) = (bf.applier(), fp.applier());
    let overlapping = vec![(adapter("peft_a"), 0.8), (adapter("kohya_c"), 0.7)];
    let partial = vec![(adapter("peft_b"), -0.5)];
    for (stack, vars) in [
        (
            overlapping,
            &[
                "transformer.double_blocks.0.img_attn.qkv.weight",
                "transformer.single_blocks.0.linear1.weight",
                "transformer.final_layer.adaLN_modulation.1.weight",
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
            ][..],
        ),
        (
            partial,
            &[
                "transformer.double_blocks.0.img_attn.qkv.weight",
                "transformer.double_blocks.0.txt_attn.qkv.weight",
                "transformer.single_blocks.1.linear1.weight",
            ][..],
        ),
    ] {
        ab.apply(&stack).unwrap();
        af.apply(&stack).unwrap();
        for var in vars {
            let got = ab.weights().get(var).unwrap();
            let want = af.weights().get(var).unwrap().to_kind(Kind::BFloat16);
            let e = rel_l2(got, &want);
            assert!(
                e <= 1e-3,
                "{var}: relative L2 error {e:.3e} against the fp32 merge"
            );
            let before = base[*var].view_dtype(Kind::BFloat16).reshape(got.size());
            assert!(
                rel_l2(&before, &want) > 1e-2,
                "{var}: the stack barely changes it"
            );
        }
    }
    // peft_b has no to_v: those rows of img_attn.qkv are exactly the base ones.
    let qkv = "transformer.double_blocks.0.img_attn.qkv.weight";
    let h = bf.flux.config.hidden_size;
    let got = ab.weights().get(qkv).unwrap().narrow(0, 2 * h, h);
    let before = base[qkv]
        .view_dtype(Kind::BFloat16)
        .reshape([3 * h, h])
        .narrow(0, 2 * h, h);
    assert!(got.equal(&before));
}

/// Adapter tensors kept on the device between stacks (a budget that holds about one adapter, so
/// entries are evicted as stacks alternate) give the same weights as reading them each time.
#[test]
fn the_device_copy_cache_gives_the_weights_of_fresh_copies() {
    let (cached, fresh) = (Models::load(Kind::Float), Models::load(Kind::Float));
    let options = ApplyOptions {
        device_cache_bytes: 2 * adapter("peft_a").bytes(),
        ..ApplyOptions::default()
    };
    let mut a = Applier::new(
        cached.family(),
        weights(&cached.flux, Some(&cached.clip)),
        options,
    );
    let mut b = fresh.applier();
    for case in ["one", "kohya", "two", "one", "kohya"] {
        a.apply(&stack(case)).unwrap();
        b.apply(&stack(case)).unwrap();
        assert_bit_identical(&cached.snapshot(), &fresh.snapshot());
    }
}

/// The three bf16 parts of an fp32 tensor add up to it exactly, for magnitudes from 2^-100 to
/// 2^120, both signs (below about 2^-110 the last part would fall under bf16's subnormal quantum:
/// far below anything that moves a weight's rounding).
#[test]
fn split_bf16_parts_sum_exactly_to_the_fp32_value() {
    tch::manual_seed(7);
    let mantissa = Tensor::rand([4096], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let exponent = (Tensor::rand([4096], (Kind::Float, Device::Cpu)) * 220.0 - 100.0).round();
    let x = (mantissa * exponent.exp2()).to_kind(Kind::Float);
    let x = x.where_self(&x.abs().ge(2f64.powi(-100)), &Tensor::from(1.0f32));
    let [hi, mid, lo] = split_bf16(&x).unwrap();
    assert_eq!(hi.kind(), Kind::BFloat16);
    let sum = hi.to_kind(Kind::Double) + mid.to_kind(Kind::Double) + lo.to_kind(Kind::Double);
    assert!(sum.equal(&x.to_kind(Kind::Double)), "a split lost bits");
    // Not trivially: the lower parts carry bits for most values.
    assert!(i64::try_from(mid.ne(0.0).sum(Kind::Int64)).unwrap() > 3000);
}

/// The `Split` merge kernel (one bf16 GEMM per row range on exact bf16 splits, in place) gives
/// the `Fp32` kernel's bf16 weights up to the rounding of a differently ordered fp32 sum (an
/// element may differ by a bf16 rounding step of its operands' magnitude; fewer than 1% do), for
/// every stack of the goldens in turn (switching between them), and restores the base
/// bit-exactly.
///
/// Device cache budgets: none (every merge prepares its adapters and drops them), about one
/// adapter (entries evicted while a stack of several is merged must not be the stack's own), all.
#[test]
fn the_split_merge_kernel_matches_the_fp32_kernel_to_rounding_and_restores_exactly() {
    for budget in [0, 4 * adapter("peft_a").bytes(), 1 << 30] {
        split_matches_fp32(budget);
    }
}

fn split_matches_fp32(budget: usize) {
    let (split, fp) = (Models::load(Kind::BFloat16), Models::load(Kind::BFloat16));
    let before = split.snapshot();
    // Without a cache, products of a few rows at a time (the blocks' seams are exercised).
    let options = |kernel| ApplyOptions {
        kernel,
        device_cache_bytes: budget,
        split_block_bytes: if budget == 0 {
            1024
        } else {
            ApplyOptions::default().split_block_bytes
        },
        ..ApplyOptions::default()
    };
    let mut a = Applier::new(
        split.family(),
        weights(&split.flux, Some(&split.clip)),
        options(MergeKernel::Split),
    );
    let mut b = Applier::new(
        fp.family(),
        weights(&fp.flux, Some(&fp.clip)),
        options(MergeKernel::Fp32),
    );
    let (mut elements, mut differ) = (0i64, 0i64);
    for case in ["one", "kohya", "two", "one", "kohya"] {
        let ra = a.apply(&stack(case)).unwrap();
        let rb = b.apply(&stack(case)).unwrap();
        assert_eq!(ra.touched, rb.touched);
        for name in a.weights().names() {
            let (x, y) = (a.weights().get(name).unwrap(), b.weights().get(name).unwrap());
            if x.kind() != Kind::BFloat16 {
                continue;
            }
            let w0 = before[name]
                .view_dtype(Kind::BFloat16)
                .reshape(x.size())
                .to_kind(Kind::Float);
            let (xf, yf) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
            let scale = xf.abs().maximum(&yf.abs()).maximum(&w0.abs());
            let excess = ((&xf - &yf).abs() - scale * 2f64.powi(-7)).max();
            assert!(
                f64::try_from(excess).unwrap() <= 0.0,
                "{case}: {name} differs by more than a rounding step"
            );
            elements += x.numel() as i64;
            differ += i64::try_from(x.ne_tensor(y).sum(Kind::Int64)).unwrap();
        }
    }
    assert!(differ * 100 < elements, "{differ} of {elements} elements differ");
    assert!(elements > 0, "the comparison saw no element");
    a.restore().unwrap();
    assert_bit_identical(&before, &split.snapshot());
    // Restored weights equal the kept originals: the next stack merges without a copy.
    a.apply(&stack("two")).unwrap();
    a.release().unwrap();
    assert_bit_identical(&before, &split.snapshot());
}
