//! Flux with FP8 linear layers ([`crate::nn::fp8`]): which layers, quantising a loaded model,
//! loading and writing a pre-quantised checkpoint, and copying parts for parallel plans.
//!
//! The FP8 layers are every projection of the transformer blocks: a double block's `qkv`,
//! `proj` and MLP per stream, a single block's `linear1` and `linear2` (80% of the step's FLOPs
//! at 1024²; the rest is attention). The embedders, the modulation (once per job, from the
//! modulation table), the final layer and the norms stay in the weights' dtype: they cost little
//! time, and in FP8 each multiplies the blocks' error (measured: docs/benchmarks-flux-1gpu.md,
//! "What is FP8 and what is not").
//!
//! A pre-quantised checkpoint is one safetensors file in the original (BFL) layout: the FP8
//! layers' `<name>.weight` as `F8_E4M3` `(out, in)` with `<name>.weight_scale` `F32` `(out)`
//! (per output channel; `(out, 1)` and a single per-tensor value are read too), every other
//! variable as in a bf16 checkpoint ([`Flux::save_fp8`] writes one).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::layers::Linear;
use super::part::Part;
use super::transformer::Flux;
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;
use crate::nn::fp8::Fp8Linear;

/// The file name of a pre-quantised transformer inside a model version's `transformer/` folder.
pub const FP8_CHECKPOINT: &str = "ditfleet-fp8.safetensors";

/// The block projections of a [`Flux`] with their variable names, in one list for both borrows:
/// `block_linears!(flux, iter)` gives `&Linear`s, `block_linears!(flux, iter_mut, mut)` gives
/// `&mut Linear`s.
macro_rules! block_linears {
    ($flux:expr, $iter:ident $(, $m:tt)?) => {{
        let flux = $flux;
        let (double, single) = (flux.part.double.clone(), flux.part.single.clone());
        let mut v = Vec::new();
        for (b, i) in flux.double_blocks.$iter().zip(double) {
            let p = format!("double_blocks.{i}");
            v.push((format!("{p}.img_attn.qkv"), &$($m)? b.img_attn.qkv));
            v.push((format!("{p}.img_attn.proj"), &$($m)? b.img_attn.proj));
            v.push((format!("{p}.img_mlp.0"), &$($m)? b.img_mlp.fc0));
            v.push((format!("{p}.img_mlp.2"), &$($m)? b.img_mlp.fc2));
            v.push((format!("{p}.txt_attn.qkv"), &$($m)? b.txt_attn.qkv));
            v.push((format!("{p}.txt_attn.proj"), &$($m)? b.txt_attn.proj));
            v.push((format!("{p}.txt_mlp.0"), &$($m)? b.txt_mlp.fc0));
            v.push((format!("{p}.txt_mlp.2"), &$($m)? b.txt_mlp.fc2));
        }
        for (b, i) in flux.single_blocks.$iter().zip(single) {
            v.push((format!("single_blocks.{i}.linear1"), &$($m)? b.linear1));
            v.push((format!("single_blocks.{i}.linear2"), &$($m)? b.linear2));
        }
        v
    }};
}

impl Flux {
    /// The FP8-eligible layers (the block projections) with their variable names
    /// (`double_blocks.3.img_attn.qkv`).
    pub fn block_linears(&self) -> Vec<(String, &Linear)> {
        block_linears!(self, iter)
    }

    fn block_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        block_linears!(self, iter_mut, mut)
    }

    /// Bytes of the weights as held: the variable store's plus the FP8 layers' (1 byte a value and
    /// their fp32 scales).
    pub fn weight_bytes(&self) -> usize {
        let vars: usize = self
            .vs
            .variables()
            .values()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        let fp8: usize = self
            .block_linears()
            .iter()
            .filter_map(|(_, l)| l.fp8.as_ref())
            .map(|f| f.weight.numel() + 4 * f.scale.numel())
            .sum();
        vars + fp8
    }

    /// Whether the blocks compute in FP8.
    pub fn is_fp8(&self) -> bool {
        self.block_linears().iter().any(|(_, l)| l.is_fp8())
    }

    /// Quantises every block projection to FP8 ([`Fp8Linear::quantize`]) in place; the bf16
    /// weights leave the variable store (and memory) layer by layer. Idempotent.
    pub fn quantize_fp8(&mut self) -> Result<(), EngineError> {
        self.quantize_fp8_with(&mut |_, _| {})
    }

    /// [`Flux::quantize_fp8`], calling `progress(layers done, layers)` after each layer.
    pub fn quantize_fp8_with(&mut self, progress: &mut dyn FnMut(usize, usize)) -> Result<(), EngineError> {
        let _guard = tch::no_grad_guard();
        let vs = self.vs.variables_.clone();
        let layers = self.block_linears_mut();
        let total = layers.len();
        for (i, (name, lin)) in layers.into_iter().enumerate() {
            if !lin.is_fp8() {
                let f = Fp8Linear::quantize(&lin.weight, lin.bias.as_ref())?;
                lin.set_fp8(f);
                remove_var(&vs, &format!("{name}.weight"));
            }
            progress(i + 1, total);
        }
        Ok(())
    }

    /// Whether `ck` is a pre-quantised checkpoint (FP8 block weights).
    pub fn is_fp8_checkpoint(ck: &Checkpoint) -> bool {
        ck.tensors
            .iter()
            .any(|(k, t)| t.kind == Kind::Float8e4m3fn && k.ends_with(".weight"))
    }

    /// Loads a pre-quantised checkpoint (see the module docs) strictly: the FP8 layers from their
    /// `F8_E4M3` weights and scales, every other variable as [`Flux::load_weights`] does.
    pub(crate) fn load_fp8_checkpoint(&mut self, ck: &Checkpoint) -> Result<(), EngineError> {
        let _guard = tch::no_grad_guard();
        let vs = self.vs.variables_.clone();
        let device = self.vs.device();
        let mut consumed = HashSet::new();
        let mut missing = Vec::new();
        for (name, lin) in self.block_linears_mut() {
            let (wk, sk) = (format!("{name}.weight"), format!("{name}.weight_scale"));
            let want = lin.weight.size();
            match (ck.tensors.get(&wk), ck.tensors.get(&sk)) {
                (Some(w), Some(_)) if w.kind == Kind::Float8e4m3fn && w.shape == want => {
                    let q = ck.read(&wk)?.f_to_device(device)?;
                    let scale = ck.read(&sk)?.f_to_kind(Kind::Float)?.f_to_device(device)?;
                    let f = Fp8Linear::from_quantized(q, &scale, lin.bias.as_ref())?;
                    lin.set_fp8(f);
                    remove_var(&vs, &wk);
                    consumed.insert(wk);
                    consumed.insert(sk);
                }
                (w, s) => missing.push(format!(
                    "{name}: {}",
                    match (w, s) {
                        (None, _) => "no weight".to_string(),
                        (Some(w), _) if w.kind != Kind::Float8e4m3fn =>
                            format!("weight is {:?}, not F8_E4M3", w.kind),
                        (Some(w), _) if w.shape != want => format!("weight {:?} vs model {want:?}", w.shape),
                        _ => "no weight_scale".to_string(),
                    }
                )),
            }
        }
        if !missing.is_empty() {
            return Err(EngineError::Load(format!(
                "flux transformer (fp8 checkpoint): {} FP8 layer(s) not loadable: [{}]",
                missing.len(),
                missing.join(", ")
            )));
        }
        // The linear weights that stay bf16 (embedders, modulation, final layer), if the model
        // was built with deferred weights, get their memory now, just before their values.
        crate::nn::materialize_deferred(&self.vs)?;
        load_strict(
            &self.vs,
            ck,
            "flux transformer (fp8 checkpoint)",
            &|n| Source::Key(n.to_string()),
            &|k| consumed.contains(k),
        )
    }

    /// Writes this (FP8) model as a pre-quantised checkpoint (see the module docs).
    pub fn save_fp8(&self, path: &Path) -> Result<(), EngineError> {
        if !self.is_fp8() {
            return Err(EngineError::Load(
                "save_fp8: the model is not quantised (call quantize_fp8 first)".into(),
            ));
        }
        let mut named: BTreeMap<String, Tensor> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        for (name, lin) in self.block_linears() {
            let f = lin
                .fp8
                .as_ref()
                .ok_or_else(|| EngineError::Load(format!("save_fp8: {name} is not FP8")))?;
            named.insert(format!("{name}.weight"), f.weight.shallow_clone());
            named.insert(format!("{name}.weight_scale"), f.scale.f_reshape([-1])?);
        }
        crate::nn::weights::write_safetensors(&named, path)
    }

    /// [`Flux::copy_part`] for an FP8 model: the part's FP8 layers copied from this model's.
    pub(crate) fn copy_part_fp8(&self, part: &Part, device: Device) -> Result<Self, EngineError> {
        let _guard = tch::no_grad_guard();
        // Deferred weights: the part is never built at its bf16 size (see [`Flux::load`]).
        let mut flux = {
            let _zero = super::layers::NoRandomInit::new();
            let _defer = crate::nn::DeferLinearWeights::new();
            Self::new_part(&self.config, device, self.kind(), part)?
        };
        let src: HashMap<String, &Linear> = self.block_linears().into_iter().collect();
        let vs = flux.vs.variables_.clone();
        for (name, lin) in flux.block_linears_mut() {
            let s = src
                .get(&name)
                .and_then(|l| l.fp8.as_ref())
                .ok_or_else(|| EngineError::Load(format!("copy_part: {name} is not FP8 in the source")))?;
            let f = Fp8Linear::from_quantized(
                s.weight.f_to_device(device)?,
                &s.scale.f_to_device(device)?,
                lin.bias.as_ref(),
            )?;
            lin.set_fp8(f);
            remove_var(&vs, &format!("{name}.weight"));
        }
        crate::nn::materialize_deferred(&flux.vs)?;
        flux.vs.copy(&self.vs)?;
        Ok(flux)
    }
}

/// LoRA adapters are merged into bf16 weights; an FP8 model has none to merge into (requantising
/// each merge would change the base model's numbers job by job): a job with adapters on an FP8
/// model is refused with the way out.
pub fn refuse_loras(loras: &[crate::LoraRef], flux: &Flux) -> Result<(), EngineError> {
    if loras.is_empty() || !flux.is_fp8() {
        return Ok(());
    }
    Err(EngineError::InvalidRequest(
        "LoRA adapters cannot be merged into an fp8 model version: run the job on a bf16 version of the model"
            .into(),
    ))
}

/// Drops variable `name` from a variable store (its memory goes with the last handle).
fn remove_var(vs: &std::sync::Arc<std::sync::Mutex<tch::nn::Variables>>, name: &str) {
    let mut v = vs.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = v.named_variables.remove(name) {
        let ptr = t.data_ptr();
        v.trainable_variables.retain(|x| x.tensor.data_ptr() != ptr);
    }
}

/// Where [`write_fp8_version`] is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8VersionStage {
    /// The other files are linked; the transformer is being read (`bytes` of weights).
    Loading { bytes: u64 },
    /// Block projections quantised so far.
    Quantising { done: usize, total: usize },
    /// The FP8 transformer is being written.
    Writing,
}

/// What [`write_fp8_version`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8VersionReport {
    /// Bytes of the transformer checkpoint written (FP8 blocks, the rest as loaded).
    pub transformer_bytes: u64,
    /// Files taken over from the source version (hard links where the filesystem allows).
    pub files: usize,
}

/// Writes a pre-quantised FP8 model version `dst` from the Flux model version `src` (a diffusers
/// folder): every file of `src` but the transformer's weights (hard-linked where possible, else
/// copied), `transformer/ditfleet-fp8.safetensors` (the blocks quantised on `device`) and
/// `ditfleet.json` saying `{"precision": "fp8"}`. Built in `<dst>.partial` and renamed into place,
/// so a crash leaves no half version; `dst` must not exist. The transformer is loaded in the
/// dtype its checkpoint stores (bf16 for Flux.1), on the CPU as on a GPU, so the weights kept in
/// full precision are written as they were read. `progress` hears each stage.
pub fn write_fp8_version(
    src: &Path,
    dst: &Path,
    device: Device,
    progress: &mut dyn FnMut(Fp8VersionStage),
) -> Result<Fp8VersionReport, EngineError> {
    if dst.exists() {
        return Err(EngineError::Load(format!(
            "{} exists: pick a new version folder",
            dst.display()
        )));
    }
    let tcfg = super::transformer::Config::from_diffusers_json(&src.join("transformer/config.json"))?;
    let partial = dst.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    let mut files = 0;
    let skip = |rel: &Path| {
        let s = rel.to_string_lossy();
        s.starts_with("transformer/")
            && (s.ends_with(".safetensors") || s.ends_with(".safetensors.index.json"))
    };
    copy_tree(src, src, &partial, &skip, &mut files)?;
    let ck = Checkpoint::open_dir(&src.join("transformer"), "diffusion_pytorch_model")?;
    let kind = stored_kind(&ck);
    let bytes = ck
        .tensors
        .values()
        .map(|t| t.shape.iter().product::<i64>().max(0) as u64 * t.kind.elt_size_in_bytes() as u64)
        .sum();
    drop(ck);
    tracing::info!(src = %src.display(), device = ?device, kind = ?kind, bytes, "loading the transformer to quantise");
    progress(Fp8VersionStage::Loading { bytes });
    let mut model = Flux::load(&tcfg, &src.join("transformer"), device, kind)?;
    model.quantize_fp8_with(&mut |done, total| progress(Fp8VersionStage::Quantising { done, total }))?;
    let out = partial.join("transformer").join(FP8_CHECKPOINT);
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    tracing::info!(path = %out.display(), "writing the FP8 transformer");
    progress(Fp8VersionStage::Writing);
    model.save_fp8(&out)?;
    let transformer_bytes = std::fs::metadata(&out)?.len();
    std::fs::write(partial.join("ditfleet.json"), b"{\"precision\": \"fp8\"}\n")?;
    std::fs::rename(&partial, dst)?;
    Ok(Fp8VersionReport {
        transformer_bytes,
        files,
    })
}

/// The float dtype most of `ck`'s values are stored in (bf16 for Flux.1's checkpoints).
fn stored_kind(ck: &Checkpoint) -> Kind {
    let mut by_kind: BTreeMap<String, (i64, Kind)> = BTreeMap::new();
    for t in ck.tensors.values() {
        if matches!(t.kind, Kind::BFloat16 | Kind::Half | Kind::Float) {
            by_kind.entry(format!("{:?}", t.kind)).or_insert((0, t.kind)).0 +=
                t.shape.iter().product::<i64>();
        }
    }
    by_kind
        .into_values()
        .max_by_key(|(n, _)| *n)
        .map_or(Kind::BFloat16, |(_, k)| k)
}

/// Hard-links (else copies) the files under `dir` into `to`, keeping their paths relative to
/// `root`, except those `skip` names; symlinks are followed as files.
fn copy_tree(
    root: &Path,
    dir: &Path,
    to: &Path,
    skip: &dyn Fn(&Path) -> bool,
    files: &mut usize,
) -> Result<(), EngineError> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let rel = path.strip_prefix(root).expect("under root");
        if path.is_dir() {
            copy_tree(root, &path, to, skip, files)?;
        } else if !skip(rel) && rel.file_name().is_some_and(|n| n != "ditfleet.json") {
            let target = to.join(rel);
            std::fs::create_dir_all(target.parent().expect("has a parent"))?;
            if std::fs::hard_link(&path, &target).is_err() {
                std::fs::copy(&path, &target)?;
            }
            *files += 1;
        }
    }
    Ok(())
}
