//! `ditfleetctl submit`: build the job from the flags, check it locally, publish it with a
//! confirm and follow its events (progress bar, `--wait`).

use super::*;

pub(crate) fn build_spec(a: &SubmitArgs) -> Result<(JobSpec, Vec<u8>)> {
    if let Some(path) = &a.file {
        let body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let spec = JobSpec::parse(&body).with_context(|| format!("{} is not a v1 job", path.display()))?;
        return Ok((spec, body));
    }
    let spec = JobSpec {
        schema_version: SCHEMA_VERSION,
        job_id: a
            .job_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        tenant: a.tenant.clone(),
        model: a.model.clone(),
        model_version: a.model_version.clone(),
        prompt: a.prompt.clone().unwrap_or_default(),
        negative_prompt: a.negative_prompt.clone(),
        true_cfg_scale: a.true_cfg_scale,
        plan: a.plan.clone(),
        width: a.width,
        height: a.height,
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a.scheduler.clone(),
        loras: a.loras.clone(),
        seed: a.seed,
        priority: match a.priority {
            PriorityArg::Low => Priority::Low,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::High => Priority::High,
        },
        deadline: a.deadline.clone(),
        reply_to: a.reply_to.clone(),
        labels: a.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let body = serde_json::to_vec(&spec)?;
    Ok((spec, body))
}

pub(crate) async fn submit(a: SubmitArgs, cfg: &CommonConfig) -> Result<i32> {
    let (spec, body) = build_spec(&a)?;
    // The job's trace starts here; its context travels in the submit message's headers.
    let span = tracing::info_span!(
        "submit",
        job_id = %spec.job_id,
        tenant = %spec.tenant,
        model = %spec.model,
        otel.kind = "producer",
        messaging.system = "rabbitmq",
    );
    submit_in_span(a, cfg, spec, body).instrument(span).await
}

/// How long ditfleetctl waits for the broker to finish a submission or an announcement.
const BROKER_RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Declares the topology only when it is missing, which makes a first submission safe before any
/// scheduler ran. A passive check needs no permission; a least-privileged backend user may not
/// declare, and when the topology is missing the mandatory publish after this says so.
pub(crate) async fn ensure_topology(conn: &lapin::Connection, topo: &Topology) -> Result<()> {
    let probe = conn.create_channel().await?;
    match amqp::passive_declare(&probe, &topo.submit_queue()).await {
        Ok(_) => {
            let _ = probe.close(200, "ok".into()).await;
        }
        // A failed passive declare closed the probe channel; declare on a fresh one.
        Err(_) => {
            let ch = conn.create_channel().await?;
            if let Err(e) = topo.declare(&ch, &[]).await {
                tracing::debug!(error = %e, "not declaring the topology (no configure permission?); using the existing one");
            }
        }
    }
    Ok(())
}

pub(crate) async fn submit_in_span(
    a: SubmitArgs,
    cfg: &CommonConfig,
    spec: JobSpec,
    body: Vec<u8>,
) -> Result<i32> {
    if !a.no_validate {
        spec.validate(&Limits {
            max_prompt_chars: ditfleet_common::job::SCHEMA_MAX_PROMPT_CHARS,
        })
        .context("the job is invalid (use --no-validate to let the scheduler record the rejection)")?;
    }
    let topo = Topology::new(&cfg.namespace);
    // Everything up to the confirmed publish is bounded: a broker that stops answering fails the
    // command with a reason instead of leaving it (and a backend's script) waiting forever.
    let setup = async {
        let conn = amqp::connect_cfg_once(cfg, "ditfleetctl")
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", config::redact_url(&cfg.amqp_url)))?;
        ensure_topology(&conn, &topo).await?;
        let ch = conn.create_channel().await?;
        // Subscribe before publishing so no event can be missed.
        let events = if a.wait {
            Some(
                topo.subscribe_events(&ch, &format!("job.{}.*", spec.job_id))
                    .await?,
            )
        } else {
            None
        };
        let publisher = Publisher::new(&conn).await?;
        let submitted = Instant::now();
        let mut headers = amqp::headers(&[("x-submitted-ms", now_ms().to_string())]);
        ditfleet_common::telemetry::inject_current(&mut headers);
        let props = persistent("application/json")
            .with_message_id(spec.job_id.as_str().into())
            .with_headers(headers);
        publisher
            .publish(
                &topo.submit_exchange(),
                ditfleet_common::topology::SUBMIT_KEY,
                &body,
                props,
                true,
            )
            .await
            .context("publishing the job")?;
        anyhow::Ok((conn, ch, events, submitted))
    };
    let (_conn, _ch, events, submitted) = tokio::time::timeout(BROKER_RPC_TIMEOUT, setup)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "RabbitMQ did not complete the submission within {} s; the job may or may not be queued (`ditfleetctl status {}` says)",
                BROKER_RPC_TIMEOUT.as_secs(),
                spec.job_id
            )
        })??;
    let Some(mut events) = events else {
        out!("{}", spec.job_id);
        return Ok(0);
    };
    eprintln!(
        "submitted job {} ({}x{}, model {})",
        spec.job_id, spec.width, spec.height, spec.model
    );
    let bar = ProgressBar::new(u64::from(
        spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model)),
    ));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<12} [{bar:30}] {pos}/{len} steps  {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message("queued");
    let tty = std::io::stderr().is_terminal();
    let own_hash = format!("{:016x}", ditfleet_common::job::fnv1a(&body));
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::sleep(Duration::from_secs(a.timeout_s));
    tokio::pin!(deadline);
    loop {
        let delivery = tokio::select! {
            _ = &mut deadline => {
                bar.abandon_with_message("timed out");
                eprintln!("no result after {} s; `ditfleetctl status {}` shows where it is", a.timeout_s, spec.job_id);
                return Ok(2);
            }
            d = events.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => bail!("event stream failed: {e}"),
                None => bail!("event stream closed"),
            }
        };
        let ev: JobEvent = match serde_json::from_slice(&delivery.data) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("ignoring an unreadable event: {e}");
                continue;
            }
        };
        // Only the fleet's own events about this job count: the routing key the fleet gives
        // them, the job's id in the body, and for a rejection, this very submission's body.
        if ev.job_id() != spec.job_id || delivery.routing_key.as_str() != ev.routing_key() {
            tracing::warn!(routing_key = %delivery.routing_key, event_job_id = %ev.job_id(), "ignoring an event that is not this job's");
            continue;
        }
        if let Some(id) = delivery.properties.message_id().as_ref()
            && ev.is_terminal()
            && !seen.insert(id.to_string())
        {
            continue;
        }
        match ev {
            JobEvent::Rejected {
                reason, body_hash, ..
            } => {
                if body_hash != own_hash {
                    // Another submission under this id was rejected; ours is the existing job.
                    continue;
                }
                bar.abandon_with_message("rejected");
                out!("job {} rejected: {reason}", spec.job_id);
                return Ok(1);
            }
            JobEvent::Progress {
                step, total, worker, ..
            } => {
                bar.set_length(u64::from(total));
                bar.set_position(u64::from(step));
                bar.set_message("running");
                if !tty && (step == 1 || step == total || step % 10 == 0) {
                    eprintln!("  step {step}/{total} on {worker}");
                }
            }
            JobEvent::Done {
                result_url,
                worker,
                engine,
                attempts,
                queue_wait_ms,
                generate_ms,
                store_ms,
                end_to_end_ms,
                timings,
                gpu_seconds,
                ..
            } => {
                bar.finish_with_message("done");
                let path = result_url.strip_prefix("file://").unwrap_or(&result_url);
                let f = |k: &str| timings.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                out!(
                    "job {} succeeded on worker {worker} (engine: {engine}, attempt {attempts})",
                    spec.job_id
                );
                out!("image: {path}");
                out!(
                    "stages: queue wait {queue_wait_ms} ms | generate {generate_ms} ms (text encode {:.0} ms, denoise {:.0} ms, decode {:.0} ms) | store {store_ms} ms | end to end {end_to_end_ms} ms",
                    f("encode_ms"),
                    f("denoise_ms"),
                    f("decode_ms")
                );
                let sampler = timings.get("scheduler").and_then(|v| v.as_str());
                let loras = timings
                    .get("loras")
                    .and_then(|v| serde_json::from_value::<Vec<LoraRef>>(v.clone()).ok())
                    .unwrap_or_default();
                if sampler.is_some() || !loras.is_empty() {
                    let loras: Vec<String> = loras.iter().map(LoraRef::label).collect();
                    out!(
                        "sampler: {} | loras: {}",
                        sampler.unwrap_or("-"),
                        if loras.is_empty() {
                            "none".into()
                        } else {
                            loras.join(", ")
                        }
                    );
                }
                out!("cost: {gpu_seconds:.3} GPU-seconds");
                if let Some(tp) = ditfleet_common::telemetry::current_traceparent() {
                    out!("trace: {tp}");
                }
                out!("client round trip: {} ms", submitted.elapsed().as_millis());
                return Ok(0);
            }
            JobEvent::Failed { state, reason, .. } => {
                bar.abandon_with_message(state.clone());
                out!("job {} {state}: {reason}", spec.job_id);
                return Ok(1);
            }
            JobEvent::Cancelled { at_step, .. } => {
                bar.abandon_with_message("cancelled");
                out!(
                    "job {} cancelled{}",
                    spec.job_id,
                    at_step.map(|s| format!(" at step {s}")).unwrap_or_default()
                );
                return Ok(1);
            }
        }
    }
}
