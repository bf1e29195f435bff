//! Load test: pushes N jobs through a real scheduler and W real worker processes (simulated
//! engine) over the local RabbitMQ and Redis, and reports scheduler throughput and submit→start
//! latency. A benchmark, not a test: it asserts only that every job ended exactly once.
//!
//!   cargo run --release -p ditfleet-tests --bin ditfleet-loadtest -- --jobs 5000 --workers 4

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use ditfleet_common::amqp::{self, now_ms, persistent};
use ditfleet_common::topology::SUBMIT_KEY;
use ditfleet_tests::{Fleet, job, percentile};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "ditfleet load test: N jobs through a scheduler and W simulated-engine workers")]
struct Args {
    #[arg(long, default_value_t = 5000)]
    jobs: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Concurrent jobs per worker.
    #[arg(long, default_value_t = 4)]
    slots: u16,
    /// Denoising steps per job.
    #[arg(long, default_value_t = 2)]
    steps: u32,
    /// Simulated milliseconds per step.
    #[arg(long, default_value_t = 1)]
    step_ms: u64,
    /// Offered load in jobs/s; 0 publishes everything at once (burst).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut fleet = Fleet::new("load").await;
    fleet.env.insert("DITFLEET_LOG".into(), "warn".into());
    fleet
        .env
        .insert("DITFLEET_SIM_STEP_MS".into(), a.step_ms.to_string());
    fleet
        .env
        .insert("DITFLEET_SCHEDULER_PREFETCH".into(), "256".into());
    let _s = fleet.start_scheduler();
    let slots = a.slots.to_string();
    let workers: Vec<_> = (0..a.workers)
        .map(|i| {
            fleet.start_worker(
                &format!("load-w{i}"),
                &[("DITFLEET_WORKER_SLOTS", slots.as_str())],
            )
        })
        .collect();
    fleet.wait_workers(a.workers, Duration::from_secs(60)).await;
    eprintln!(
        "loadtest: {} workers x {} slots ready; publishing {} jobs ({})",
        a.workers,
        a.slots,
        a.jobs,
        if a.rate > 0.0 {
            format!("{} jobs/s", a.rate)
        } else {
            "burst".into()
        }
    );

    let started = Instant::now();
    let inflight = Arc::new(Semaphore::new(128));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.jobs {
        if a.rate > 0.0 {
            let due = Duration::from_secs_f64(i as f64 / a.rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let permit = inflight.clone().acquire_owned().await?;
        let publisher = fleet.publisher.clone();
        let exchange = fleet.topo.submit_exchange();
        let spec = job(&format!("load-{i}"), a.steps);
        tasks.spawn(async move {
            let body = serde_json::to_vec(&spec).expect("job serialises");
            let props = persistent("application/json")
                .with_message_id(spec.job_id.as_str().into())
                .with_headers(amqp::headers(&[("x-submitted-ms", now_ms().to_string())]));
            let r = publisher.publish(&exchange, SUBMIT_KEY, &body, props, true).await;
            drop(permit);
            r
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let publish_s = started.elapsed().as_secs_f64();
    eprintln!(
        "loadtest: published {} jobs in {publish_s:.2} s; waiting for results",
        a.jobs
    );

    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    loop {
        let done = fleet.events.count_kind("done");
        if done >= a.jobs {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {} jobs finished in {} s", a.jobs, a.timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (mut start_lat, mut route_lat, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let (mut first_submit, mut last_routed, mut last_finished) = (u64::MAX, 0u64, 0u64);
    let mut reruns = 0;
    for i in 0..a.jobs {
        let h = fleet.store.get(&format!("load-{i}")).await?;
        let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if h.get("state").map(String::as_str) != Some("succeeded") {
            bail!("job load-{i} ended {:?}", h.get("state"));
        }
        if n("attempts") != 1 {
            reruns += 1;
        }
        first_submit = first_submit.min(n("submitted_ms"));
        last_routed = last_routed.max(n("routed_ms"));
        last_finished = last_finished.max(n("finished_ms"));
        start_lat.push(n("started_ms").saturating_sub(n("submitted_ms")));
        route_lat.push(n("routed_ms").saturating_sub(n("submitted_ms")));
        e2e.push(n("finished_ms").saturating_sub(n("submitted_ms")));
    }
    for v in [&mut start_lat, &mut route_lat, &mut e2e] {
        v.sort_unstable();
    }
    let dones = fleet.events.count_kind("done");
    let route_span_s = (last_routed.saturating_sub(first_submit)) as f64 / 1e3;
    let total_span_s = (last_finished.saturating_sub(first_submit)) as f64 / 1e3;
    println!(
        "| jobs | workers x slots | steps x ms | offered load | scheduler throughput (routed jobs/s) | completed jobs/s | submit→routed p50 / p99 ms | submit→start p50 / p99 / max ms | submit→done p50 / p99 ms | re-runs | duplicate done events |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} x {} | {} x {} | {} | {:.0} | {:.0} | {} / {} | {} / {} / {} | {} / {} | {} | {} |",
        a.jobs,
        a.workers,
        a.slots,
        a.steps,
        a.step_ms,
        if a.rate > 0.0 {
            format!("{} jobs/s", a.rate)
        } else {
            format!("burst ({:.0} jobs/s published)", a.jobs as f64 / publish_s)
        },
        a.jobs as f64 / route_span_s,
        a.jobs as f64 / total_span_s,
        percentile(&route_lat, 50.0),
        percentile(&route_lat, 99.0),
        percentile(&start_lat, 50.0),
        percentile(&start_lat, 99.0),
        start_lat.last().copied().unwrap_or(0),
        percentile(&e2e, 50.0),
        percentile(&e2e, 99.0),
        reruns,
        dones - a.jobs,
    );
    eprintln!("loadtest: wall {wall_s:.2} s");
    drop(workers);
    fleet.teardown().await;
    if dones != a.jobs || reruns != 0 {
        bail!("{} done events for {} jobs, {reruns} re-runs", dones, a.jobs);
    }
    Ok(())
}
