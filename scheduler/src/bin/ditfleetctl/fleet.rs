//! Operating workers: `drain`, `model load` (hot swap) and `model unload`.

use super::*;

pub(crate) async fn drain(worker: &str, wait: bool, timeout: Duration, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let Some(w) = live_workers(&s).await?.into_iter().find(|w| w.id == worker) else {
        eprintln!("no live worker {worker:?} (ditfleetctl workers lists them)");
        return Ok(3);
    };
    s.control_set(Some(worker), "drain", "1").await?;
    out!(
        "draining worker {worker} ({} of {} slots busy); it finishes its running jobs and exits",
        w.slots.saturating_sub(w.free_slots),
        w.slots
    );
    if !wait {
        return Ok(0);
    }
    let start = Instant::now();
    let mut last_state = String::new();
    loop {
        match live_workers(&s).await?.into_iter().find(|w| w.id == worker) {
            None => {
                out!("worker {worker} drained and deregistered");
                return Ok(0);
            }
            Some(w) if w.state != last_state => {
                eprintln!(
                    "  {worker}: {} ({} of {} slots busy)",
                    w.state,
                    w.slots.saturating_sub(w.free_slots),
                    w.slots
                );
                last_state = w.state;
            }
            Some(_) => {}
        }
        if start.elapsed() > timeout {
            eprintln!(
                "worker {worker} is still registered after {} s",
                timeout.as_secs()
            );
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn model_load(
    model_version: &str,
    targets: &[String],
    keep_old: bool,
    wait: bool,
    timeout: Duration,
    cfg: &CommonConfig,
) -> Result<i32> {
    let (model, _) = ditfleet_common::job::parse_model_version(model_version).map_err(anyhow::Error::msg)?;
    let s = store(cfg).await?;
    let live = live_workers(&s).await?;
    let unknown: Vec<&String> = targets
        .iter()
        .filter(|t| !live.iter().any(|w| &w.id == *t))
        .collect();
    if !unknown.is_empty() {
        eprintln!("no live worker {unknown:?} (ditfleetctl workers lists them)");
        return Ok(3);
    }
    // The desired list: the new version first (the default), then what stays.
    let desired = |current: &[String]| -> String {
        let mut v = vec![model_version.to_string()];
        if keep_old {
            v.extend(
                current
                    .iter()
                    .filter(|mv| mv.split('@').next() == Some(model.as_str()) && mv.as_str() != model_version)
                    .cloned(),
            );
        }
        serde_json::to_string(&v).expect("list serialises")
    };
    let scope: Vec<&WorkerInfo> = if targets.is_empty() {
        let all_held: Vec<String> = live.iter().flat_map(|w| w.model_versions.clone()).collect();
        s.control_set(None, "models", &desired(&all_held)).await?;
        // Per-worker overrides of this model would win over the fleet setting: drop them.
        for w in &live {
            let own = s.control(&w.id).await?;
            if own.contains_key("models") {
                s.control_del(Some(&w.id), "models").await?;
            }
        }
        live.iter().collect()
    } else {
        let mut v = Vec::new();
        for w in live.iter().filter(|w| targets.contains(&w.id)) {
            s.control_set(Some(&w.id), "models", &desired(&w.model_versions))
                .await?;
            v.push(w);
        }
        v
    };
    let ids: Vec<String> = scope.iter().map(|w| w.id.clone()).collect();
    out!(
        "{model_version} requested on {}",
        if targets.is_empty() {
            "the whole fleet".to_string()
        } else {
            ids.join(", ")
        }
    );
    if !wait {
        return Ok(0);
    }
    let start = Instant::now();
    loop {
        let now = live_workers(&s).await?;
        let mut pending = Vec::new();
        for id in &ids {
            match now.iter().find(|w| &w.id == id) {
                None => {} // gone (drained or died): nothing to wait for
                Some(w) if w.default_versions.iter().any(|d| d == model_version) => {}
                Some(w) => {
                    if let Some(err) = w.load_error.as_ref().filter(|e| e.starts_with(model_version)) {
                        out!("worker {id} failed to load {model_version}: {err}");
                        return Ok(1);
                    }
                    pending.push(id.clone());
                }
            }
        }
        if pending.is_empty() {
            out!("{model_version} serves on {}", ids.join(", "));
            return Ok(0);
        }
        if start.elapsed() > timeout {
            eprintln!(
                "still loading after {} s on: {}",
                timeout.as_secs(),
                pending.join(", ")
            );
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn model_unload(model_version: &str, targets: &[String], cfg: &CommonConfig) -> Result<i32> {
    let (model, _) = ditfleet_common::job::parse_model_version(model_version).map_err(anyhow::Error::msg)?;
    let s = store(cfg).await?;
    let live = live_workers(&s).await?;
    let mut changed = 0;
    for w in live
        .iter()
        .filter(|w| targets.is_empty() || targets.contains(&w.id))
    {
        let keep: Vec<String> = w
            .default_versions
            .iter()
            .chain(w.model_versions.iter())
            .filter(|mv| mv.split('@').next() == Some(model.as_str()) && mv.as_str() != model_version)
            .fold(Vec::new(), |mut acc, mv| {
                if !acc.contains(mv) {
                    acc.push(mv.clone());
                }
                acc
            });
        if !w.model_versions.iter().any(|mv| mv == model_version) {
            continue;
        }
        if keep.is_empty() {
            eprintln!(
                "worker {}: {model_version} is its only version of {model}; load another first",
                w.id
            );
            return Ok(1);
        }
        s.control_set(Some(&w.id), "models", &serde_json::to_string(&keep)?)
            .await?;
        changed += 1;
    }
    out!("{model_version} unloaded on {changed} worker(s)");
    Ok(0)
}
