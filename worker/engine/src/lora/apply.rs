//! Merging a stack of adapters into the weights, and taking it out again ([`Applier`]).
//!
//! A stack is validated as a whole before any weight is written: every module must land on a
//! weight of the WHOLE model ([`Family`]) with matching shapes, so every rank of a plan accepts or
//! refuses the same stack. Then each touched weight this rank holds is rewritten in place:
//! `W = cast(W₀_fp32 + Σ c_m · B_m @ A_m)` with `c_m = scale · alpha_m / rank_m` (the sum in
//! fp32, the terms that land on the same rows concatenated along the rank into one GEMM), from the
//! saved original `W₀` (so switching stacks never compounds rounding), and checked for NaN/Inf. Any failure puts every
//! weight back to `W₀` before the error returns.

use std::collections::{BTreeMap, HashMap};
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
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            originals_device_bytes: usize::MAX,
            device_cache_bytes: 0,
        }
    }
}

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

/// A saved original: the handle on the model's variable and its base value.
struct Saved {
    var: Tensor,
    original: Tensor,
    on_device: bool,
}

/// Adapter tensors widened to fp32 on one device, per module.
#[derive(Default)]
struct DeviceCopies {
    pairs: HashMap<usize, (Tensor, Tensor)>,
    bytes: usize,
    used: u64,
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
    tick: u64,
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

    /// Copies every saved original back; the first failure is returned after all were tried.
    fn restore_all(&mut self) -> Result<usize, LoraError> {
        let mut first = None;
        let mut last = None;
        let n = self.saved.len();
        for (_, mut s) in std::mem::take(&mut self.saved) {
            match s.var.f_copy_(&s.original) {
                Ok(()) => last = Some(s.var),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        self.device_bytes = 0;
        self.applied.clear();
        if let Some(e) = first {
            return Err(e.into());
        }
        if let Some(v) = last {
            sync(&v)?;
        }
        Ok(n)
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

    /// `(A, B)` of a module as fp32 on `device`, from the device cache when enabled.
    fn pair_on(
        &mut self,
        adapter: &Adapter,
        module: usize,
        device: Device,
    ) -> Result<(Tensor, Tensor), LoraError> {
        let widen =
            |t: &Tensor| -> Result<Tensor, LoraError> { Ok(t.f_to_device(device)?.f_to_kind(Kind::Float)?) };
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
        let total: usize = self.device_cache.values().map(|c| c.bytes).sum();
        let mut total = total;
        while total + size > self.options.device_cache_bytes {
            let oldest = self
                .device_cache
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone());
            match oldest.and_then(|k| self.device_cache.remove(&k)) {
                Some(c) => total -= c.bytes,
                None => break,
            }
        }
        if total + size <= self.options.device_cache_bytes {
            let c = self.device_cache.entry(key).or_default();
            c.used = self.tick;
            c.bytes += size;
            c.pairs.insert(module, (a.shallow_clone(), b.shallow_clone()));
        }
        Ok((a, b))
    }

    /// Merges a validated plan: restores the weights only the previous stack touched, then
    /// rewrites each planned weight this rank holds.
    fn merge(
        &mut self,
        stack: &[(Arc<Adapter>, f64)],
        plan: &BTreeMap<String, Vec<Term>>,
    ) -> Result<ApplyReport, LoraError> {
        let mut report = ApplyReport::default();
        let stale: Vec<String> = self
            .saved
            .keys()
            .filter(|k| !plan.contains_key(*k))
            .cloned()
            .collect();
        for name in stale {
            if let Some(mut s) = self.saved.remove(&name) {
                s.var.f_copy_(&s.original)?;
                if s.on_device {
                    self.device_bytes -= bytes_of(&s.original);
                }
                report.restored += 1;
            }
        }
        let mut finite = Vec::with_capacity(plan.len());
        let mut last = None;
        for (name, terms) in plan {
            let Some(var) = self.weights.get(name).map(|t| t.shallow_clone()) else {
                report.elsewhere += 1;
                continue;
            };
            self.save(name, &var)?;
            let original = self.saved[name].original.shallow_clone();
            self.merge_weight(&var, &original, terms, stack)?;
            finite.push(var.f_isfinite()?.f_all()?);
            last = Some(var);
            report.touched += 1;
        }
        if !finite.is_empty() && !bool::try_from(Tensor::f_stack(&finite, 0)?.f_all()?)? {
            let held: Vec<&String> = plan.keys().filter(|k| self.weights.get(k).is_some()).collect();
            let mut bad = Vec::new();
            for (name, ok) in held.iter().zip(&finite) {
                if !bool::try_from(ok)? {
                    bad.push(name.as_str());
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
    ) -> Result<(), LoraError> {
        let device = var.device();
        let rows = var.size()[0];
        let mut groups: BTreeMap<(i64, i64), Vec<&Term>> = BTreeMap::new();
        for t in terms {
            groups.entry((t.dst, t.len)).or_default().push(t);
        }
        let mut gemms = Vec::with_capacity(groups.len());
        for ((dst, len), group) in groups {
            let mut ups = Vec::with_capacity(group.len());
            let mut downs = Vec::with_capacity(group.len());
            for t in group {
                let (a, b) = self.pair_on(&stack[t.entry].0, t.module, device)?;
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
        let disjoint = gemms.windows(2).all(|p| p[0].0 + p[0].1 <= p[1].0);
        let mut delta = Tensor::f_empty(var.size(), (Kind::Float, device))?;
        let d2d = delta.f_view([rows, -1])?; // (out, in · kernel)
        if disjoint {
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
        let _ = original.f_to_device(device)?.f_add_out(&w, &delta)?;
        Ok(())
    }

    /// Keeps the original of `name` (once per stack switch sequence): on its device while the
    /// budget allows, else in host memory.
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
                on_device,
            },
        );
        Ok(())
    }
}
