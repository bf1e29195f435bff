//! SDXL components against diffusers/transformers goldens (tests/fixtures/gen_sdxl_goldens.py).
//!
//! * `small_*` tests use the committed reduced-width goldens in `tests/goldens/sdxl_small`
//!   (plain `cargo test`, no Python).
//! * `real_width_*` tests use the real-width, reduced-depth goldens that
//!   `tests/fixtures/sdxl_goldens.sh big` writes (~1.3 GB, not committed); they are `#[ignore]`d:
//!   `DITFLEET_SDXL_GOLDENS=$(tests/fixtures/sdxl_goldens.sh big) cargo test -p ditfleet-engine
//!   --release --test sdxl_goldens -- --ignored`.
//!
//! Comparisons are fp32 on CPU with relative L2 error <= 1e-4, except the bf16 VAE decode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ditfleet_engine::flux::tokenizer::PromptTokenizer;
use ditfleet_engine::models::sdxl::text::{PromptEmbeds, TextEncoders};
use ditfleet_engine::models::sdxl::vae::Vae;
use ditfleet_engine::models::sdxl::{Weights, keys};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;
const SINGLE_FILE: &str = "sd_xl_base-orig.safetensors";

fn small_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/sdxl_small")
}

fn big_dir() -> PathBuf {
    match std::env::var_os("DITFLEET_SDXL_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => panic!(
            "DITFLEET_SDXL_GOLDENS is not set: generate the real-width goldens with \
             `tests/fixtures/sdxl_goldens.sh big` and set DITFLEET_SDXL_GOLDENS to the directory it prints"
        ),
    }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
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

fn weights(dir: &Path, single_file: bool) -> Weights {
    if single_file {
        Weights::SingleFile(dir.join(SINGLE_FILE))
    } else {
        Weights::Diffusers
    }
}

fn text_encoders(dir: &Path, single_file: bool) -> TextEncoders {
    TextEncoders::load(
        &dir.join("pipeline"),
        &weights(dir, single_file),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

/// Each encoder's penultimate hidden state, bigG's last hidden state and projected pooled output.
fn text_encoder_case(dir: &Path, single_file: bool) {
    let _g = tch::no_grad_guard();
    let te = text_encoders(dir, single_file);
    let io = read(&dir.join("text_encoders_io.safetensors"));
    let o = te.text_encoder.encode(&io["ids"], 1).unwrap();
    let o2 = te.text_encoder_2.encode(&io["ids_2"], 1).unwrap();
    let layout = if single_file { "single file" } else { "diffusers" };
    check(
        &format!("text_encoder penultimate hidden state ({layout})"),
        &o.hidden,
        &io["penultimate"],
    );
    check(
        &format!("text_encoder last hidden state ({layout})"),
        &o.last_hidden_state,
        &io["last_hidden_state"],
    );
    check(
        &format!("text_encoder_2 penultimate hidden state ({layout})"),
        &o2.hidden,
        &io["penultimate_2"],
    );
    check(
        &format!("text_encoder_2 last hidden state ({layout})"),
        &o2.last_hidden_state,
        &io["last_hidden_state_2"],
    );
    check(
        &format!("text_encoder_2 text_embeds ({layout})"),
        o2.text_embeds.as_ref().unwrap(),
        &io["text_embeds_2"],
    );
}

fn check_embeds(name: &str, got: &PromptEmbeds, want_embeds: &Tensor, want_pooled: &Tensor) {
    if want_embeds.abs().max().double_value(&[]) == 0.0 {
        // diffusers' zeroed negative side: must be exactly zero, with the right shapes.
        assert_eq!(got.embeds.size(), want_embeds.size(), "{name}: embeds shape");
        assert_eq!(got.pooled.size(), want_pooled.size(), "{name}: pooled shape");
        assert_eq!(
            got.embeds.abs().max().double_value(&[]),
            0.0,
            "{name}: embeds not zero"
        );
        assert_eq!(
            got.pooled.abs().max().double_value(&[]),
            0.0,
            "{name}: pooled not zero"
        );
        eprintln!("{name}: zeros, as diffusers");
        return;
    }
    check(&format!("{name} embeds"), &got.embeds, want_embeds);
    check(&format!("{name} pooled"), &got.pooled, want_pooled);
}

/// `encode_prompt` on every case the generator ran (zeroed, empty, text negatives; batches).
fn encode_prompt_case(dir: &Path, single_file: bool) {
    let mut te = text_encoders(dir, single_file);
    assert!(
        te.force_zeros_for_empty_prompt,
        "model_index.json says force_zeros_for_empty_prompt"
    );
    let io = read(&dir.join("encode_prompt_io.safetensors"));
    let cases = json(&dir.join("encode_prompt_io.json"));
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompts: Vec<&str> = case["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        te.force_zeros_for_empty_prompt = case["force_zeros_for_empty_prompt"].as_bool().unwrap();
        let (pos, neg) = te
            .encode_with_negative(&prompts, case["negative"].as_str())
            .unwrap();
        let t = |k: &str| &io[&format!("{name}.{k}")];
        check_embeds(&format!("{name} positive"), &pos, t("embeds"), t("pooled"));
        check_embeds(
            &format!("{name} negative"),
            &neg,
            t("negative_embeds"),
            t("negative_pooled"),
        );
    }
}

fn vae_case(dir: &Path, single_file: bool) {
    let vae = Vae::load(
        &dir.join("pipeline"),
        &weights(dir, single_file),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let io = read(&dir.join("vae_io.safetensors"));
    let layout = if single_file { "single file" } else { "diffusers" };
    check(
        &format!("vae decode ({layout})"),
        &vae.decode(&io["latents"]).unwrap(),
        &io["sample"],
    );
}

#[test]
fn small_tokenizers_give_transformers_ids_with_tokenizer_2_padding_and_splitting_on_bang() {
    let dir = small_dir();
    let io = json(&dir.join("tokenizer_io.json"));
    let n = io["max_len"].as_u64().unwrap() as usize;
    let p = dir.join("pipeline");
    let tok = PromptTokenizer::clip_from_dir(&p.join("tokenizer"), n).unwrap();
    let tok_2 = PromptTokenizer::clip_from_dir(&p.join("tokenizer_2"), n).unwrap();
    // transformers 5 saves only tokenizer.json: the same ids from that form.
    let tok_2_json = PromptTokenizer::clip_from_dir(&dir.join("tokenizer_2_json"), n).unwrap();
    assert_eq!(tok_2.pad_id, 0, "tokenizer_2 pads with \"!\"");
    assert_ne!(tok.pad_id, 0);
    let want = |k: &str, i: usize| -> Vec<i64> {
        io[k][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for (i, prompt) in io["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        assert_eq!(
            tok.encode(prompt).unwrap(),
            want("ids", i),
            "tokenizer: {prompt:?}"
        );
        assert_eq!(
            tok_2.encode(prompt).unwrap(),
            want("ids_2", i),
            "tokenizer_2: {prompt:?}"
        );
        assert_eq!(
            tok_2_json.encode(prompt).unwrap(),
            want("ids_2", i),
            "tokenizer_2 (tokenizer.json): {prompt:?}"
        );
    }
    // The prompts include a "!" (which tokenizer_2 maps to its pad id, tokenizer to "!</w>").
    assert!(
        io["ids"] != io["ids_2"],
        "the two tokenizers should differ on these prompts"
    );
}

#[test]
fn small_text_encoders_penultimate_hidden_states_and_pooled_match_transformers() {
    text_encoder_case(&small_dir(), false);
}

#[test]
fn small_text_encoders_from_single_file_match_transformers() {
    text_encoder_case(&small_dir(), true);
}

#[test]
fn small_encode_prompt_matches_diffusers_for_zeroed_empty_and_text_negatives() {
    encode_prompt_case(&small_dir(), false);
}

#[test]
fn small_single_file_and_diffusers_folder_give_identical_prompt_embeds() {
    let _g = tch::no_grad_guard();
    let dir = small_dir();
    let prompts = [
        "a photo of a red fox sitting in the snow, 35mm",
        "Highly detailed!",
    ];
    let (a, an) = text_encoders(&dir, false)
        .encode_with_negative(&prompts, Some("blurry"))
        .unwrap();
    let (b, bn) = text_encoders(&dir, true)
        .encode_with_negative(&prompts, Some("blurry"))
        .unwrap();
    for (x, y) in [
        (&a.embeds, &b.embeds),
        (&a.pooled, &b.pooled),
        (&an.embeds, &bn.embeds),
        (&an.pooled, &bn.pooled),
    ] {
        assert!(x.equal(y), "single-file weights give different embeds");
    }
    assert_eq!(a.embeds.size(), [2, 77, 32 + 40]);
    assert_eq!(a.pooled.size(), [2, 24]);
}

#[test]
fn small_vae_decode_matches_diffusers() {
    vae_case(&small_dir(), false);
}

#[test]
fn small_vae_decode_from_single_file_matches_diffusers() {
    vae_case(&small_dir(), true);
}

/// The bf16 decode on `dir`'s VAE and latents: (its distance from diffusers' bf16 decode there, that
/// decode's distance from diffusers' fp32 decode, ours from fp32).
fn vae_bf16_distances(dir: &Path) -> (f64, f64, f64) {
    let vae = Vae::load(
        &dir.join("pipeline"),
        &Weights::Diffusers,
        Device::Cpu,
        Kind::BFloat16,
    )
    .unwrap();
    assert_eq!(vae.kind(), Kind::BFloat16);
    let io = read(&dir.join("vae_io.safetensors"));
    let want = read(&dir.join("vae_io_bf16.safetensors"));
    let got = vae.decode(&io["latents"]).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    let e = rel_l2(&got, &want["sample"]);
    let reference = rel_l2(&want["sample"], &io["sample"]);
    let ours = rel_l2(&got, &io["sample"]);
    eprintln!(
        "vae bf16: relative L2 error {e:.3e} (diffusers bf16 vs fp32: {reference:.3e}; ours vs fp32: {ours:.3e})"
    );
    assert!(reference > 1e-3, "bf16 and fp32 references should differ");
    (e, reference, ours)
}

/// Machine-independent: our bf16 decode is about as near diffusers' fp32 decode as diffusers' bf16
/// decode is (CPU bf16 kernels round differently across instruction sets, so a bf16 golden from
/// another CPU is only a bound: the committed one, from an AVX-512 machine, is 1.5e-3 from the
/// decode on an AVX2-only AMD EPYC).
#[test]
fn small_vae_decode_in_bf16_is_as_near_fp32_as_diffusers_in_bf16() {
    let (_, reference, ours) = vae_bf16_distances(&small_dir());
    assert!(
        ours <= 1.5 * reference,
        "bf16 vae decode is {ours:.3e} from fp32 (bar: 1.5 x diffusers bf16's {reference:.3e})"
    );
}

/// On the CPU that made the goldens (`$DITFLEET_SDXL_LOCAL_GOLDENS`,
/// `tests/fixtures/sdxl_goldens.sh local`, set by `make goldens`): diffusers' bf16 decode and ours
/// run the same ops, far nearer each other than bf16 puts either from fp32.
#[test]
#[ignore = "needs DITFLEET_SDXL_LOCAL_GOLDENS (diffusers' bf16 decode on this machine)"]
fn local_small_vae_decode_in_bf16_matches_diffusers_in_bf16_on_this_cpu() {
    let dir = match std::env::var_os("DITFLEET_SDXL_LOCAL_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => {
            panic!("DITFLEET_SDXL_LOCAL_GOLDENS is not set: `tests/fixtures/sdxl_goldens.sh local` prints it")
        }
    };
    // bf16 keeps 8 mantissa bits, so 1e-4 is out of reach; the bar is a tenth of the distance
    // between diffusers' bf16 and fp32 decodes, which a decode computed in fp32 (or with a
    // different cast order) would not meet.
    let (e, reference, _) = vae_bf16_distances(&dir);
    assert!(e <= reference / 10.0, "bf16 vae decode relative L2 error {e:.3e}");
}

#[test]
fn small_vae_in_fp16_is_upcast_to_fp32_as_diffusers_does() {
    let vae = Vae::load(
        &small_dir().join("pipeline"),
        &Weights::Diffusers,
        Device::Cpu,
        Kind::Half,
    )
    .unwrap();
    assert_eq!(vae.kind(), Kind::Float);
}

#[test]
fn every_diffusers_vae_key_has_its_original_counterpart_in_the_single_file() {
    // The whole VAE (encoder included, which the decoder does not load): the mapping is the
    // inverse of the generator's, key for key and shape for shape.
    let dir = small_dir();
    let diffusers = read(&dir.join("pipeline/vae/diffusion_pytorch_model.safetensors"));
    let single = read(&dir.join(SINGLE_FILE));
    let vae_keys: Vec<&String> = single.keys().filter(|k| k.starts_with(keys::VAE)).collect();
    assert_eq!(diffusers.len(), vae_keys.len());
    for (name, t) in &diffusers {
        let (key, original) = match keys::vae(name, 4) {
            ditfleet_engine::flux::weights::Source::Key(k) => {
                let o = single.get(&k).unwrap_or_else(|| panic!("{name} -> {k}: absent"));
                (k, o.shallow_clone())
            }
            ditfleet_engine::flux::weights::Source::Squeezed(k) => {
                let o = single.get(&k).unwrap_or_else(|| panic!("{name} -> {k}: absent"));
                (k, o.reshape(t.size()))
            }
            other => panic!("{name}: unexpected {other:?}"),
        };
        assert!(original.equal(t), "{name} -> {key}: different values");
    }
}

#[test]
fn single_file_loading_lists_missing_and_unexpected_keys() {
    let dir = small_dir();
    let mut tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(dir.join(SINGLE_FILE)).unwrap();
    let dropped = [
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "first_stage_model.decoder.up.0.block.1.conv2.bias",
    ];
    tensors.retain(|(k, _)| !dropped.contains(&k.as_str()));
    tensors.push((
        "conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight".into(),
        Tensor::zeros([4], (Kind::Float, Device::Cpu)),
    ));
    tensors.push((
        "first_stage_model.decoder.mid.attn_2.q.weight".into(),
        Tensor::zeros([4], (Kind::Float, Device::Cpu)),
    ));
    let tmp = std::env::temp_dir().join(format!("ditfleet-sdxl-strict-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("broken.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let weights = Weights::SingleFile(file);
    let text = TextEncoders::load(&dir.join("pipeline"), &weights, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    let vae = Vae::load(&dir.join("pipeline"), &weights, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    eprintln!("{text}\n{vae}");
    // The fused q/k/v tensor is missing for each of q, k and v; the extra key is unexpected.
    assert!(text.contains("3 missing key(s)"), "{text}");
    assert!(text.contains(dropped[0]), "{text}");
    assert!(
        text.contains(
            "1 unexpected key(s): [conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight]"
        ),
        "{text}"
    );
    assert!(vae.contains("1 missing key(s)"), "{vae}");
    assert!(vae.contains(dropped[1]), "{vae}");
    assert!(
        vae.contains("1 unexpected key(s): [first_stage_model.decoder.mid.attn_2.q.weight]"),
        "{vae}"
    );
}

#[test]
#[ignore = "needs DITFLEET_SDXL_GOLDENS (real-width goldens, ~1.3 GB)"]
fn real_width_text_encoders_match_transformers() {
    text_encoder_case(&big_dir(), false);
}

#[test]
#[ignore = "needs DITFLEET_SDXL_GOLDENS (real-width goldens, ~1.3 GB)"]
fn real_width_text_encoders_from_single_file_match_transformers() {
    text_encoder_case(&big_dir(), true);
}

#[test]
#[ignore = "needs DITFLEET_SDXL_GOLDENS (real-width goldens, ~1.3 GB)"]
fn real_width_encode_prompt_matches_diffusers() {
    encode_prompt_case(&big_dir(), false);
}

#[test]
#[ignore = "needs DITFLEET_SDXL_GOLDENS (real-width goldens, ~1.3 GB)"]
fn real_width_full_size_vae_decode_matches_diffusers() {
    vae_case(&big_dir(), false);
}

#[test]
#[ignore = "needs DITFLEET_SDXL_GOLDENS (real-width goldens, ~1.3 GB)"]
fn real_width_full_size_vae_decode_from_single_file_matches_diffusers() {
    vae_case(&big_dir(), true);
}
