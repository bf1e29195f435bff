//! Safetensors checkpoints: header parsing, streaming reads and strict loading into a `VarStore`.
//!
//! Files are never read whole: the header is parsed first (names, dtypes, shapes), so a strict
//! load can report every missing key, unexpected key and shape mismatch before any data is read;
//! then each tensor is read with a positioned read into one reused host staging buffer
//! (page-locked for a GPU model) and copied into its variable (which converts dtype and device),
//! so host memory stays at one tensor's size.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor, nn::VarStore};

use crate::EngineError;

/// Where one tensor lives on disk.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub file: PathBuf,
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in `file`.
    pub start: u64,
    pub end: u64,
}

/// The tensors of one or more safetensors files (a single file or a sharded set), by name.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub tensors: BTreeMap<String, TensorInfo>,
}

fn load_err(msg: impl Into<String>) -> EngineError {
    EngineError::Load(msg.into())
}

fn parse_kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        "F8_E4M3" => Kind::Float8e4m3fn,
        _ => return None,
    })
}

impl Checkpoint {
    /// Parses the header of one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, EngineError> {
        let mut ck = Checkpoint::default();
        ck.add_file(path)?;
        Ok(ck)
    }

    /// Opens the weights of a diffusers component folder: `<stem>.safetensors`, or the shards
    /// listed in `<stem>.safetensors.index.json`.
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self, EngineError> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_file(&single)
        } else {
            Err(load_err(format!(
                "{} has neither {} nor {}",
                dir.display(),
                single.display(),
                index.display()
            )))
        }
    }

    /// Opens a sharded checkpoint from its `*.safetensors.index.json` (the `weight_map` names the
    /// shard of every tensor; each shard's header must hold exactly the tensors mapped to it).
    pub fn open_index(index: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| load_err(format!("cannot read {}: {e}", index.display())))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| load_err(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| load_err(format!("{}: no weight_map", index.display())))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut ck = Checkpoint::default();
        for shard in shards {
            ck.add_file(&dir.join(shard))?;
        }
        let mapped: BTreeSet<&str> = map.keys().map(|k| k.as_str()).collect();
        let found: BTreeSet<&str> = ck.tensors.keys().map(|k| k.as_str()).collect();
        if mapped != found {
            let only_index: Vec<_> = mapped.difference(&found).collect();
            let only_files: Vec<_> = found.difference(&mapped).collect();
            return Err(load_err(format!(
                "{}: index and shards disagree (in index only: {only_index:?}; in shards only: {only_files:?})",
                index.display()
            )));
        }
        Ok(ck)
    }

    /// Adds the tensors of one file; a name present twice is an error.
    pub fn add_file(&mut self, path: &Path) -> Result<(), EngineError> {
        let file = File::open(path).map_err(|e| load_err(format!("cannot open {}: {e}", path.display())))?;
        let file_len = file.metadata()?.len();
        let mut len_buf = [0u8; 8];
        file.read_exact_at(&mut len_buf, 0)
            .map_err(|e| load_err(format!("{}: not a safetensors file: {e}", path.display())))?;
        let header_len = u64::from_le_bytes(len_buf);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(load_err(format!(
                "{}: bad safetensors header length {header_len}",
                path.display()
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)?;
        let json: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| load_err(format!("{}: bad safetensors header: {e}", path.display())))?;
        let obj = json
            .as_object()
            .ok_or_else(|| load_err(format!("{}: header is not an object", path.display())))?;
        let base = 8 + header_len;
        for (name, entry) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = || load_err(format!("{}: bad header entry for {name}", path.display()));
            let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?;
            let kind = parse_kind(dtype).ok_or_else(|| {
                load_err(format!(
                    "{}: {name} has unsupported dtype {dtype}",
                    path.display()
                ))
            })?;
            let shape: Vec<i64> = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_i64().ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            let offs = entry
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .ok_or_else(bad)?;
            let (s, e) = match offs.as_slice() {
                [s, e] => (s.as_u64().ok_or_else(bad)?, e.as_u64().ok_or_else(bad)?),
                _ => return Err(bad()),
            };
            let numel: i64 = shape.iter().product();
            if e < s || (e - s) as usize != numel as usize * kind.elt_size_in_bytes() || base + e > file_len {
                return Err(load_err(format!(
                    "{}: {name}: data range does not match its shape",
                    path.display()
                )));
            }
            let info = TensorInfo {
                file: path.to_path_buf(),
                kind,
                shape,
                start: base + s,
                end: base + e,
            };
            if self.tensors.insert(name.clone(), info).is_some() {
                return Err(load_err(format!(
                    "{name} appears in more than one file ({})",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Reads one tensor's bytes straight into the start of `buf` (a contiguous host `Uint8` tensor
    /// at least that large, e.g. page-locked staging) and returns a view of them with the
    /// tensor's dtype and shape. `files` caches open handles across calls.
    #[allow(unsafe_code)]
    fn read_into(
        &self,
        name: &str,
        buf: &Tensor,
        files: &mut BTreeMap<PathBuf, File>,
    ) -> Result<Tensor, EngineError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| load_err(format!("no tensor {name}")))?;
        let n = (info.end - info.start) as usize;
        if buf.kind() != Kind::Uint8
            || !buf.is_contiguous()
            || buf.device() != tch::Device::Cpu
            || buf.numel() < n
        {
            return Err(load_err(format!(
                "staging buffer too small for {name} ({n} bytes)"
            )));
        }
        let file = match files.entry(info.file.clone()) {
            std::collections::btree_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => slot.insert(File::open(&info.file)?),
        };
        if n > 0 {
            // SAFETY: `buf` is a contiguous CPU byte tensor of at least `n` bytes (checked above)
            // that the caller owns and does not read or copy from while this slice is alive (the
            // copies out of it are synchronous and finished before the next read).
            let dst = unsafe { std::slice::from_raw_parts_mut(buf.data_ptr() as *mut u8, n) };
            file.read_exact_at(dst, info.start)?;
        }
        Ok(buf
            .f_narrow(0, 0, n as i64)?
            .f_view_dtype(info.kind)?
            .f_view(info.shape.as_slice())?)
    }

    /// Reads one tensor into host memory (a buffer of its own) in its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor, EngineError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| load_err(format!("no tensor {name}")))?;
        let buf = Tensor::f_empty(
            [(info.end - info.start).max(1) as i64],
            (Kind::Uint8, tch::Device::Cpu),
        )?;
        self.read_into(name, &buf, &mut BTreeMap::new())
    }
}

/// How one model variable is assembled from checkpoint tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Copied from one tensor.
    Key(String),
    /// Concatenation of several tensors along dim 0 (fused q/k/v, fused qkv+mlp).
    Concat(Vec<String>),
    /// One tensor whose two halves along dim 0 are swapped (diffusers' (scale, shift) vs (shift, scale)).
    SwapHalves(String),
    /// Rows `start..start + len` (dim 0) of one tensor (one of fused q/k/v, e.g. OpenCLIP's
    /// `attn.in_proj_weight`).
    Rows { key: String, start: i64, len: i64 },
    /// A 2-D tensor transposed (OpenCLIP's `text_projection`, stored `(in, out)`).
    Transposed(String),
    /// One tensor with the same elements in the variable's shape, the two shapes differing only
    /// in trailing size-1 dims (1x1 convolution kernels `(o, i, 1, 1)` loaded as linear weights).
    Squeezed(String),
}

impl Source {
    fn keys(&self) -> Vec<&str> {
        match self {
            Source::Key(k)
            | Source::SwapHalves(k)
            | Source::Rows { key: k, .. }
            | Source::Transposed(k)
            | Source::Squeezed(k) => vec![k.as_str()],
            Source::Concat(ks) => ks.iter().map(|k| k.as_str()).collect(),
        }
    }
}

/// `shape` without its trailing size-1 dims.
fn strip_trailing_ones(shape: &[i64]) -> &[i64] {
    let n = shape.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    &shape[..n]
}

/// Strictly fills every variable of `vs` from `ck`.
///
/// `source` maps a variable name to its source; checkpoint keys that no variable uses are
/// "unexpected" unless `ignore(key)` is true. All problems (missing keys, unexpected keys, shape
/// mismatches) are collected and returned in one [`EngineError::Load`].
pub fn load_strict(
    vs: &VarStore,
    ck: &Checkpoint,
    what: &str,
    source: &dyn Fn(&str) -> Source,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<(), EngineError> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut plan = Vec::with_capacity(names.len());
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    let mut used = BTreeSet::new();
    for name in names {
        let var = &vars[name];
        let src = source(name);
        let keys = src.keys();
        let absent: Vec<&str> = keys.iter().copied().filter(|k| !ck.contains(k)).collect();
        for k in &keys {
            used.insert(k.to_string());
        }
        if !absent.is_empty() {
            missing.push(format!("{} (for {name})", absent.join(" + ")));
            continue;
        }
        let shape: Vec<i64> = match &src {
            Source::Key(k) | Source::SwapHalves(k) => ck.shape(k).unwrap_or(&[]).to_vec(),
            Source::Rows { key, start, len } => {
                let mut s = ck.shape(key).unwrap_or(&[]).to_vec();
                if s.is_empty() || *start < 0 || *len < 0 || start + len > s[0] {
                    mismatched.push(format!("{name}: rows {start}..{} of {key} {s:?}", start + len));
                    continue;
                }
                s[0] = *len;
                s
            }
            Source::Transposed(k) => {
                let s = ck.shape(k).unwrap_or(&[]);
                if s.len() != 2 {
                    mismatched.push(format!("{name}: {k} {s:?} is not 2-D, cannot be transposed"));
                    continue;
                }
                vec![s[1], s[0]]
            }
            Source::Squeezed(k) => {
                let s = ck.shape(k).unwrap_or(&[]);
                if strip_trailing_ones(s) == strip_trailing_ones(&var.size()) {
                    var.size()
                } else {
                    s.to_vec()
                }
            }
            Source::Concat(ks) => {
                let first = ck.shape(&ks[0]).unwrap_or(&[]).to_vec();
                let mut total = first.clone();
                let mut ok = !first.is_empty();
                for k in &ks[1..] {
                    let s = ck.shape(k).unwrap_or(&[]);
                    if first.is_empty() || s.len() != first.len() || s[1..] != first[1..] {
                        ok = false;
                    } else {
                        total[0] += s[0];
                    }
                }
                if !ok {
                    mismatched.push(format!("{name}: parts {keys:?} cannot be concatenated"));
                    continue;
                }
                total
            }
        };
        if shape != var.size() {
            mismatched.push(format!(
                "{name}: checkpoint {shape:?} vs model {:?} (from {keys:?})",
                var.size()
            ));
            continue;
        }
        plan.push((var, src));
    }
    let unexpected: Vec<&String> = ck
        .tensors
        .keys()
        .filter(|k| !used.contains(*k) && !ignore(k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        return Err(load_err(format!(
            "{what}: {} missing key(s): [{}]; {} unexpected key(s): [{}]; {} shape mismatch(es): [{}]",
            missing.len(),
            missing.join(", "),
            unexpected.len(),
            unexpected
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            mismatched.len(),
            mismatched.join(", ")
        )));
    }
    let _guard = tch::no_grad_guard();
    // Every tensor is read straight from the file into one reused host staging buffer and copied
    // from there into (its rows of) the variable: no per-tensor host allocation, no host-side
    // concatenation, and for a GPU model page-locked staging, so the copies run at DMA speed.
    let largest = plan
        .iter()
        .flat_map(|(_, src)| src.keys())
        .filter_map(|k| ck.tensors.get(k))
        .map(|t| t.end - t.start)
        .max()
        .unwrap_or(0);
    let mut staging: BTreeMap<bool, Tensor> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for (var, src) in plan {
        let cuda = var.device().is_cuda();
        if let std::collections::btree_map::Entry::Vacant(slot) = staging.entry(cuda) {
            let host = Tensor::f_empty([largest.max(1) as i64], (Kind::Uint8, tch::Device::Cpu))?;
            // Pinned only where it pays and exists (a CUDA destination); pageable otherwise.
            let buf = if cuda {
                host.f_pin_memory(var.device()).unwrap_or(host)
            } else {
                host
            };
            slot.insert(buf);
        }
        let buf = &staging[&cuda];
        let mut var = var.shallow_clone();
        match &src {
            Source::Key(k) => {
                var.f_copy_(&ck.read_into(k, buf, &mut files)?)?;
            }
            Source::Concat(ks) => {
                let mut row = 0;
                for k in ks {
                    let part = ck.read_into(k, buf, &mut files)?;
                    let rows = part.size()[0];
                    var.f_narrow(0, row, rows)?.f_copy_(&part)?;
                    row += rows;
                }
            }
            Source::SwapHalves(k) => {
                let t = ck.read_into(k, buf, &mut files)?;
                let half = t.size()[0] / 2;
                var.f_narrow(0, 0, half)?.f_copy_(&t.f_narrow(0, half, half)?)?;
                var.f_narrow(0, half, half)?.f_copy_(&t.f_narrow(0, 0, half)?)?;
            }
            Source::Rows { key, start, len } => {
                var.f_copy_(&ck.read_into(key, buf, &mut files)?.f_narrow(0, *start, *len)?)?;
            }
            Source::Transposed(k) => {
                var.f_copy_(&ck.read_into(k, buf, &mut files)?.f_transpose(0, 1)?)?;
            }
            Source::Squeezed(k) => {
                var.f_copy_(&ck.read_into(k, buf, &mut files)?.f_view(var.size().as_slice())?)?;
            }
        }
    }
    Ok(())
}

/// safetensors' name for `kind`.
fn dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        Kind::Float8e4m3fn => "F8_E4M3",
        _ => return None,
    })
}

/// Writes `named` as one safetensors file (any device; FP8 included, which libtorch's writer
/// lacks), tensor by tensor, through a temporary file renamed into place.
pub fn write_safetensors(named: &BTreeMap<String, Tensor>, path: &Path) -> Result<(), EngineError> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, t) in named {
        let dtype = dtype_name(t.kind())
            .ok_or_else(|| load_err(format!("{name}: cannot write dtype {:?}", t.kind())))?;
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| load_err(format!("safetensors header: {e}")))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(&(head.len() as u64).to_le_bytes())?;
    f.write_all(&head)?;
    for t in named.values() {
        let host = t
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?
            .f_view_dtype(Kind::Uint8)?
            .f_reshape([-1])?;
        let data = Vec::<u8>::try_from(&host)?;
        f.write_all(&data)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes every variable of `vs` under its own name (used by tests and the benchmark).
pub fn save_var_store(vs: &VarStore, path: &Path) -> Result<(), EngineError> {
    let vars = vs.variables();
    let mut named: Vec<(String, Tensor)> = vars.into_iter().map(|(n, t)| (n, t.detach())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path)?;
    Ok(())
}
