//! OpenTelemetry traces of real processes (ditfleetctl, scheduler, worker) exported over OTLP/HTTP
//! to a real receiver in the test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ditfleet_common::state::JobState;
use ditfleet_tests::Fleet;
use ditfleet_tests::otlp::{OtlpReceiver, RecordedSpan};
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(60);

fn by_name<'a>(spans: &'a [RecordedSpan], name: &str) -> Vec<&'a RecordedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [RecordedSpan], name: &str) -> &'a RecordedSpan {
    let found = by_name(spans, name);
    assert_eq!(
        found.len(),
        1,
        "expected one {name:?} span, got {}: {:#?}",
        found.len(),
        spans.iter().map(|s| (&s.service, &s.name)).collect::<Vec<_>>()
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_one_trace_from_ctl_submit_through_scheduler_route_to_worker_stages_and_ack() {
    let receiver = OtlpReceiver::start().await;
    let mut fleet = Fleet::new("otel-trace").await;
    fleet
        .env
        .insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint());
    fleet.env.insert("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into());
    let mut s = fleet.start_scheduler();
    let mut w = fleet.start_worker("w-otel", &[]);
    fleet.wait_workers(1, T).await;
    // The done event carries the trace context too.
    let ch = fleet.conn.create_channel().await.unwrap();
    let mut done_events = fleet.topo.subscribe_events(&ch, "job.otel-1.done").await.unwrap();

    let out = fleet.ctl_submit_wait(&[], "otel-1", 3, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_state("otel-1", JobState::Succeeded, T).await;
    // ditfleetctl prints the job's traceparent: 00-<trace id>-<span id>-<flags>.
    let traceparent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("trace: "))
        .unwrap_or_else(|| panic!("no trace line in {stdout}"));
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();
    assert_eq!(trace_id.len(), 32, "{traceparent}");
    let done = tokio::time::timeout(T, done_events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let event_tp =
        ditfleet_common::amqp::header_str(&done.properties, "traceparent").expect("traceparent on done");
    assert_eq!(event_tp.split('-').nth(1), Some(trace_id.as_str()), "{event_tp}");

    // The worker exports its spans in batches every 100 ms; wait for the last one (ack).
    let start = Instant::now();
    let spans = loop {
        let spans = receiver.trace(&trace_id);
        if spans.iter().any(|s| s.name == "ack") && spans.iter().any(|s| s.name == "submit") {
            break spans;
        }
        assert!(
            start.elapsed() < T,
            "trace incomplete after {T:?}: {:#?}",
            spans.iter().map(|s| (&s.service, &s.name)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Each process exported under its own service name.
    let services: HashMap<&str, &str> = spans
        .iter()
        .map(|s| (s.name.as_str(), s.service.as_str()))
        .collect();
    assert_eq!(services["submit"], "ditfleetctl");
    assert_eq!(services["route"], "ditfleet-scheduler");
    assert!(
        receiver
            .spans()
            .iter()
            .any(|s| s.name == "load" && s.service == "ditfleet-worker" && s.parent_span_id.is_empty()),
        "model loading is a trace of its own"
    );
    for n in [
        "job",
        "claim",
        "generate",
        "encode",
        "denoise",
        "step",
        "decode",
        "store",
        "publish_done",
        "ack",
    ] {
        assert_eq!(
            services.get(n).copied(),
            Some("ditfleet-worker"),
            "span {n}: {services:?}"
        );
    }

    // The spans hang together: submit → route → job → stages.
    let submit = one(&spans, "submit");
    assert_eq!(submit.parent_span_id, "", "submit is the root");
    assert_eq!(
        submit.attributes.get("job_id").map(String::as_str),
        Some("otel-1")
    );
    let route = one(&spans, "route");
    assert_eq!(
        route.parent_span_id, submit.span_id,
        "route continues the submitted context"
    );
    assert_eq!(route.attributes.get("class").map(String::as_str), Some("small"));
    let job = one(&spans, "job");
    assert_eq!(
        job.parent_span_id, route.span_id,
        "the worker continues the routed context"
    );
    let waits = by_name(&spans, "queue_wait");
    assert!(
        waits.iter().any(|q| q.parent_span_id == route.span_id
            && q.attributes.get("queue").map(String::as_str) == Some("submit")),
        "{waits:#?}"
    );
    assert!(
        waits.iter().any(|q| q.parent_span_id == job.span_id
            && q.attributes.get("queue").map(String::as_str) == Some("work")),
        "{waits:#?}"
    );
    for n in ["claim", "generate", "store", "publish_done", "ack"] {
        assert_eq!(
            one(&spans, n).parent_span_id,
            job.span_id,
            "{n} is a child of job"
        );
    }
    let generate = one(&spans, "generate");
    for n in ["encode", "denoise", "decode"] {
        assert_eq!(
            one(&spans, n).parent_span_id,
            generate.span_id,
            "{n} is a child of generate"
        );
    }
    let denoise = one(&spans, "denoise");
    let steps = by_name(&spans, "step");
    assert_eq!(steps.len(), 3, "one span per denoising step");
    let mut step_numbers: Vec<String> = steps.iter().map(|s| s.attributes["step"].clone()).collect();
    step_numbers.sort();
    assert_eq!(step_numbers, ["1", "2", "3"]);
    assert!(steps.iter().all(|s| s.parent_span_id == denoise.span_id));
    // Times are consistent: the stages lie within the job, in order.
    let claim = one(&spans, "claim");
    let store = one(&spans, "store");
    let ack = one(&spans, "ack");
    assert!(job.start_ns <= claim.start_ns && claim.end_ns <= generate.start_ns);
    assert!(generate.end_ns <= store.start_ns && store.end_ns <= ack.start_ns);
    assert!(ack.end_ns <= job.end_ns);
    assert!(route.start_ns >= submit.start_ns && job.end_ns <= submit.end_ns + 1_000_000_000);

    // Clean shutdown flushes whatever is left.
    s.signal(libc::SIGTERM);
    w.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(T), Some(Some(0)));
    assert_eq!(w.wait_exit(T), Some(Some(0)));
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_off_without_an_endpoint_and_a_grpc_protocol_is_refused_at_start() {
    let fleet = Fleet::new("otel-off").await;
    let s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-otel-off", &[]);
    fleet.wait_workers(1, T).await;
    let out = fleet.ctl_submit_wait(&[], "otel-off", 2, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Where the job stopped: ditfleetctl's own account, the job's record, the scheduler's log.
        panic!(
            "ditfleetctl submit --wait failed\nstdout: {stdout}\nstderr: {}\njob state: {:?}\nscheduler log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            fleet.state("otel-off").await,
            s.log_text()
        );
    }
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(
        !stdout.contains("trace: "),
        "no trace id without tracing: {stdout}"
    );

    // Only OTLP over HTTP/protobuf is built in: asking for gRPC is a configuration error (exit 64)
    // rather than silently missing traces.
    let mut p = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler-grpc",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    assert_eq!(p.wait_exit(T), Some(Some(64)));
    assert!(
        p.log_text().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
        "{}",
        p.log_text()
    );
    fleet.teardown().await;
}
