//! Which model version a job with LoRA adapters may run on, by precision.
//!
//! A worker merges a job's adapters into bf16 weights; an fp8 version (its block projections held
//! as e4m3 with per-channel scales) refuses them. bf16 and fp8 versions are different versions to
//! the router, so the scheduler keeps adapter jobs off fp8 ones from the live workers' heartbeats
//! (`model_precisions`, `default_versions`):
//!
//! - pinned to a version a live worker reports in fp8: rejected, naming the bf16 versions held;
//! - unpinned, while some live worker serving the model runs its unpinned jobs on an fp8 version
//!   (the job could land there): pinned to a bf16 version of the model that live workers hold,
//!   or rejected when none holds one.
//!
//! Workers older than `model_precisions` report nothing: their versions count as bf16.

use std::collections::BTreeMap;

use ditfleet_common::state::WorkerInfo;

/// The precision adapters can be merged into.
const LORA_PRECISION: &str = "bf16";

/// What `w` reports for `model_version`: its precision, `bf16` when unreported.
fn precision_of<'a>(w: &'a WorkerInfo, model_version: &str) -> &'a str {
    w.model_precisions
        .get(model_version)
        .map_or(LORA_PRECISION, String::as_str)
}

/// The version `w` runs unpinned jobs of `model` on (`model@version`).
fn default_of<'a>(w: &'a WorkerInfo, model: &str) -> Option<&'a str> {
    w.default_versions
        .iter()
        .map(String::as_str)
        .find(|mv| mv.split_once('@').is_some_and(|(m, _)| m == model))
}

/// The job's pin for its adapters: `Ok(None)` routes it as asked, `Ok(Some(model@version))` pins
/// an unpinned job to that bf16 version, `Err(reason)` rejects it. `workers` are the live workers
/// that take work; `pin` is the job's own `model@version`, if any.
pub fn lora_version(
    workers: &[WorkerInfo],
    model: &str,
    pin: Option<&str>,
) -> Result<Option<String>, String> {
    let serving: Vec<&WorkerInfo> = workers
        .iter()
        .filter(|w| w.models.iter().any(|m| m == model))
        .collect();
    // bf16 versions of the model held now, by how many workers hold each.
    let mut bf16: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &serving {
        for mv in &w.model_versions {
            if mv.split_once('@').is_some_and(|(m, _)| m == model) && precision_of(w, mv) == LORA_PRECISION {
                *bf16.entry(mv.as_str()).or_default() += 1;
            }
        }
    }
    let held = || {
        if bf16.is_empty() {
            format!("no live worker holds a bf16 version of {model}")
        } else {
            format!(
                "bf16 versions held now: {}",
                bf16.keys().copied().collect::<Vec<_>>().join(", ")
            )
        }
    };
    if let Some(pin) = pin {
        return match workers
            .iter()
            .map(|w| precision_of(w, pin))
            .find(|p| *p != LORA_PRECISION)
        {
            Some(p) => Err(format!(
                "{pin} computes in {p}, and LoRA adapters are merged only into bf16 versions; pin a bf16 version of {model} or none ({})",
                held()
            )),
            None => Ok(None),
        };
    }
    let low: Vec<String> = serving
        .iter()
        .filter_map(|w| default_of(w, model).map(|mv| (w, mv)))
        .filter(|(w, mv)| precision_of(w, mv) != LORA_PRECISION)
        .map(|(w, mv)| format!("{mv} ({}) on {}", precision_of(w, mv), w.id))
        .collect();
    if low.is_empty() {
        return Ok(None);
    }
    // The version most workers hold (then the one a worker runs by default, then the last by
    // name) is the one the job waits least for.
    let is_default = |mv: &str| serving.iter().any(|w| default_of(w, model) == Some(mv));
    match bf16.iter().max_by_key(|(mv, n)| (**n, is_default(mv), **mv)) {
        Some((mv, _)) => Ok(Some(mv.to_string())),
        None => Err(format!(
            "LoRA adapters are merged only into bf16 versions, and every live worker serving {model} holds it in fp8 only (default {}); load a bf16 version next to it (ditfleetctl model load {model}@<version> --keep-old)",
            low.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker holding `versions` (`(model@version, precision)`), `default` its unpinned one.
    fn worker(id: &str, versions: &[(&str, &str)], default: &str) -> WorkerInfo {
        WorkerInfo {
            engine: "flux".into(),
            model_versions: versions.iter().map(|(v, _)| v.to_string()).collect(),
            model_precisions: versions
                .iter()
                .map(|(v, p)| (v.to_string(), p.to_string()))
                .collect(),
            default_versions: vec![default.into()],
            ..crate::tests::worker(id, &["small"], 1)
        }
    }

    #[test]
    fn an_all_bf16_fleet_routes_adapter_jobs_as_asked() {
        let ws = [
            worker("a", &[("flux-dev@v1", "bf16")], "flux-dev@v1"),
            // An older worker reports no precisions: bf16.
            WorkerInfo {
                model_precisions: BTreeMap::new(),
                ..worker("b", &[("flux-dev@v2", "bf16")], "flux-dev@v2")
            },
        ];
        assert_eq!(lora_version(&ws, "flux-dev", None), Ok(None));
        assert_eq!(lora_version(&ws, "flux-dev", Some("flux-dev@v2")), Ok(None));
    }

    #[test]
    fn an_unpinned_adapter_job_is_pinned_to_the_most_held_bf16_version_when_a_worker_defaults_to_fp8() {
        let ws = [
            worker(
                "a",
                &[("flux-dev@q8", "fp8"), ("flux-dev@v1", "bf16")],
                "flux-dev@q8",
            ),
            worker(
                "b",
                &[("flux-dev@v1", "bf16"), ("flux-dev@v0", "bf16")],
                "flux-dev@v1",
            ),
            worker("c", &[("flux-dev@v0", "bf16")], "flux-dev@v0"),
            worker("d", &[("flux-dev@v1", "bf16")], "flux-dev@v1"),
        ];
        assert_eq!(
            lora_version(&ws, "flux-dev", None),
            Ok(Some("flux-dev@v1".into()))
        );
        // Ties go to a version some worker runs by default.
        let ws = [
            worker(
                "a",
                &[("flux-dev@q8", "fp8"), ("flux-dev@v9", "bf16")],
                "flux-dev@q8",
            ),
            worker("b", &[("flux-dev@v1", "bf16")], "flux-dev@v1"),
        ];
        assert_eq!(
            lora_version(&ws, "flux-dev", None),
            Ok(Some("flux-dev@v1".into()))
        );
    }

    #[test]
    fn an_adapter_job_is_rejected_with_the_versions_held_when_it_can_only_reach_fp8() {
        let ws = [worker("a", &[("flux-dev@q8", "fp8")], "flux-dev@q8")];
        let e = lora_version(&ws, "flux-dev", None).unwrap_err();
        assert!(
            e.contains("flux-dev@q8 (fp8) on a") && e.contains("ditfleetctl model load flux-dev@"),
            "{e}"
        );
        let ws = [worker(
            "a",
            &[("flux-dev@q8", "fp8"), ("flux-dev@v1", "bf16")],
            "flux-dev@v1",
        )];
        let e = lora_version(&ws, "flux-dev", Some("flux-dev@q8")).unwrap_err();
        assert!(
            e.contains("flux-dev@q8 computes in fp8") && e.contains("bf16 versions held now: flux-dev@v1"),
            "{e}"
        );
        // A bf16 default with an fp8 version only held beside it: unpinned jobs run on the default.
        assert_eq!(lora_version(&ws, "flux-dev", None), Ok(None));
    }

    #[test]
    fn other_models_and_their_versions_do_not_count() {
        let mut sdxl = worker("s", &[("sdxl-base@v1", "bf16")], "sdxl-base@v1");
        sdxl.models = vec!["sdxl-base".into()];
        // Same version names under another model, and a model whose name prefixes another's.
        let mut other = worker("o", &[("flux-devx@v1", "bf16")], "flux-devx@v1");
        other.models = vec!["flux-devx".into()];
        let ws = [sdxl, other, worker("a", &[("flux-dev@q8", "fp8")], "flux-dev@q8")];
        let e = lora_version(&ws, "flux-dev", None).unwrap_err();
        assert!(!e.contains("sdxl") && !e.contains("flux-devx"), "{e}");
        assert_eq!(lora_version(&ws, "sdxl-base", None), Ok(None));
    }
}
