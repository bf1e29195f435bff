//! Merging a stack of adapters into the weights, and taking it out again ([`Applier`]).
//!
//! A stack is validated as a whole before any weight is written: every module must land on a
//! weight of the WHOLE model ([`Family`]) with matching shapes, so every rank of a plan accepts or
//! refuses the same stack. Then each touched weight this rank holds is rewritten in place:
//! `W = cast(W₀_fp32 + Σ c_m · B_m @ A_m)` with `c_m = scale · alpha_m / rank_m` (the sum in
//! fp32, the terms that land on the same rows concatenated along the rank into one GEMM), from the
//! saved original `W₀` (so switching stacks never compounds rounding), and checked for NaN/Inf. Any failure puts every
//! weight back to `W₀` before the error returns.
//!
//! Two kernels compute that formula ([`MergeKernel`]). `Fp32` materialises `ΔW` with an fp32 GEMM
//! and adds it; `Split` (bf16 weights on CUDA) runs the GEMM on the tensor cores: `c · B` (fp32) is
//! split into three bf16 parts whose sum is exactly `c · B`, `A` into as many bf16 parts as its
//! dtype needs (one for bf16), and the parts are concatenated along the rank, so a bf16 GEMM with
//! fp32 output forms the exact products and sums them in fp32; one add rounds `W₀ + ΔW` into the
//! weight. Originals stay saved after a restore (the weights equal them then), so the next stack
//! pays no copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor, nn};

use super::{Adapter, AdapterKey, Family, LoraError};

/// The model variables one rank holds, by qualified name (`<component>.<variable>`): handles on
/// the model's own tensors, so writes land in the storage its forward reads.
#[derive(Debug, Default)]
pub struct Weights {
    vars: BTreeMap<String, Tensor>,
}

impl Weights {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every variable of `vs` as `<component>.<name>`.
    pub fn with(mut self, component: &str, vs: &nn::VarStore) -> Self {
        for (name, t) in vs.variables() {
            self.vars.insert(format!("{component}.{name}"), t);
        }
        self
    }

    pub fn insert(&mut self, name: impl Into<String>, t: &Tensor) {
        self.vars.insert(name.into(), t.shallow_clone());
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.vars.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(|k| k.as_str())
    }
}

/// Memory bounds of an [`Applier`].
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOptions {
    /// Bytes of saved originals kept on the weights' device; the rest go to host memory (restoring
    /// them then costs a host-to-device copy).
    pub originals_device_bytes: usize,
    /// Bytes of adapter tensors (widened to fp32) kept on the weights' device between stacks, so
    /// that re-applying a recent adapter copies nothing from the host. 0 = none.
    pub device_cache_bytes: usize,
    /// How bf16 weights are merged.
    pub kernel: MergeKernel,
    /// `Split`'s block of product rows in bytes (0: a whole row range at once).
    pub split_block_bytes: usize,
    /// `Split`'s add through the engine's fused kernel on CUDA ([`crate::aten::lora_add`]: one
    /// vectorised pass that also flags non-finite results) rather than ATen's mixed-dtype `add_`
    /// and a separate `isfinite` pass; the same bits either way.
    pub fused_add: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            originals_device_bytes: usize::MAX,
            device_cache_bytes: 0,
            kernel: MergeKernel::Auto,
            split_block_bytes: 0,
            fused_add: true,
        }
    }
}

/// How a merge computes `cast(W₀ + Σ c · B @ A)` (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MergeKernel {
    /// `Split` for contiguous bf16 weights on CUDA (tensor cores), `Fp32` everywhere else.
    #[default]
    Auto,
    /// `ΔW` from an fp32 GEMM, then one add in fp32 rounded into the weight.
    Fp32,
    /// Bf16 GEMMs with fp32 output on exact bf16 splits of the fp32 operands, one block of rows at
    /// a time, each block added to the weight's rows in fp32 and rounded once (contiguous bf16
    /// weights; others take `Fp32`). Forced on the CPU only by tests.
    Split,
}

/// A block of `Split`'s fp32 product small enough to stay in an H100's L2 cache between the GEMM
/// that writes it and the add that reads it (`ApplyOptions::split_block_bytes`; not the default
/// until a GPU measurement says it is faster: docs/benchmarks.md).
pub const SPLIT_BLOCK_BYTES: usize = 16 << 20;

/// What an apply (or restore) did on this rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyReport {
    /// Weights written with the new stack merged in.
    pub touched: usize,
    /// Weights the stack targets that this rank does not hold (other PipeFusion stages').
    pub elsewhere: usize,
    /// Weights put back to base (touched by the previous stack only, or all on restore).
    pub restored: usize,
    /// The stack was already applied: nothing was done.
    pub hot: bool,
    /// Wall time, device work included.
    pub ms: f64,
    /// Bytes of originals held now (device and host).
    pub saved_bytes: usize,
}

/// One term of a weight's update: `c · B[src..src + len] @ A` added to rows `dst..dst + len`.
struct Term {
    entry: usize,
    module: usize,
    coeff: f64,
    src: i64,
    dst: i64,
    len: i64,
}

/// A weight's terms grouped by the rows they write, `(dst, len)`, sorted by start.
fn row_groups(terms: &[Term]) -> BTreeMap<(i64, i64), Vec<&Term>> {
    let mut groups: BTreeMap<(i64, i64), Vec<&Term>> = BTreeMap::new();
    for t in terms {
        groups.entry((t.dst, t.len)).or_default().push(t);
    }
    groups
}

/// Whether row ranges `(dst, len)`, sorted by start, do not overlap.
fn disjoint<'a>(ranges: impl Iterator<Item = &'a (i64, i64)>) -> bool {
    let ranges: Vec<&(i64, i64)> = ranges.collect();
    ranges.windows(2).all(|p| p[0].0 + p[0].1 <= p[1].0)
}

/// A saved original: the handle on the model's variable and its base value.
struct Saved {
    var: Tensor,
    original: Tensor,
    /// The variable holds a merge (else it equals `original`).
    merged: bool,
}

/// Adapter tensors widened to fp32 on one device, per module.
#[derive(Default)]
struct DeviceCopies {
    pairs: HashMap<usize, (Tensor, Tensor)>,
    bytes: usize,
    used: u64,
}

/// One adapter prepared for `Split` merges on one device: its `B`s back to back (stored dtype),
/// one buffer per distinct `alpha / rank` so a job's scale is one multiply per buffer, and its `A`s
/// as exact bf16 parts.
struct SplitCopies {
    /// `(alpha / rank, B_m of every module with that coefficient, flattened back to back)`.
    flats: Vec<(f64, Tensor)>,
    modules: HashMap<usize, SplitModule>,
    bytes: usize,
    used: u64,
}

struct SplitModule {
    /// Index into `flats` and element offset of this module's `B` (out, rank) there.
    flat: usize,
    offset: i64,
    out: i64,
    rank: i64,
    /// `A` as `parts` bf16 matrices stacked along the rank: (parts · rank, in · kernel).
    a: Tensor,
    parts: i64,
}

/// `x` (fp32) as three bf16 tensors whose fp32 sum is exactly `x`: each part rounds what the
/// previous ones left, and fp32's 24 significant bits fit in three times bf16's 8 (bf16 has fp32's
/// exponent range, so no part over- or underflows where `x` does not).
pub fn split_bf16(x: &Tensor) -> Result<[Tensor; 3], tch::TchError> {
    let hi = x.f_to_kind(Kind::BFloat16)?;
    let r1 = x.f_sub(&hi)?; // exact: the rounding error of `hi`, in fp32
    let mid = r1.f_to_kind(Kind::BFloat16)?;
    let lo = r1.f_sub(&mid)?.f_to_kind(Kind::BFloat16)?;
    Ok([hi, mid, lo])
}

/// Bf16 parts of `A` whose sum is exactly `A`: one for bf16, two for fp16 (11 significant bits),
/// three for fp32; stacked along the rank (dim 0).
fn a_parts(a: &Tensor) -> Result<(Tensor, i64), tch::TchError> {
    match a.kind() {
        Kind::BFloat16 => Ok((a.shallow_clone(), 1)),
        k => {
            let [hi, mid, lo] = split_bf16(&a.f_to_kind(Kind::Float)?)?;
            if k == Kind::Half {
                Ok((Tensor::f_cat(&[hi, mid], 0)?, 2))
            } else {
                Ok((Tensor::f_cat(&[hi, mid, lo], 0)?, 3))
            }
        }
    }
}

/// Applies stacks to one rank's weights and restores them. Bound to those weights: a model
/// rebuilt elsewhere (another plan) needs a new applier, after this one has restored.
pub struct Applier {
    family: Arc<dyn Family>,
    weights: Weights,
    options: ApplyOptions,
    applied: Vec<(AdapterKey, f64)>,
    saved: BTreeMap<String, Saved>,
    device_bytes: usize,
    device_cache: HashMap<(AdapterKey, Device), DeviceCopies>,
    split_cache: HashMap<(AdapterKey, Device), SplitCopies>,
    tick: u64,
}

/// `t` on `device` without waiting for a host-to-device copy: from page-locked memory (the host
/// cache pins its adapters on CUDA) the copy is queued on the current stream, in order with the
/// merge kernels that read it, so the host runs ahead instead of stalling on each of hundreds of
/// small copies (from pageable memory ATen copies synchronously either way).
fn to_device(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    if t.device() == device {
        return Ok(t.shallow_clone());
    }
    t.f_to_device_(device, t.kind(), true, false)
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Waits for the device work producing `t` (a one-element device-to-host copy).
fn sync(t: &Tensor) -> Result<(), LoraError> {
    if t.device().is_cuda() && t.numel() > 0 {
        let _ = t.f_flatten(0, -1)?.f_narrow(0, 0, 1)?.f_to_device(Device::Cpu)?;
    }
    Ok(())
}

impl Applier {
    pub fn new(family: Arc<dyn Family>, weights: Weights, options: ApplyOptions) -> Self {
        Self {
            family,
            weights,
            options,
            applied: Vec::new(),
            saved: BTreeMap::new(),
            device_bytes: 0,
            device_cache: HashMap::new(),
            split_cache: HashMap::new(),
            tick: 0,
        }
    }

    /// The stack applied now (empty: base weights).
    pub fn applied(&self) -> &[(AdapterKey, f64)] {
        &self.applied
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Makes `stack` the applied one: free if it already is; otherwise the weights only the
    /// previous stack touched go back to base and the new stack is merged from the originals.
    /// On error every weight is back to base and nothing is applied.
    pub fn apply(&mut self, stack: &[(Arc<Adapter>, f64)]) -> Result<ApplyReport, LoraError> {
        let start = Instant::now();
        let id: Vec<(AdapterKey, f64)> = stack.iter().map(|(a, s)| (a.key.clone(), *s)).collect();
        let same = id.len() == self.applied.len()
            && id
                .iter()
                .zip(&self.applied)
                .all(|((k, s), (k2, s2))| k == k2 && s.to_bits() == s2.to_bits());
        if same {
            return Ok(ApplyReport {
                hot: true,
                saved_bytes: self.saved_bytes(),
                ms: start.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            });
        }
        let _guard = tch::no_grad_guard();
        let plan = match self.plan(stack) {
            Ok(p) => p,
            Err(e) => {
                self.restore_all()?;
                return Err(e);
            }
        };
        match self.merge(stack, &plan) {
            Ok(mut report) => {
                self.applied = id;
                report.saved_bytes = self.saved_bytes();
                report.ms = start.elapsed().as_secs_f64() * 1e3;
                Ok(report)
            }
            Err(e) => {
                self.restore_all()?;
                Err(e)
            }
        }
    }

    /// Puts every touched weight back to its original (bit-identical) and forgets the stack.
    pub fn restore(&mut self) -> Result<ApplyReport, LoraError> {
        let start = Instant::now();
        let _guard = tch::no_grad_guard();
        let restored = self.restore_all()?;
        Ok(ApplyReport {
            restored,
            ms: start.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        })
    }

    fn saved_bytes(&self) -> usize {
        self.saved.values().map(|s| bytes_of(&s.original)).sum()
    }

    /// Copies every merged weight's original back (the originals stay saved: the next stack
    /// needs no copy); the first failure is returned after all were tried.
    fn restore_all(&mut self) -> Result<usize, LoraError> {
        let mut first = None;
        let mut last = None;
        let mut n = 0;
        for s in self.saved.values_mut().filter(|s| s.merged) {
            match s.var.f_copy_(&s.original) {
                Ok(()) => {
                    s.merged = false;
                    n += 1;
                    last = Some(s.var.shallow_clone());
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        self.applied.clear();
        if let Some(e) = first {
            return Err(e.into());
        }
        if let Some(v) = last {
            sync(&v)?;
        }
        Ok(n)
    }

    /// Restores the base weights and frees the saved originals and device copies.
    pub fn release(&mut self) -> Result<ApplyReport, LoraError> {
        let report = self.restore()?;
        self.saved.clear();
        self.device_bytes = 0;
        self.device_cache.clear();
        self.split_cache.clear();
        Ok(report)
    }

    /// Validates the whole stack against the whole model and groups its terms by weight.
    fn plan(&self, stack: &[(Arc<Adapter>, f64)]) -> Result<BTreeMap<String, Vec<Term>>, LoraError> {
        let mut plan: BTreeMap<String, Vec<Term>> = BTreeMap::new();
        for (entry, (adapter, scale)) in stack.iter().enumerate() {
            let name = adapter.key.to_string();
            if !scale.is_finite() {
                return Err(LoraError::Scale {
                    adapter: name,
                    scale: *scale,
                });
            }
            let mut unknown = Vec::new();
            for (i, m) in adapter.modules.iter().enumerate() {
                let Some(place) = self.family.place(adapter.format, &m.name) else {
                    unknown.extend(adapter.keys_of(i));
                    continue;
                };
                let b_key = || adapter.keys_of(i)[1].clone();
                let shape_err = |message: String| LoraError::Shape {
                    adapter: name.clone(),
                    key: b_key(),
                    message,
                };
                if m.out() != place.out {
                    return Err(shape_err(format!(
                        "B has {} rows; the {} module it targets has {} outputs",
                        m.out(),
                        self.family.name(),
                        place.out
                    )));
                }
                for s in &place.slices {
                    let Some(shape) = self.family.shape(&s.var) else {
                        unknown.extend(adapter.keys_of(i));
                        break;
                    };
                    if m.down_shape[1..] != shape[1..] || s.dst + s.len > shape[0] {
                        return Err(shape_err(format!(
                            "A {:?} / B {:?} do not fit {} {:?}",
                            m.down_shape, m.up_shape, s.var, shape
                        )));
                    }
                    if let Some(local) = self.weights.get(&s.var)
                        && local.size() != shape
                    {
                        return Err(shape_err(format!(
                            "this rank's {} is {:?}, the model's {:?}",
                            s.var,
                            local.size(),
                            shape
                        )));
                    }
                    plan.entry(s.var.clone()).or_default().push(Term {
                        entry,
                        module: i,
                        coeff: scale * m.scale(),
                        src: s.src,
                        dst: s.dst,
                        len: s.len,
                    });
                }
            }
            if !unknown.is_empty() {
                return Err(LoraError::Unmatched {
                    adapter: name,
                    unknown,
                    incomplete: Vec::new(),
                });
            }
        }
        Ok(plan)
    }

    /// Evicts the least recently used adapter copies on devices (either form: fp32 pairs or
    /// `Split` operands) until `bytes` more fit the device cache budget, never those of the
    /// adapters in `keep` (the stack being merged); whether they fit.
    fn make_room(&mut self, bytes: usize, keep: &[AdapterKey]) -> bool {
        let budget = self.options.device_cache_bytes;
        let mut total = self.device_cache.values().map(|c| c.bytes).sum::<usize>()
            + self.split_cache.values().map(|c| c.bytes).sum::<usize>();
        while total + bytes > budget {
            let evictable = |(k, used, size): (&(AdapterKey, Device), u64, usize)| {
                (size > 0 && !keep.contains(&k.0)).then(|| (used, k.clone()))
            };
            let pairs = self
                .device_cache
                .iter()
                .filter_map(|(k, c)| evictable((k, c.used, c.bytes)))
                .min_by_key(|(used, _)| *used);
            let splits = self
                .split_cache
                .iter()
                .filter_map(|(k, c)| evictable((k, c.used, c.bytes)))
                .min_by_key(|(used, _)| *used);
            let freed = match (pairs, splits) {
                (Some(p), Some(q)) if q.0 < p.0 => self.split_cache.remove(&q.1).map(|c| c.bytes),
                (Some(p), _) => self.device_cache.remove(&p.1).map(|c| c.bytes),
                (None, Some(q)) => self.split_cache.remove(&q.1).map(|c| c.bytes),
                (None, None) => None,
            };
            match freed {
                Some(b) => total -= b,
                None => break,
            }
        }
        total + bytes <= budget
    }

    /// `(A, B)` of a module as fp32 on `device`, from the device cache when enabled (`keep`: the
    /// adapters of the stack being merged, never evicted for it).
    fn pair_on(
        &mut self,
        adapter: &Adapter,
        module: usize,
        device: Device,
        keep: &[AdapterKey],
    ) -> Result<(Tensor, Tensor), LoraError> {
        let widen =
            |t: &Tensor| -> Result<Tensor, LoraError> { Ok(to_device(t, device)?.f_to_kind(Kind::Float)?) };
        if self.options.device_cache_bytes == 0 {
            let (a, b) = adapter.pair(module);
            return Ok((widen(&a)?, widen(&b)?));
        }
        self.tick += 1;
        let key = (adapter.key.clone(), device);
        if let Some(c) = self.device_cache.get_mut(&key) {
            c.used = self.tick;
            if let Some((a, b)) = c.pairs.get(&module) {
                return Ok((a.shallow_clone(), b.shallow_clone()));
            }
        }
        let (a, b) = adapter.pair(module);
        let (a, b) = (widen(&a)?, widen(&b)?);
        let size = bytes_of(&a) + bytes_of(&b);
        if self.make_room(size, keep) {
            let c = self.device_cache.entry(key).or_default();
            c.used = self.tick;
            c.bytes += size;
            c.pairs.insert(module, (a.shallow_clone(), b.shallow_clone()));
        }
        Ok((a, b))
    }

    /// Whether `var` takes the `Split` kernel (given that its row ranges are disjoint).
    fn splits(&self, var: &Tensor) -> bool {
        let eligible = var.kind() == Kind::BFloat16 && var.is_contiguous();
        match self.options.kernel {
            MergeKernel::Auto => eligible && var.device().is_cuda(),
            MergeKernel::Split => eligible,
            MergeKernel::Fp32 => false,
        }
    }

    /// Merges a validated plan: restores the weights only the previous stack touched, then
    /// rewrites each planned weight this rank holds.
    fn merge(
        &mut self,
        stack: &[(Arc<Adapter>, f64)],
        plan: &BTreeMap<String, Vec<Term>>,
    ) -> Result<ApplyReport, LoraError> {
        let mut report = ApplyReport::default();
        for (name, s) in self.saved.iter_mut() {
            if s.merged && !plan.contains_key(name) {
                s.var.f_copy_(&s.original)?;
                s.merged = false;
                report.restored += 1;
            }
        }
        // The `Split` operands: each adapter's modules this rank merges that way, prepared on
        // their device, then `c · B` split once per adapter and coefficient.
        let mut split_weights = BTreeSet::new();
        let mut needed: HashMap<(usize, Device), Vec<usize>> = HashMap::new();
        for (name, terms) in plan {
            let Some(var) = self.weights.get(name) else {
                continue;
            };
            if self.splits(var) && disjoint(row_groups(terms).keys()) {
                for t in terms {
                    needed.entry((t.entry, var.device())).or_default().push(t.module);
                }
                split_weights.insert(name);
            }
        }
        // Entries kept over budget served one merge only.
        self.split_cache.retain(|_, c| c.bytes > 0);
        let keep: Vec<AdapterKey> = stack.iter().map(|(a, _)| a.key.clone()).collect();
        let mut scaled: HashMap<(usize, Device), Vec<[Tensor; 3]>> = HashMap::new();
        for ((entry, device), mut modules) in needed {
            modules.sort_unstable();
            modules.dedup();
            let (adapter, scale) = &stack[entry];
            self.prepare_split(adapter, device, &modules, &keep)?;
            let prepared = &self.split_cache[&(adapter.key.clone(), device)];
            let mut parts = Vec::with_capacity(prepared.flats.len());
            for (coef, flat) in &prepared.flats {
                parts.push(split_bf16(
                    &flat.f_to_kind(Kind::Float)?.f_mul_scalar(scale * coef)?,
                )?);
            }
            scaled.insert((entry, device), parts);
        }
        // Per weight: its isfinite test, or None where the fused add flagged non-finite results
        // into its device's `flags` entry instead.
        let mut finite: Vec<(&str, Option<Tensor>)> = Vec::with_capacity(plan.len());
        let mut flags: HashMap<Device, Tensor> = HashMap::new();
        let mut last = None;
        for (name, terms) in plan {
            let Some(mut var) = self.weights.get(name).map(|t| t.shallow_clone()) else {
                report.elsewhere += 1;
                continue;
            };
            self.save(name, &var)?;
            let saved = self.saved.get_mut(name).expect("saved above");
            let (original, was_merged) = (saved.original.shallow_clone(), saved.merged);
            // Marked before the first write, so a failure half-way restores this weight too.
            saved.merged = true;
            if split_weights.contains(name) {
                if was_merged {
                    var.f_copy_(&original)?;
                }
                let flagged = self.merge_split(&var, terms, stack, &scaled, &mut flags)?;
                finite.push((
                    name,
                    (!flagged)
                        .then(|| var.f_isfinite().and_then(|t| t.f_all()))
                        .transpose()?,
                ));
            } else {
                self.merge_weight(&var, &original, terms, stack, &keep)?;
                finite.push((name, Some(var.f_isfinite()?.f_all()?)));
            }
            last = Some(var);
            report.touched += 1;
        }
        let mut oks: Vec<Tensor> = finite
            .iter()
            .filter_map(|(_, ok)| ok.as_ref().map(|t| t.shallow_clone()))
            .collect();
        oks.extend(flags.values().map(|f| f.f_eq(0)).collect::<Result<Vec<_>, _>>()?);
        if !oks.is_empty() && !bool::try_from(Tensor::f_stack(&oks, 0)?.f_all()?)? {
            // Which weights: the fused add flagged its device, not the weight (a failing merge
            // is rare: the isfinite pass runs here only).
            let mut bad = Vec::new();
            for (name, ok) in &finite {
                let ok = match ok {
                    Some(ok) => bool::try_from(ok)?,
                    None => bool::try_from(
                        self.weights
                            .get(name)
                            .expect("merged above")
                            .f_isfinite()?
                            .f_all()?,
                    )?,
                };
                if !ok {
                    bad.push(*name);
                }
            }
            let names: Vec<String> = stack.iter().map(|(a, s)| format!("{} x {s}", a.key)).collect();
            return Err(LoraError::NonFinite {
                adapter: names.join(" + "),
                what: format!("the merged weight(s) {}", bad.join(", ")),
            });
        }
        if let Some(v) = last {
            sync(&v)?;
        }
        Ok(report)
    }

    /// Makes sure `adapter`'s `modules` are prepared for `Split` merges on `device` (kept there
    /// within the device cache budget, least recently used adapters evicted first).
    /// Entries of the adapters in `keep` (the stack being merged) are never evicted here.
    fn prepare_split(
        &mut self,
        adapter: &Adapter,
        device: Device,
        modules: &[usize],
        keep: &[AdapterKey],
    ) -> Result<(), LoraError> {
        self.tick += 1;
        let key = (adapter.key.clone(), device);
        if let Some(c) = self.split_cache.get_mut(&key)
            && modules.iter().all(|m| c.modules.contains_key(m))
        {
            c.used = self.tick;
            return Ok(());
        }
        let mut flats: Vec<(f64, Vec<Tensor>, i64)> = Vec::new();
        let mut prepared = HashMap::with_capacity(modules.len());
        let pairs: Vec<(Tensor, Tensor)> = modules.iter().map(|&i| adapter.pair(i)).collect();
        let flat_kind = match pairs.first() {
            Some((_, b)) if pairs.iter().all(|(_, x)| x.kind() == b.kind()) => b.kind(),
            _ => Kind::Float,
        };
        for (&i, (a, b)) in modules.iter().zip(pairs) {
            let m = &adapter.modules[i];
            let coef = m.scale();
            let g = match flats.iter().position(|(c, _, _)| c.to_bits() == coef.to_bits()) {
                Some(g) => g,
                None => {
                    flats.push((coef, Vec::new(), 0));
                    flats.len() - 1
                }
            };
            // Kept in the stored dtype (widened exactly when scaled): half the device bytes of
            // fp32 for bf16 adapters.
            let b = to_device(&b, device)?.f_to_kind(flat_kind)?.f_reshape([-1])?; // (out · rank)
            let offset = flats[g].2;
            flats[g].2 += b.numel() as i64;
            flats[g].1.push(b);
            let (a, parts) = a_parts(&to_device(&a, device)?.f_reshape([m.rank, -1])?)?; // (parts · rank, in · kernel)
            prepared.insert(
                i,
                SplitModule {
                    flat: g,
                    offset,
                    out: m.out(),
                    rank: m.rank,
                    a,
                    parts,
                },
            );
        }
        let flats: Vec<(f64, Tensor)> = flats
            .into_iter()
            .map(|(c, v, _)| Ok((c, Tensor::f_cat(&v, 0)?)))
            .collect::<Result<_, tch::TchError>>()?;
        let bytes = flats.iter().map(|(_, t)| bytes_of(t)).sum::<usize>()
            + prepared.values().map(|m| bytes_of(&m.a)).sum::<usize>();
        self.split_cache.remove(&key);
        // Over budget (or no device cache): used for this merge only, dropped at the next.
        let fits = self.make_room(bytes, keep);
        self.split_cache.insert(
            key,
            SplitCopies {
                flats,
                modules: prepared,
                bytes: if fits { bytes } else { 0 },
                used: if fits { self.tick } else { 0 },
            },
        );
        Ok(())
    }

    /// Writes `W₀ + Σ c · B @ A` into `var`, which holds `W₀`: per row range, bf16 GEMMs with fp32
    /// output on the exact bf16 parts of every term, block by block, each added to its rows (see
    /// the module docs).
    ///
    /// Returns whether every add went through the fused kernel, which flagged any non-finite
    /// result into `flags[device]` (else the caller tests the weight).
    fn merge_split(
        &self,
        var: &Tensor,
        terms: &[Term],
        stack: &[(Arc<Adapter>, f64)],
        scaled: &HashMap<(usize, Device), Vec<[Tensor; 3]>>,
        flags: &mut HashMap<Device, Tensor>,
    ) -> Result<bool, LoraError> {
        let device = var.device();
        let mut flagged = true;
        let rows = var.size()[0];
        let w2d = var.f_view([rows, -1])?; // (out, in · kernel)
        for ((dst, len), group) in row_groups(terms) {
            let mut ups = Vec::new();
            let mut downs = Vec::new();
            for t in group {
                let prepared = &self.split_cache[&(stack[t.entry].0.key.clone(), device)];
                let m = &prepared.modules[&t.module];
                let parts = &scaled[&(t.entry, device)][m.flat];
                for q in 0..m.parts {
                    let a = m.a.f_narrow(0, q * m.rank, m.rank)?; // (rank, in · kernel)
                    for p in parts {
                        ups.push(
                            p.f_narrow(0, m.offset, m.out * m.rank)?
                                .f_view([m.out, m.rank])?
                                .f_narrow(0, t.src, len)?,
                        ); // (len, rank)
                        downs.push(a.shallow_clone());
                    }
                }
            }
            let b = Tensor::f_cat(&ups, 1)?; // (len, Σ parts · rank)
            let a = Tensor::f_cat(&downs, 0)?; // (Σ parts · rank, in · kernel)
            let cols = a.size()[1];
            let block = match self.options.split_block_bytes {
                0 => len,
                bytes => (bytes as i64 / (4 * cols)).clamp(1, len),
            };
            let mut r0 = 0;
            while r0 < len {
                let n = block.min(len - r0);
                // The product in fp32 (exact bf16 products, fp32 accumulation), then one fp32 add
                // rounded into the rows. Not `addmm_` with the rows as C: cuBLAS rounded the product
                // to bf16 before adding it (docs/benchmarks.md, "The merge kernels").
                let bn = b.f_narrow(0, r0, n)?;
                let d = if device.is_cuda() {
                    bn.f_mm_dtype(&a, Kind::Float)? // (n, in · kernel)
                } else {
                    // No bf16→fp32 GEMM on the CPU: the same sums from exactly widened operands.
                    bn.f_to_kind(Kind::Float)?.f_mm(&a.f_to_kind(Kind::Float)?)?
                };
                let mut rows = w2d.f_narrow(0, dst + r0, n)?;
                if self.options.fused_add && crate::aten::lora_add_fits(&rows, &d) {
                    let flag = match flags.entry(device) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(Tensor::f_zeros([1], (Kind::Int, device))?)
                        }
                    };
                    crate::aten::lora_add(&rows, &d, flag)?;
                } else {
                    let _ = rows.f_add_(&d)?;
                    flagged = false;
                }
                r0 += n;
            }
        }
        Ok(flagged)
    }

    /// Writes `W₀ + Σ c · B @ A` into `var` from its original `W₀`: fp32 weights accumulate in
    /// place; others get `ΔW` in fp32 (one GEMM per row range: the terms landing on the same rows
    /// concatenated along the rank) and one add that computes `W₀ + ΔW` in fp32 and rounds once
    /// into the variable (fewer passes over the weight than widening `W₀` and accumulating).
    fn merge_weight(
        &mut self,
        var: &Tensor,
        original: &Tensor,
        terms: &[Term],
        stack: &[(Arc<Adapter>, f64)],
        keep: &[AdapterKey],
    ) -> Result<(), LoraError> {
        let device = var.device();
        let rows = var.size()[0];
        let groups = row_groups(terms);
        let rows_disjoint = disjoint(groups.keys());
        let mut gemms = Vec::with_capacity(groups.len());
        for ((dst, len), group) in groups {
            let mut ups = Vec::with_capacity(group.len());
            let mut downs = Vec::with_capacity(group.len());
            for t in group {
                let (a, b) = self.pair_on(&stack[t.entry].0, t.module, device, keep)?;
                let r = a.size()[0];
                ups.push(
                    b.f_reshape([-1, r])?
                        .f_narrow(0, t.src, len)?
                        .f_mul_scalar(t.coeff)?,
                ); // (len, r)
                downs.push(a.f_reshape([r, -1])?); // (r, in · kernel)
            }
            let (b, a) = if ups.len() == 1 {
                (ups.remove(0), downs.remove(0))
            } else {
                (Tensor::f_cat(&ups, 1)?, Tensor::f_cat(&downs, 0)?) // (len, Σr), (Σr, in · kernel)
            };
            gemms.push((dst, len, b, a));
        }
        let mut w = var.shallow_clone();
        // In place for contiguous fp32 weights; a channels-last convolution weight (SDXL's fast
        // paths) takes the ΔW route below, whose add writes through any layout.
        if var.kind() == Kind::Float && var.is_contiguous() {
            w.f_copy_(original)?;
            let w2d = var.f_view([rows, -1])?; // (out, in · kernel)
            for (dst, len, b, a) in &gemms {
                let _ = w2d.f_narrow(0, *dst, *len)?.f_addmm_(b, a)?;
            }
            return Ok(());
        }
        // Row ranges are sorted by start: disjoint ones each write their rows of ΔW (the rows no
        // term covers are zeroed); overlapping ones accumulate into a zeroed ΔW.
        let mut delta = Tensor::f_empty(var.size(), (Kind::Float, device))?;
        let d2d = delta.f_view([rows, -1])?; // (out, in · kernel)
        if rows_disjoint {
            let mut next = 0;
            for (dst, len, b, a) in &gemms {
                if *dst > next {
                    let _ = d2d.f_narrow(0, next, dst - next)?.f_zero_()?;
                }
                let _ = b.f_mm_out(&d2d.f_narrow(0, *dst, *len)?, a)?;
                next = dst + len;
            }
            if next < rows {
                let _ = d2d.f_narrow(0, next, rows - next)?.f_zero_()?;
            }
        } else {
            let _ = delta.f_zero_()?;
            for (dst, len, b, a) in &gemms {
                let _ = d2d.f_narrow(0, *dst, *len)?.f_addmm_(b, a)?;
            }
        }
        let _ = to_device(original, device)?.f_add_out(&w, &delta)?;
        Ok(())
    }

    /// Keeps the original of `name` (once: it stays saved until [`Applier::release`]): on its
    /// device while the budget allows, else in host memory.
    fn save(&mut self, name: &str, var: &Tensor) -> Result<(), LoraError> {
        if self.saved.contains_key(name) {
            return Ok(());
        }
        let size = bytes_of(var);
        let on_device = self.device_bytes + size <= self.options.originals_device_bytes;
        let mut original = if on_device {
            var.f_empty_like()?
        } else {
            Tensor::f_empty(var.size(), (var.kind(), Device::Cpu))?
        };
        original.f_copy_(var)?;
        if on_device {
            self.device_bytes += size;
        }
        self.saved.insert(
            name.to_string(),
            Saved {
                var: var.shallow_clone(),
                original,
                merged: false,
            },
        );
        Ok(())
    }
}
