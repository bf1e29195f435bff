//! Reading the fleet: `status`, `workers` and `cancel`.

use super::*;

pub(crate) async fn status(job_id: &str, json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let mut h = s.get(job_id).await?;
    if h.is_empty() {
        eprintln!("no job {job_id:?} (never submitted, or its status expired)");
        return Ok(3);
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(0);
    }
    h.remove("spec");
    let mut keys: Vec<_> = h.keys().cloned().collect();
    keys.sort_by_key(|k| (k != "state", k.clone()));
    for k in keys {
        out!("{k:<16} {}", h[&k]);
    }
    Ok(0)
}

/// The `MODEL VERSIONS` cell of `workers`: each held version, `*` marking a model's default and
/// its precision in parentheses (`*flux-dev@v2(fp8)`; none from workers that predate the field),
/// then the versions being loaded.
pub(crate) fn version_list(w: &WorkerInfo) -> String {
    w.model_versions
        .iter()
        .map(|mv| {
            let default = if w.default_versions.contains(mv) { "*" } else { "" };
            match w.model_precisions.get(mv) {
                Some(p) => format!("{default}{mv}({p})"),
                None => format!("{default}{mv}"),
            }
        })
        .chain(w.loading.iter().map(|mv| format!("{mv}(loading)")))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn workers(json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let list = s.workers().await?;
    let infos: Vec<WorkerInfo> = list
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect();
    if json {
        out!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    if infos.is_empty() {
        out!("no live workers");
        return Ok(0);
    }
    out!(
        "{:<24} {:<9} {:<22} {:>5} {:<34} {:<18} {:>6} {:>9}",
        "WORKER",
        "STATE",
        "CLASSES",
        "FREE",
        "MODEL VERSIONS (*dflt)(precision)",
        "GPUS",
        "DEGREE",
        "HEARTBEAT"
    );
    let now = now_ms();
    for w in infos {
        let gpus = if w.gpus.is_empty() {
            w.devices.join(",")
        } else {
            format!("{}x {}", w.gpus.len(), w.gpus[0].name.replace("NVIDIA ", ""))
        };
        let versions = version_list(&w);
        out!(
            "{:<24} {:<9} {:<22} {:>2}/{:<2} {:<34} {:<18} {:>6} {:>7}ms",
            w.id,
            w.state,
            w.classes.join(","),
            w.free_slots,
            w.slots,
            versions,
            gpus,
            w.parallel_degree,
            now.saturating_sub(w.heartbeat_ms)
        );
        if !w.engine_note.is_empty() {
            out!("  {} engine: {}", w.engine, w.engine_note);
        }
        if let Some(r) = &w.degraded_reason {
            out!("  degraded: {r}");
        }
        if let Some(e) = &w.load_error {
            out!("  last model load failed: {e}");
        }
        if !w.lora_stacks.is_empty() {
            out!("  lora applied: {}", w.lora_stacks.join(" | "));
        }
        if !w.lora_cached.is_empty() {
            out!("  lora cached: {}", w.lora_cached.join(","));
        }
    }
    Ok(0)
}

pub(crate) async fn cancel(job_id: &str, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let (applied, prev) = s
        .transition(
            job_id,
            &[
                Some(JobState::Queued),
                Some(JobState::Routed),
                Some(JobState::Running),
            ],
            JobState::Cancelled,
            None,
            &[
                ("finished_ms", now_ms().to_string()),
                ("error", "cancelled by operator".into()),
            ],
        )
        .await?;
    match (applied, prev) {
        (true, Some(JobState::Running)) => {
            out!("job {job_id} cancelled; its worker stops it at the next step");
        }
        (true, _) => {
            // Nobody runs it: announce the cancellation here.
            let topo = Topology::new(&cfg.namespace);
            let conn = amqp::connect_cfg_once(cfg, "ditfleetctl").await?;
            ensure_topology(&conn, &topo).await?;
            let p = Publisher::new(&conn).await?;
            let ev = JobEvent::Cancelled {
                job_id: job_id.to_string(),
                at_step: None,
            };
            p.publish(
                &topo.events_exchange(),
                &ev.routing_key(),
                &serde_json::to_vec(&ev)?,
                persistent("application/json"),
                false,
            )
            .await?;
            out!("job {job_id} cancelled before it started");
        }
        (false, None) => {
            eprintln!("no job {job_id:?}");
            return Ok(3);
        }
        (false, Some(st)) => {
            eprintln!("job {job_id} is already {st}; nothing to cancel");
            return Ok(4);
        }
    }
    Ok(0)
}
