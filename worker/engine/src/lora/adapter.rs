//! LoRA adapter files: the two key grammars (diffusers/PEFT and kohya/sd-scripts), parsed into
//! modules of `(A, B, alpha)` held in host memory in their stored dtype. Which model weight a
//! module targets is the [`super::Family`]'s business, not this file's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::{AdapterKey, LoraError};
use crate::flux::weights::Checkpoint;

/// The key grammar of an adapter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// diffusers/PEFT: `<module>.lora_A.weight` `(r, in)`, `<module>.lora_B.weight` `(out, r)`,
    /// optional `<module>.alpha` (none: alpha = r). Modules named as in the diffusers model,
    /// prefixed by component (`transformer.`, `text_encoder.`).
    Peft,
    /// kohya/sd-scripts: `<module>.lora_down.weight` `(r, in)`, `<module>.lora_up.weight`
    /// `(out, r)`, `<module>.alpha`; modules named `lora_unet_<original-layout name, `.` -> `_`>`,
    /// `lora_te1_…` / `lora_te_…` (first text encoder), `lora_te2_…`.
    Kohya,
}

impl Format {
    fn suffixes(self) -> (&'static str, &'static str) {
        match self {
            Format::Peft => (".lora_A.weight", ".lora_B.weight"),
            Format::Kohya => (".lora_down.weight", ".lora_up.weight"),
        }
    }
}

/// One LoRA module: `ΔW = alpha / rank · B @ A`.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// The key stem in the file (`transformer.transformer_blocks.0.attn.to_q`,
    /// `lora_unet_double_blocks_0_img_attn_qkv`).
    pub name: String,
    pub rank: i64,
    pub alpha: Option<f64>,
    /// Shape of A (`down`): `(rank, in, …)` (a conv's kernel dims after `in`).
    pub down_shape: Vec<i64>,
    /// Shape of B (`up`): `(out, rank, 1, …)`.
    pub up_shape: Vec<i64>,
}

impl Module {
    /// `alpha / rank` (alpha = rank when the file gives none).
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64) / self.rank as f64
    }

    /// Rows of `B`: the module's output width.
    pub fn out(&self) -> i64 {
        self.up_shape[0]
    }
}

/// A parsed adapter. Its tensors live in host memory in the stored dtype (bf16 adapters stay
/// bf16: half the bytes of the cache's budget); they are widened to fp32 on the target device
/// when merged.
#[derive(Debug)]
pub struct Adapter {
    pub key: AdapterKey,
    pub format: Format,
    /// Sorted by name.
    pub modules: Vec<Module>,
    /// `(A, B)` per module. `Tensor` is `Send` but not `Sync`: handles are cloned out under the
    /// lock (they share the storage, which is only ever read).
    tensors: Mutex<Vec<(Tensor, Tensor)>>,
    bytes: usize,
}

fn read_err(key: &AdapterKey, message: impl Into<String>) -> LoraError {
    LoraError::Read {
        adapter: key.to_string(),
        message: message.into(),
    }
}

fn shape_err(key: &AdapterKey, tensor: &str, message: impl Into<String>) -> LoraError {
    LoraError::Shape {
        adapter: key.to_string(),
        key: tensor.to_string(),
        message: message.into(),
    }
}

fn is_finite(t: &Tensor) -> Result<bool, LoraError> {
    Ok(bool::try_from(t.f_isfinite()?.f_all()?)?)
}

impl Adapter {
    /// Reads and validates a safetensors adapter file. With `pin` (and CUDA present) the host
    /// copies are page-locked, so that merging on a GPU copies them at full PCIe speed.
    pub fn load(key: AdapterKey, path: &Path, pin: bool) -> Result<Self, LoraError> {
        let ck = Checkpoint::open_file(path).map_err(|e| read_err(&key, e.to_string()))?;
        let mut named = Vec::with_capacity(ck.tensors.len());
        for name in ck.tensors.keys() {
            let t = ck.read(name).map_err(|e| read_err(&key, e.to_string()))?;
            named.push((name.clone(), t));
        }
        let adapter = Self::from_tensors(key, named)?;
        if pin && tch::Cuda::is_available() {
            let mut ts = adapter.tensors.lock().unwrap_or_else(|p| p.into_inner());
            for (a, b) in ts.iter_mut() {
                *a = a.f_pin_memory(Device::Cuda(0))?;
                *b = b.f_pin_memory(Device::Cuda(0))?;
            }
        }
        Ok(adapter)
    }

    /// Builds an adapter from named host tensors (a file's contents): classifies the keys by
    /// grammar ([`Format::Kohya`] if any `lora_down`/`lora_up` key, else [`Format::Peft`]), pairs
    /// them into modules and checks them: every key belongs to a complete module, A and B agree
    /// on the rank, alphas are finite scalars, every value is finite.
    pub fn from_tensors(key: AdapterKey, named: Vec<(String, Tensor)>) -> Result<Self, LoraError> {
        let kohya = named
            .iter()
            .any(|(n, _)| n.ends_with(".lora_down.weight") || n.ends_with(".lora_up.weight"));
        let format = if kohya { Format::Kohya } else { Format::Peft };
        let (down_sfx, up_sfx) = format.suffixes();
        let mut downs = BTreeMap::new();
        let mut ups = BTreeMap::new();
        let mut alphas = BTreeMap::new();
        let mut unknown = Vec::new();
        for (name, t) in named {
            if let Some(stem) = name.strip_suffix(down_sfx) {
                downs.insert(stem.to_string(), t);
            } else if let Some(stem) = name.strip_suffix(up_sfx) {
                ups.insert(stem.to_string(), t);
            } else if let Some(stem) = name.strip_suffix(".alpha") {
                alphas.insert(stem.to_string(), (name.clone(), t));
            } else {
                unknown.push(name);
            }
        }
        let stems: BTreeSet<String> = downs.keys().chain(ups.keys()).cloned().collect();
        let mut incomplete = Vec::new();
        for stem in &stems {
            match (downs.contains_key(stem), ups.contains_key(stem)) {
                (true, false) => incomplete.push(format!("{stem}{down_sfx} (no {stem}{up_sfx})")),
                (false, true) => incomplete.push(format!("{stem}{up_sfx} (no {stem}{down_sfx})")),
                _ => {}
            }
        }
        for (stem, (name, _)) in &alphas {
            if !stems.contains(stem) {
                incomplete.push(format!("{name} (no {stem}{down_sfx} / {stem}{up_sfx})"));
            }
        }
        if !unknown.is_empty() || !incomplete.is_empty() {
            return Err(LoraError::Unmatched {
                adapter: key.to_string(),
                unknown,
                incomplete,
            });
        }
        if stems.is_empty() {
            return Err(read_err(&key, "holds no LoRA modules"));
        }
        let mut modules = Vec::with_capacity(stems.len());
        let mut tensors = Vec::with_capacity(stems.len());
        let mut bytes = 0;
        for stem in stems {
            let (Some(a), Some(b)) = (downs.remove(&stem), ups.remove(&stem)) else {
                continue; // unreachable: incomplete pairs were rejected above
            };
            let (a_key, b_key) = (format!("{stem}{down_sfx}"), format!("{stem}{up_sfx}"));
            let (a, b) = (Self::float(&key, &a_key, a)?, Self::float(&key, &b_key, b)?);
            let (sa, sb) = (a.size(), b.size());
            if sa.len() < 2 || sb.len() < 2 || sa.len() != sb.len() {
                return Err(shape_err(
                    &key,
                    &a_key,
                    format!("A {sa:?} and B {sb:?} are not a LoRA pair (2-D, or conv kernels of equal rank)"),
                ));
            }
            if sa[0] == 0 || sa[0] != sb[1] || sb[2..].iter().any(|&d| d != 1) {
                return Err(shape_err(
                    &key,
                    &b_key,
                    format!("B {sb:?} does not fit A {sa:?} (B must be (out, rank, 1…) with A (rank, …))"),
                ));
            }
            for (k, t) in [(&a_key, &a), (&b_key, &b)] {
                if !is_finite(t)? {
                    return Err(LoraError::NonFinite {
                        adapter: key.to_string(),
                        what: k.clone(),
                    });
                }
            }
            let alpha = match alphas.remove(&stem) {
                None => None,
                Some((name, t)) => {
                    if t.numel() != 1 || !t.is_floating_point() {
                        return Err(shape_err(
                            &key,
                            &name,
                            format!("alpha must be one float, not {:?} {:?}", t.kind(), t.size()),
                        ));
                    }
                    let v = f64::try_from(t.f_to_kind(Kind::Double)?.f_reshape([])?)?;
                    if !v.is_finite() {
                        return Err(LoraError::NonFinite {
                            adapter: key.to_string(),
                            what: name,
                        });
                    }
                    Some(v)
                }
            };
            bytes += a.numel() * a.kind().elt_size_in_bytes() + b.numel() * b.kind().elt_size_in_bytes();
            modules.push(Module {
                name: stem,
                rank: sa[0],
                alpha,
                down_shape: sa,
                up_shape: sb,
            });
            tensors.push((a, b));
        }
        Ok(Self {
            key,
            format,
            modules,
            tensors: Mutex::new(tensors),
            bytes,
        })
    }

    /// A floating-point host tensor in a dtype the merge can widen: fp32, bf16, fp16 (fp64 is
    /// narrowed to fp32 here).
    fn float(key: &AdapterKey, name: &str, t: Tensor) -> Result<Tensor, LoraError> {
        match t.kind() {
            Kind::Float | Kind::BFloat16 | Kind::Half => Ok(t),
            Kind::Double => Ok(t.f_to_kind(Kind::Float)?),
            k => Err(shape_err(key, name, format!("dtype {k:?} is not a float type"))),
        }
    }

    /// Host bytes held by the module tensors.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `(A, B)` of module `i` (host, stored dtype; handles sharing the adapter's storage).
    pub fn pair(&self, i: usize) -> (Tensor, Tensor) {
        let ts = self.tensors.lock().unwrap_or_else(|p| p.into_inner());
        (ts[i].0.shallow_clone(), ts[i].1.shallow_clone())
    }

    /// The keys of module `i` in the file (for errors).
    pub fn keys_of(&self, i: usize) -> Vec<String> {
        let m = &self.modules[i];
        let (d, u) = self.format.suffixes();
        let mut keys = vec![format!("{}{d}", m.name), format!("{}{u}", m.name)];
        if m.alpha.is_some() {
            keys.push(format!("{}.alpha", m.name));
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AdapterKey {
        AdapterKey::new("t", "1", "x")
    }

    fn t(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn peft_and_kohya_keys_pair_into_modules_with_their_alphas() {
        let peft = Adapter::from_tensors(
            key(),
            vec![
                ("m.x.lora_A.weight".into(), t(&[4, 8])),
                ("m.x.lora_B.weight".into(), t(&[6, 4])),
                ("m.x.alpha".into(), Tensor::from(2.0f32)),
                ("m.y.lora_A.weight".into(), t(&[2, 8])),
                ("m.y.lora_B.weight".into(), t(&[3, 2])),
            ],
        )
        .unwrap();
        assert_eq!(peft.format, Format::Peft);
        assert_eq!(peft.modules.len(), 2);
        assert_eq!((peft.modules[0].rank, peft.modules[0].scale()), (4, 0.5));
        assert_eq!((peft.modules[1].rank, peft.modules[1].scale()), (2, 1.0));
        assert_eq!(peft.bytes(), 4 * (32 + 24 + 16 + 6));
        let kohya = Adapter::from_tensors(
            key(),
            vec![
                ("lora_unet_a.lora_down.weight".into(), t(&[4, 8])),
                ("lora_unet_a.lora_up.weight".into(), t(&[6, 4])),
                ("lora_unet_a.alpha".into(), Tensor::from(8.0f32)),
            ],
        )
        .unwrap();
        assert_eq!(kohya.format, Format::Kohya);
        assert_eq!(kohya.modules[0].scale(), 2.0);
    }

    #[test]
    fn unknown_keys_and_half_pairs_are_all_listed() {
        let err = Adapter::from_tensors(
            key(),
            vec![
                ("m.x.lora_A.weight".into(), t(&[4, 8])),
                ("m.y.lora_B.weight".into(), t(&[6, 4])),
                ("m.z.alpha".into(), Tensor::from(1.0f32)),
                ("m.w.dora_scale".into(), t(&[6])),
            ],
        )
        .unwrap_err();
        let LoraError::Unmatched {
            unknown, incomplete, ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(unknown, &["m.w.dora_scale"]);
        assert_eq!(incomplete.len(), 3, "{incomplete:?}");
        let msg = err.to_string();
        for k in [
            "m.w.dora_scale",
            "m.x.lora_A.weight",
            "m.y.lora_B.weight",
            "m.z.alpha",
        ] {
            assert!(msg.contains(k), "{msg}");
        }
    }

    #[test]
    fn nan_values_mismatched_ranks_and_bad_alphas_are_rejected() {
        let nan = t(&[4, 8])
            .f_index_fill_(0, &Tensor::from(1i64), f64::NAN)
            .unwrap();
        let err = Adapter::from_tensors(
            key(),
            vec![
                ("m.lora_A.weight".into(), nan),
                ("m.lora_B.weight".into(), t(&[6, 4])),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(&err, LoraError::NonFinite { what, .. } if what == "m.lora_A.weight"),
            "{err}"
        );
        let err = Adapter::from_tensors(
            key(),
            vec![
                ("m.lora_A.weight".into(), t(&[4, 8])),
                ("m.lora_B.weight".into(), t(&[6, 3])),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(&err, LoraError::Shape { key, .. } if key == "m.lora_B.weight"),
            "{err}"
        );
        let err = Adapter::from_tensors(
            key(),
            vec![
                ("m.lora_A.weight".into(), t(&[4, 8])),
                ("m.lora_B.weight".into(), t(&[6, 4])),
                ("m.alpha".into(), Tensor::from(f32::INFINITY)),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(&err, LoraError::NonFinite { what, .. } if what == "m.alpha"),
            "{err}"
        );
    }
}
