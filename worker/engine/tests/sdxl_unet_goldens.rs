//! The SDXL UNet against diffusers goldens (see tests/fixtures/gen_sdxl_unet_goldens.py).
//!
//! * `small_*` tests use the committed narrow-width goldens in `tests/goldens/sdxl_unet_small`
//!   (plain `cargo test`, no Python).
//! * `real_width_*` tests use the real-width, reduced-depth goldens the generator writes to
//!   `$DITFLEET_SDXL_UNET_GOLDENS` (~1.8 GB, not committed); they are `#[ignore]`d: run them with
//!   `DITFLEET_SDXL_UNET_GOLDENS=$(tests/fixtures/sdxl_unet_goldens.sh big) cargo test -p
//!   ditfleet-engine --release --test sdxl_unet_goldens -- --ignored`.
//! * `local_small_*` compares the bf16 forward with diffusers' bf16 forward computed on THIS
//!   machine (`$DITFLEET_SDXL_UNET_LOCAL_GOLDENS`, `tests/fixtures/sdxl_unet_goldens.sh local`;
//!   `make goldens` sets it): CPU bf16 convolutions and matmuls round differently on different
//!   instruction sets (the committed bf16 output, made on another CPU, is 1.1e-2 from diffusers'
//!   own bf16 output on an AVX2-only AMD EPYC), so a bit-level bf16 golden only holds on the CPU
//!   that made it. The committed one serves a machine-independent bound instead.
//!
//! The fp32 comparisons' bar is relative L2 error <= 1e-4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ditfleet_engine::models::sdxl::unet::{Cond, Config, SingleDevice, Unet};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn small_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/sdxl_unet_small")
}

fn big_dir() -> PathBuf {
    match std::env::var_os("DITFLEET_SDXL_UNET_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => panic!(
            "DITFLEET_SDXL_UNET_GOLDENS is not set: generate the real-width goldens with \
             `tests/fixtures/sdxl_unet_goldens.sh big` and set it to the directory it prints"
        ),
    }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let num = (&got - &want).norm().double_value(&[]);
    let den = want.norm().double_value(&[]);
    assert!(den > 0.0, "reference tensor is all zeros");
    num / den
}

fn check(name: &str, got: &Tensor, want: &Tensor) {
    let e = rel_l2(got, want);
    eprintln!("{name}: relative L2 error {e:.3e}");
    assert!(e <= TOL, "{name}: relative L2 error {e:.3e} > {TOL:e}");
}

fn config(dir: &Path) -> Config {
    Config::from_json(&dir.join("unet/config.json")).unwrap()
}

fn load(dir: &Path, original_layout: bool, kind: Kind) -> Unet {
    let weights = if original_layout {
        dir.join("sd_xl_base-orig.safetensors")
    } else {
        dir.join("unet")
    };
    Unet::load(&config(dir), &weights, Device::Cpu, kind).unwrap()
}

/// The diffusers-layout model run part by part ([`Unet::embed`], [`Unet::down`], the mid block,
/// [`Unet::up`]) against diffusers' output and taps (`emb`, the last down block's output, the
/// mid block's output); returns the output.
fn diffusers_layout_by_parts(dir: &Path) -> Tensor {
    let _g = tch::no_grad_guard();
    let model = load(dir, false, Kind::Float);
    let io = read(&dir.join("unet_io.safetensors"));
    let emb = model
        .embed(&io["timestep"], &io["text_embeds"], &io["time_ids"])
        .unwrap();
    check("emb (diffusers sharded)", &emb, &io["emb"]);
    let temb_act = emb.silu();
    let c = Cond::new(&temb_act, &io["encoder_hidden_states"], &SingleDevice);
    let (down, mut skips) = model.down(&io["sample"], &c).unwrap();
    check("down_out (diffusers sharded)", &down, &io["down_out"]);
    let mid = model.mid_block.forward(&down, &c).unwrap();
    check("mid_out (diffusers sharded)", &mid, &io["mid_out"]);
    let out = model.up(&mid, &mut skips, &c).unwrap();
    assert!(
        skips.is_empty(),
        "the up path left {} skip connections",
        skips.len()
    );
    check("out (diffusers sharded)", &out, &io["out"]);
    out
}

/// The original-layout model's [`Unet::forward`] against diffusers' output; returns it.
fn original_layout_forward(dir: &Path) -> Tensor {
    let _g = tch::no_grad_guard();
    let model = load(dir, true, Kind::Float);
    let io = read(&dir.join("unet_io.safetensors"));
    let out = model
        .forward(
            &io["sample"],
            &io["timestep"],
            &io["encoder_hidden_states"],
            &io["text_embeds"],
            &io["time_ids"],
        )
        .unwrap();
    check("out (original single file)", &out, &io["out"]);
    out
}

/// Both checkpoint layouts against diffusers, and against each other: the original single-file
/// layout, mapped onto diffusers' names, loads exactly the diffusers folder's weights (and the
/// forward computes exactly its parts).
fn both_layouts(dir: &Path) {
    let by_parts = diffusers_layout_by_parts(dir);
    let original = original_layout_forward(dir);
    assert!(
        bool::try_from(original.eq_tensor(&by_parts).all()).unwrap(),
        "the original layout's forward differs from the diffusers layout's parts"
    );
}

#[test]
fn small_unet_from_sharded_diffusers_folder_and_original_single_file_matches_diffusers() {
    both_layouts(&small_dir());
}

/// A latent size that is not a multiple of 4: the downsamplers round up and the upsamplers take
/// the skip connections' sizes (diffusers' `upsample_size`).
#[test]
fn small_unet_on_a_latent_size_not_divisible_by_four_matches_diffusers() {
    let _g = tch::no_grad_guard();
    let dir = small_dir();
    let model = load(&dir, false, Kind::Float);
    let io = read(&dir.join("unet_io.safetensors"));
    let sample = &io["sample_odd"];
    assert!(sample.size()[2] % 4 != 0 && sample.size()[3] % 4 != 0);
    let out = model
        .forward(
            sample,
            &io["timestep"],
            &io["encoder_hidden_states"],
            &io["text_embeds"],
            &io["time_ids"],
        )
        .unwrap();
    check("out (odd latent size)", &out, &io["out_odd"]);
}

/// The bf16 forward on `dir`'s model and inputs: (its distance from diffusers' bf16 output there,
/// the distance of that output from diffusers' fp32 output, our distance from fp32).
fn bf16_distances(dir: &Path) -> (f64, f64, f64) {
    let _g = tch::no_grad_guard();
    let model = load(dir, false, Kind::BFloat16);
    let io = read(&dir.join("unet_io.safetensors"));
    let want = read(&dir.join("unet_io_bf16.safetensors"));
    let bf = |k: &str| io[k].to_kind(Kind::BFloat16);
    let out = model
        .forward(
            &bf("sample"),
            &io["timestep"],
            &bf("encoder_hidden_states"),
            &bf("text_embeds"),
            &bf("time_ids"),
        )
        .unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    let e = rel_l2(&out, &want["out"]);
    let e_fp32 = rel_l2(&want["out"], &io["out"]);
    let ours_fp32 = rel_l2(&out, &io["out"]);
    eprintln!(
        "unet bf16: relative L2 error {e:.3e} against diffusers bf16 (diffusers bf16 vs fp32: \
         {e_fp32:.3e}; ours vs fp32: {ours_fp32:.3e})"
    );
    (e, e_fp32, ours_fp32)
}

/// Machine-independent: our bf16 forward is about as near diffusers' fp32 output as diffusers'
/// bf16 forward is (on whichever CPU made the committed goldens). A formulation that loses
/// precision wholesale (an fp32 softmax or norm statistic left in bf16) lands well past it.
#[test]
fn small_unet_in_bf16_is_as_near_fp32_as_diffusers_in_bf16() {
    let (_, e_fp32, ours_fp32) = bf16_distances(&small_dir());
    assert!(
        ours_fp32 <= 1.5 * e_fp32,
        "bf16 unet is {ours_fp32:.3e} from fp32 (bar: 1.5 x diffusers bf16's {e_fp32:.3e})"
    );
}

/// On the CPU that made the goldens: diffusers' bf16 forward and ours run the same ops in the
/// same order, so they land far nearer each other than bf16 rounding puts either from fp32.
#[test]
#[ignore = "needs DITFLEET_SDXL_UNET_LOCAL_GOLDENS (diffusers' bf16 forward on this machine)"]
fn local_small_unet_in_bf16_matches_diffusers_in_bf16_on_this_cpu() {
    let dir = match std::env::var_os("DITFLEET_SDXL_UNET_LOCAL_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => panic!(
            "DITFLEET_SDXL_UNET_LOCAL_GOLDENS is not set: generate them with \
             `tests/fixtures/sdxl_unet_goldens.sh local` and set it to the directory it prints"
        ),
    };
    let (e, e_fp32, _) = bf16_distances(&dir);
    // The bar is half the distance bf16 rounding alone puts between diffusers' bf16 and fp32
    // outputs: the same ops in the same order land far below it, a formulation that rounds
    // differently (tanh-approximated GELU, a missed upcast) does not.
    assert!(
        e <= 0.5 * e_fp32,
        "bf16 unet relative L2 error {e:.3e} (bar: half of {e_fp32:.3e})"
    );
}

/// The committed config is the `tiny` preset, and the model it builds has the parameters the
/// generator counted.
#[test]
fn small_config_json_is_the_tiny_preset_with_diffusers_parameter_count() {
    let dir = small_dir();
    assert_eq!(config(&dir), Config::tiny());
    let versions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("versions.json")).unwrap()).unwrap();
    let model = Unet::new(&Config::tiny(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(
        model.num_parameters(),
        versions["num_parameters"].as_i64().unwrap()
    );
}

/// A checkpoint missing a tensor, or holding one the model does not have, is refused with the
/// names.
#[test]
fn strict_loading_names_missing_and_unexpected_keys() {
    let dir = small_dir();
    let tmp = std::env::temp_dir().join(format!("sdxl_unet_strict_{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("broken.safetensors");
    let mut tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(dir.join("sd_xl_base-orig.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k != "model.diffusion_model.output_blocks.5.2.conv.weight")
            .collect();
    tensors.push((
        "model.diffusion_model.input_blocks.9.0.in_layers.0.weight".into(),
        Tensor::zeros([8], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = Unet::load(&config(&dir), &file, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(
        err.contains("output_blocks.5.2.conv.weight (for up_blocks.1.upsamplers.0.conv.weight)"),
        "{err}"
    );
    assert!(
        err.contains("1 unexpected key(s): [model.diffusion_model.input_blocks.9.0"),
        "{err}"
    );
}

#[test]
#[ignore = "needs DITFLEET_SDXL_UNET_GOLDENS (real-width goldens, ~1.8 GB)"]
fn real_width_unet_from_sharded_diffusers_folder_and_original_single_file_matches_diffusers() {
    both_layouts(&big_dir());
}

#[test]
#[ignore = "needs DITFLEET_SDXL_UNET_GOLDENS (real-width goldens, ~1.8 GB)"]
fn real_width_config_builds_diffusers_parameter_count() {
    let dir = big_dir();
    let versions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("versions.json")).unwrap()).unwrap();
    let model = {
        let _zero = ditfleet_engine::flux::layers::NoRandomInit::new();
        Unet::new(&config(&dir), Device::Cpu, Kind::BFloat16).unwrap()
    };
    assert_eq!(
        model.num_parameters(),
        versions["num_parameters"].as_i64().unwrap()
    );
}
