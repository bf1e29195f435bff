//! The first cost model: how expensive a job is, and which class (work queue) serves it.
//!
//! cost = image tokens x steps x model factor x guidance passes, where image tokens =
//! (width/16) x (height/16): the transformer's sequence length for Flux (8x VAE downsampling, 2x2
//! latent patches), and for SDXL simply the same measure of pixels (pixels / 256). Classes are
//! ascending upper bounds on the cost; the last class is unbounded.
//!
//! **Model factors.** A model's static factor is its measured one-GPU step time at 1024x1024
//! relative to flux-dev's ([`STEP_MS_1024`] lists the figures and where they come from), so an
//! SDXL step is priced by SDXL's step time, not Flux's. Away from 1024² the static cost grows
//! linearly with pixels for every model: about right for SDXL's UNet (convolutions, and attention
//! only at the two coarsest latent levels), an underestimate for a DiT at large sizes (attention
//! over the whole token sequence grows quadratically), which calibration corrects.
//!
//! **Guidance passes.** Flux's true CFG (`true_cfg_scale` > 1) runs the transformer twice per
//! step, so it doubles the cost. SDXL's classic CFG runs the UNet once per step on a batch of 2,
//! and that batch is already in SDXL's measured step time: it doubles nothing.
//!
//! **Calibration.** Workers record their measured ms per denoising step (per guidance pass) by
//! model and image tokens in Redis; [`Calibration`] turns those into a factor relative to the
//! reference point (flux-dev at 1024², 4096 tokens), so a model or resolution that is slower per
//! token than the linear model predicts costs proportionally more and lands in a bigger class.
//! Without measurements the static [`model_factor`] applies.
//!
//! **Balancing.** [`choose_class`] keeps a job in its cost class unless that class has a backlog
//! while a bigger class idles (spill up: bigger workers can always run smaller jobs), or no live
//! worker serves its class at all. Jobs never spill down (a small worker may lack the memory).

use std::collections::BTreeMap;

use crate::job::{JobSpec, ModelFamily};

/// The calibration's reference point: flux-dev at 1024x1024.
pub const REFERENCE_MODEL: &str = "flux-dev";
pub const REFERENCE_TOKENS: u64 = 4096;

/// One-GPU step time of each model at 1024x1024 (bf16, one nvidia-h200), ms, as a job's step
/// runs it: the sources of the static [`model_factor`]s. Only ratios matter.
///
/// - `flux-dev`: ditfleet's engine, 122.8-127.3 ms/step in the calls of
///   docs/benchmarks-flux-1gpu.md (one transformer pass, guidance distilled): 124.
/// - `flux-schnell`: the same transformer (no guidance embedding, negligible): flux-dev's figure.
/// - `sdxl-base`: **provisional**, diffusers eager bf16, the UNet on its CFG batch of 2, 72.0
///   ms/step (2.16 s for 30 steps, measured on nvidia-h200 in issue 17), until ditfleet's own SDXL
///   step time is measured; replace it then (calibration already prices by measured step times
///   where workers have recorded them).
pub const STEP_MS_1024: &[(&str, f64)] = &[("flux-dev", 124.0), ("flux-schnell", 124.0), ("sdxl-base", 72.0)];

/// The measured step time of `model` at 1024x1024 ([`STEP_MS_1024`]).
pub fn step_ms_1024(model: &str) -> Option<f64> {
    STEP_MS_1024.iter().find(|(m, _)| *m == model).map(|(_, ms)| *ms)
}

/// Relative per-token-step cost of a model (flux-dev = 1.0): its step time at 1024x1024 over
/// flux-dev's; 1.0 for a model without a figure.
pub fn model_factor(model: &str) -> f64 {
    match (step_ms_1024(model), step_ms_1024(REFERENCE_MODEL)) {
        (Some(ms), Some(reference)) => ms / reference,
        _ => 1.0,
    }
}

/// Model passes per step beyond what the model's step time already holds: 2 for Flux with true
/// CFG (`true_cfg_scale` above 1), else 1 (SDXL's classic CFG batch is in its step time).
pub fn guidance_passes(model: &str, true_cfg_scale: Option<f64>) -> u32 {
    let true_cfg = true_cfg_scale.is_some_and(|t| t > 1.0)
        && ModelFamily::of(model).is_none_or(ModelFamily::has_true_cfg);
    if true_cfg { 2 } else { 1 }
}

/// Transformer sequence length of the image for a width x height request (for SDXL, the same
/// measure of its pixels).
pub fn image_tokens(width: u32, height: u32) -> u64 {
    u64::from(width / 16) * u64::from(height / 16)
}

/// The job's cost in token-steps (steps as resolved, i.e. after model defaults), one guidance
/// pass.
pub fn job_cost(model: &str, width: u32, height: u32, steps: u32) -> u64 {
    let raw = image_tokens(width, height) as f64 * f64::from(steps) * model_factor(model);
    raw.round() as u64
}

/// The cost of a validated job as the scheduler routes it: its (calibrated) token-steps with the
/// model's default steps filled in, times its [`guidance_passes`].
pub fn spec_cost(spec: &JobSpec, calibration: &Calibration) -> u64 {
    let steps = spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model));
    calibrated_cost(&spec.model, spec.width, spec.height, steps, calibration)
        .saturating_mul(u64::from(guidance_passes(&spec.model, spec.true_cfg_scale)))
}

/// What a finished job adds to the calibration: its ms per step in the unit its price assumes
/// (per guidance pass: half of a Flux true-CFG step), or `None` when the run is not the shape
/// its model's price assumes (SDXL with `guidance` at most 1 runs without CFG, a batch of 1,
/// where the price holds a batch of 2).
pub fn calibration_sample(model: &str, guidance: f32, true_cfg_scale: f32, ms_per_step: f64) -> Option<f64> {
    if ModelFamily::of(model) == Some(ModelFamily::Sdxl) && guidance <= 1.0 {
        return None;
    }
    Some(ms_per_step / f64::from(guidance_passes(model, Some(f64::from(true_cfg_scale)))))
}

/// Measured ms per denoising step by model and image tokens (the fleet-wide means workers keep in
/// Redis).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Calibration {
    per_model: BTreeMap<String, Vec<(u64, f64)>>,
}

impl Calibration {
    /// Sets a model's measurements, `(tokens, ms per step)`.
    pub fn set(&mut self, model: &str, mut samples: Vec<(u64, f64)>) {
        samples.retain(|(t, ms)| *t > 0 && ms.is_finite() && *ms > 0.0);
        samples.sort_by_key(|(t, _)| *t);
        if samples.is_empty() {
            self.per_model.remove(model);
        } else {
            self.per_model.insert(model.to_string(), samples);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.per_model.is_empty()
    }

    /// Estimated ms per step at `tokens`: linear between measured points; beyond them, the
    /// nearest point's per-token time scaled by the tokens.
    pub fn ms_per_step(&self, model: &str, tokens: u64) -> Option<f64> {
        let s = self.per_model.get(model)?;
        let (first, last) = (s.first()?, s.last()?);
        if tokens <= first.0 {
            return Some(first.1 / first.0 as f64 * tokens as f64);
        }
        if tokens >= last.0 {
            return Some(last.1 / last.0 as f64 * tokens as f64);
        }
        let i = s.partition_point(|(t, _)| *t < tokens);
        let ((t0, m0), (t1, m1)) = (s[i - 1], s[i]);
        if t1 == tokens {
            return Some(m1);
        }
        let f = (tokens - t0) as f64 / (t1 - t0) as f64;
        Some(m0 + (m1 - m0) * f)
    }

    /// Per-token-step cost of `model` at `tokens` relative to the reference point, clamped to
    /// 1/4..16 so one bad measurement cannot send every job to one class.
    pub fn factor(&self, model: &str, tokens: u64) -> Option<f64> {
        let here = self.ms_per_step(model, tokens)? / tokens.max(1) as f64;
        let reference = self.ms_per_step(REFERENCE_MODEL, REFERENCE_TOKENS)? / REFERENCE_TOKENS as f64;
        (reference > 0.0).then(|| (here / reference).clamp(0.25, 16.0))
    }
}

/// The job's cost in token-steps with the calibrated factor where measurements exist.
pub fn calibrated_cost(model: &str, width: u32, height: u32, steps: u32, calibration: &Calibration) -> u64 {
    let tokens = image_tokens(width, height);
    let factor = calibration
        .factor(model, tokens)
        .unwrap_or_else(|| model_factor(model));
    (tokens as f64 * f64::from(steps) * factor).round() as u64
}

/// Live load of one class, from Redis (workers) and the broker (queue depth).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassLoad {
    /// Jobs waiting in the class's queues (every priority).
    pub depth: u64,
    /// Free slots of live, non-draining workers that consume the class. For a class other than
    /// the job's own, only workers that do not also consume the job's class count: those take
    /// the job from its own queue (the scheduler's `Live::loads`).
    pub free: u64,
    /// Live, non-draining workers that consume the class.
    pub workers: u32,
}

/// Where a job whose cost class is `natural` goes: `natural` unless it would wait there while a
/// bigger class has idle capacity (no queue, a free slot), or no live worker serves `natural`
/// while a bigger class has workers. Returns an index into `loads` (one entry per class, ascending).
pub fn choose_class(natural: usize, loads: &[ClassLoad]) -> usize {
    let Some(n) = loads.get(natural) else {
        return natural;
    };
    if n.workers > 0 && n.depth < n.free {
        return natural;
    }
    if let Some(j) = (natural + 1..loads.len()).find(|&j| {
        let l = loads[j];
        l.workers > 0 && l.depth == 0 && l.free > 0
    }) {
        return j;
    }
    if n.workers == 0
        && let Some(j) = (natural + 1..loads.len()).find(|&j| loads[j].workers > 0)
    {
        return j;
    }
    natural
}

pub(crate) fn valid_class_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Ordered classes with their upper cost bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTable {
    /// (name, inclusive upper bound); the last entry has `None`.
    classes: Vec<(String, Option<u64>)>,
}

impl Default for ClassTable {
    fn default() -> Self {
        Self::parse("small=50000,medium=250000,large=1500000,xlarge").expect("default class table parses")
    }
}

impl ClassTable {
    /// Parses `small=50000,medium=250000,large=1500000,xlarge`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut classes = Vec::new();
        let parts: Vec<&str> = s.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err("at least one class is needed".into());
        }
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (name, bound) = match part.split_once('=') {
                Some((n, b)) => {
                    let b: u64 = b
                        .trim()
                        .parse()
                        .map_err(|_| format!("bound of class {n:?} is not an integer"))?;
                    (n.trim(), Some(b))
                }
                None => (*part, None),
            };
            if !valid_class_name(name) {
                return Err(format!(
                    "class name {name:?} must be 1-32 characters of [a-z0-9_-]"
                ));
            }
            if classes.iter().any(|(n, _)| n == name) {
                return Err(format!("class {name:?} appears twice"));
            }
            match (last, bound) {
                (false, None) => {
                    return Err(format!(
                        "class {name:?} needs an upper bound (only the last class has none)"
                    ));
                }
                (true, Some(_)) => return Err(format!("the last class {name:?} must have no bound")),
                _ => {}
            }
            if let (Some(b), Some((_, Some(prev)))) = (bound, classes.last())
                && b <= *prev
            {
                return Err(format!("bounds must increase: {name:?}={b} is not above {prev}"));
            }
            classes.push((name.to_string(), bound));
        }
        Ok(Self { classes })
    }

    pub fn names(&self) -> Vec<&str> {
        self.classes.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Index (in [`ClassTable::names`]) of the class serving a job of this cost.
    pub fn classify_index(&self, cost: u64) -> usize {
        self.classes
            .iter()
            .position(|(_, bound)| bound.is_none_or(|b| cost <= b))
            .unwrap_or(self.classes.len() - 1)
    }

    /// The class serving a job of this cost.
    pub fn classify(&self, cost: u64) -> &str {
        for (name, bound) in &self.classes {
            match bound {
                Some(b) if cost <= *b => return name,
                None => return name,
                _ => {}
            }
        }
        &self.classes.last().expect("table is never empty").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_sends_big_images_to_bigger_classes() {
        let t = ClassTable::default();
        assert_eq!(t.classify(image_tokens(512, 512) * 4), "small"); // schnell 512²: 4k token-steps
        assert_eq!(t.classify(image_tokens(1024, 1024) * 28), "medium"); // 115k
        assert_eq!(t.classify(image_tokens(2048, 2048) * 28), "large"); // 459k
        assert_eq!(t.classify(image_tokens(4096, 4096) * 50), "xlarge"); // 3.3M
        assert_eq!(t.classify(50_000), "small");
        assert_eq!(t.classify(50_001), "medium");
    }

    #[test]
    fn classify_index_agrees_with_classify() {
        let t = ClassTable::default();
        for cost in [0, 50_000, 50_001, 250_000, 1_500_000, 1_500_001, u64::MAX] {
            assert_eq!(t.names()[t.classify_index(cost)], t.classify(cost));
        }
    }

    #[test]
    fn calibration_makes_slower_than_linear_resolutions_cost_more() {
        let mut c = Calibration::default();
        // Reference 1024² at 100 ms/step; 2048² measured 6x slower per step (4x tokens).
        c.set(REFERENCE_MODEL, vec![(1024, 20.0), (4096, 100.0), (16384, 600.0)]);
        assert_eq!(c.factor(REFERENCE_MODEL, 4096), Some(1.0));
        let f = c.factor(REFERENCE_MODEL, 16384).unwrap();
        assert!((f - 1.5).abs() < 1e-9, "{f}");
        // Interpolated halfway between 4096 and 16384 tokens: 350 ms at 10240 tokens.
        assert_eq!(c.ms_per_step(REFERENCE_MODEL, 10240), Some(350.0));
        // 2048² x 28 steps: linear 458,752 token-steps; calibrated 1.5x: 688,128 (still large).
        assert_eq!(calibrated_cost(REFERENCE_MODEL, 2048, 2048, 28, &c), 688_128);
        // Without the reference point the static factor applies.
        let mut only_schnell = Calibration::default();
        only_schnell.set("flux-schnell", vec![(4096, 90.0)]);
        assert_eq!(only_schnell.factor("flux-schnell", 4096), None);
        assert_eq!(
            calibrated_cost("flux-schnell", 1024, 1024, 4, &only_schnell),
            job_cost("flux-schnell", 1024, 1024, 4)
        );
        // A model measured 2x slower per token than the reference costs twice as much.
        c.set("flux-schnell", vec![(4096, 200.0)]);
        assert_eq!(c.factor("flux-schnell", 4096), Some(2.0));
        // Garbage is clamped.
        c.set("flux-schnell", vec![(4096, 1e9)]);
        assert_eq!(c.factor("flux-schnell", 4096), Some(16.0));
    }

    fn spec(model: &str, side: u32) -> JobSpec {
        JobSpec::parse(
            format!(
                r#"{{"schema_version":1,"job_id":"j","tenant":"t","model":"{model}","prompt":"p","width":{side},"height":{side}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn an_sdxl_step_is_priced_by_its_own_step_time() {
        assert_eq!(model_factor("flux-dev"), 1.0);
        assert_eq!(model_factor("flux-schnell"), 1.0);
        assert_eq!(model_factor("sdxl-base"), 72.0 / 124.0);
        assert_eq!(model_factor("unknown"), 1.0);
        for m in crate::job::KNOWN_MODELS {
            assert!(step_ms_1024(m).is_some(), "{m} has no measured step time");
        }
        let none = Calibration::default();
        // 1024², 30 default steps: 4096 x 30 x 72/124 = 71,350 (flux-dev at its 28: 114,688).
        assert_eq!(spec_cost(&spec("sdxl-base", 1024), &none), 71_350);
        assert_eq!(spec_cost(&spec("flux-dev", 1024), &none), 114_688);
        let t = ClassTable::default();
        assert_eq!(t.classify(spec_cost(&spec("sdxl-base", 512), &none)), "small"); // 17,837
        assert_eq!(t.classify(spec_cost(&spec("sdxl-base", 1024), &none)), "medium");
        assert_eq!(t.classify(spec_cost(&spec("sdxl-base", 2048), &none)), "large"); // 285,399
        // Flux classes as before.
        assert_eq!(t.classify(spec_cost(&spec("flux-schnell", 512), &none)), "small");
        assert_eq!(t.classify(spec_cost(&spec("flux-dev", 1024), &none)), "medium");
        assert_eq!(t.classify(spec_cost(&spec("flux-dev", 2048), &none)), "large");
    }

    #[test]
    fn flux_true_cfg_doubles_the_cost_and_sdxl_classic_cfg_does_not() {
        let none = Calibration::default();
        let mut flux = spec("flux-dev", 1024);
        flux.true_cfg_scale = Some(4.0);
        flux.negative_prompt = Some("blurry".into());
        assert_eq!(spec_cost(&flux, &none), 2 * 114_688);
        flux.true_cfg_scale = Some(1.0);
        assert_eq!(spec_cost(&flux, &none), 114_688);
        let mut sdxl = spec("sdxl-base", 1024);
        sdxl.guidance = Some(12.0);
        sdxl.negative_prompt = Some("blurry".into());
        assert_eq!(spec_cost(&sdxl, &none), 71_350);
        assert_eq!(guidance_passes("sdxl-base", Some(4.0)), 1);
        assert_eq!(guidance_passes("flux-schnell", Some(4.0)), 2);
    }

    #[test]
    fn calibration_samples_are_per_guidance_pass_and_skip_sdxl_without_cfg() {
        assert_eq!(calibration_sample("flux-dev", 3.5, 1.0, 124.0), Some(124.0));
        assert_eq!(calibration_sample("flux-dev", 3.5, 4.0, 248.0), Some(124.0));
        assert_eq!(calibration_sample("sdxl-base", 5.0, 1.0, 72.0), Some(72.0));
        assert_eq!(calibration_sample("sdxl-base", 1.0, 1.0, 40.0), None);
        // Measured SDXL and flux-dev steps at 1024² give the static factor.
        let mut c = Calibration::default();
        c.set(REFERENCE_MODEL, vec![(4096, 124.0)]);
        c.set("sdxl-base", vec![(4096, 72.0)]);
        assert_eq!(c.factor("sdxl-base", 4096), Some(model_factor("sdxl-base")));
    }

    #[test]
    fn balancing_spills_up_only_to_idle_bigger_classes() {
        let l = |depth, free, workers| ClassLoad { depth, free, workers };
        // Free slot in its own class: stays.
        assert_eq!(choose_class(0, &[l(0, 2, 1), l(0, 4, 1)]), 0);
        // Backlog in small, large idle: spills up.
        assert_eq!(choose_class(0, &[l(5, 0, 2), l(0, 3, 1)]), 1);
        // Backlog in small, large busy too: stays (no worker idles).
        assert_eq!(choose_class(0, &[l(5, 0, 2), l(1, 1, 1)]), 0);
        // Never spills down.
        assert_eq!(choose_class(1, &[l(0, 5, 1), l(9, 0, 1)]), 1);
        // Nobody serves small: goes to the nearest bigger class with workers, even if busy.
        assert_eq!(choose_class(0, &[l(0, 0, 0), l(0, 0, 0), l(3, 0, 2)]), 2);
        // Nobody serves anything: stays and waits.
        assert_eq!(choose_class(0, &[l(0, 0, 0), l(0, 0, 0)]), 0);
    }

    #[test]
    fn malformed_tables_are_rejected() {
        assert!(ClassTable::parse("").is_err());
        assert!(ClassTable::parse("a=10,b").is_ok());
        assert!(ClassTable::parse("a,b").is_err());
        assert!(ClassTable::parse("a=10,b=5,c").is_err());
        assert!(ClassTable::parse("a=10,a").is_err());
        assert!(ClassTable::parse("a=10,b=20").is_err());
        assert!(ClassTable::parse("A=10,b").is_err());
    }
}
