//! Admission of a valid job against what this fleet holds (a pinned version some worker has
//! held, a served model, a LoRA stack the registry has for the job's model), and the LoRA affinity
//! choice of the worker that already holds a job's stack.

use super::{Ctx, HandleError};
use ditfleet_common::job::{FieldError, JobError, JobSpec, WorkOrder};
use ditfleet_common::lora::{Manifest, Registry, stack_key};
use ditfleet_common::state::WorkerInfo;

/// The checks of a valid job against what this fleet holds, after the contract's own rules
/// ([`JobSpec::validate`]): a pinned version some worker has held, a model the fleet serves, and
/// the job's LoRA stack. `Ok(Err(_))` is the rejection, every problem found.
pub(crate) async fn admit(
    ctx: &Ctx,
    spec: &JobSpec,
    pin: Option<&str>,
) -> Result<Result<(), JobError>, HandleError> {
    let mut errs = Vec::new();
    match pin {
        Some(mv) if !ctx.store.is_known_version(mv).await? => errs.push(FieldError {
            field: Some("model_version"),
            reason: format!(
                "no worker of this fleet has ever held {mv}; load it first (ditfleetctl model load {mv})"
            ),
        }),
        Some(_) => {}
        None => {
            if let Some(reason) = unserved_model(ctx, &spec.model).await? {
                errs.push(FieldError {
                    field: Some("model"),
                    reason,
                });
            }
        }
    }
    if !spec.loras.is_empty()
        && let Some(reason) = unavailable_loras(ctx, spec).await?
    {
        errs.push(FieldError {
            field: Some("loras"),
            reason,
        });
    }
    Ok(if errs.is_empty() {
        Ok(())
    } else {
        Err(JobError::Invalid(errs))
    })
}

/// Why the fleet cannot run the job's LoRA stack, if it cannot: the one place a job's adapters
/// are checked against the fleet's LoRA registry. Each must have a manifest there (a push that
/// has not finished has none) made for the job's model. Every problem is named, e.g.
/// `pixel-art@v9 is not in the LoRA registry (s3://bucket/prefix/loras)`. A registry that cannot
/// be read is not the job's fault: the submit message is requeued.
async fn unavailable_loras(ctx: &Ctx, spec: &JobSpec) -> Result<Option<String>, HandleError> {
    let Some(registry) = &ctx.registry else {
        return Ok(Some(
            "this fleet has no LoRA registry (DITFLEET_LORA_REGISTRY is not set on the scheduler), so a job cannot name adapters".into(),
        ));
    };
    let mut problems = Vec::new();
    for l in &spec.loras {
        match manifest(ctx, registry, &l.name, &l.version).await? {
            None => problems.push(format!(
                "{}@{} is not in the LoRA registry ({})",
                l.name,
                l.version,
                registry.describe()
            )),
            Some(m) if m.base_model != spec.model => problems.push(format!(
                "{}@{} was made for {}, not {}",
                l.name, l.version, m.base_model, spec.model
            )),
            Some(_) => {}
        }
    }
    Ok((!problems.is_empty()).then(|| problems.join("; ")))
}

/// The manifest of `name@version` (or its absence), from the cache while it is fresh.
async fn manifest(
    ctx: &Ctx,
    registry: &Registry,
    name: &str,
    version: &str,
) -> Result<Option<Manifest>, HandleError> {
    let key = (name.to_string(), version.to_string());
    let ttl = ctx.cfg.lora_manifest_cache;
    {
        let cache = ctx.manifests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, m)) = cache.get(&key)
            && at.elapsed() < ttl
        {
            return Ok(m.clone());
        }
    }
    let m = registry
        .manifest(name, version)
        .await
        .map_err(|e| HandleError::Registry(e.to_string()))?;
    let mut cache = ctx.manifests.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() > 10_000 {
        cache.retain(|_, (at, _)| at.elapsed() < ttl);
    }
    cache.insert(key, (std::time::Instant::now(), m.clone()));
    Ok(m)
}

/// The live worker that holds the order's LoRA stack applied and takes affinity jobs of its
/// class and model, if any (the one with the most free slots; ties by id). A busy one is still
/// chosen: the order waits for it at most the affinity bound.
pub(crate) fn hot_worker(ctx: &Ctx, order: &WorkOrder, class: &str) -> Option<String> {
    let key = stack_key(
        order
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.version.as_str(), l.scale as f32)),
    );
    let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
    pick_hot(&live.workers, &key, class, &order.model)
}

pub(crate) fn pick_hot(workers: &[WorkerInfo], stack: &str, class: &str, model: &str) -> Option<String> {
    workers
        .iter()
        .filter(|w| {
            w.affinity_queue
                && w.lora_stacks.iter().any(|s| s == stack)
                && w.classes.iter().any(|c| c == class)
                && w.models.iter().any(|m| m == model)
        })
        .max_by(|a, b| a.free_slots.cmp(&b.free_slots).then_with(|| b.id.cmp(&a.id)))
        .map(|w| w.id.clone())
}

/// Why the fleet does not serve `model`, if it does not: not in `DITFLEET_SERVED_MODELS`, or
/// (that unset) no worker ever held a version of it while others have registered. A fleet whose
/// workers never registered (a fresh install scaling from zero) accepts every known model: its
/// jobs wait for a worker that holds theirs.
async fn unserved_model(ctx: &Ctx, model: &str) -> Result<Option<String>, HandleError> {
    if let Some(served) = &ctx.cfg.served_models {
        return Ok((!served.iter().any(|m| m == model)).then(|| {
            format!(
                "this fleet serves {} (DITFLEET_SERVED_MODELS), not {model}",
                served.join(", ")
            )
        }));
    }
    let known = ctx.store.known_models().await?;
    Ok((!known.is_empty() && !known.contains(model)).then(|| {
        format!(
            "no worker of this fleet has ever held a version of {model} (it has held {}); start workers that serve it, or list it in DITFLEET_SERVED_MODELS to let its jobs wait",
            known.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    }))
}
