//! Prometheus metrics shared by the services (names match the Helm chart's alerts and dashboard).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub state: String,
    pub class: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
    pub class: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub version: String,
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~23 min
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// The metric families; register once per process with [`Metrics::new`].
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Jobs by the state they reached in this process (`routed`, `failed`, `succeeded`, `cancelled`,
    /// `requeued`, `dead_lettered`, `duplicate`).
    pub jobs: Family<JobLabels, Counter>,
    /// Seconds per stage: `queue_wait`, `generation`, `end_to_end`.
    pub durations: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// Jobs handed back for another attempt (transient failures, shutdown past grace).
    pub retries: Counter,
    /// Messages this process copied to the DLQ.
    pub dlq: Counter,
    /// 1 for the worker's current state (`ready`, `busy`, `draining`), 0 for the others.
    pub worker_state: Family<StateLabel, Gauge>,
    /// 1 for each model version loaded.
    pub model_loaded: Family<ModelLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            jobs: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            retries: Counter::default(),
            dlq: Counter::default(),
            worker_state: Family::default(),
            model_loaded: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("ditfleet");
        r.register(
            "jobs",
            "Jobs by the state they reached in this process",
            m.jobs.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Seconds per job stage",
            m.durations.clone(),
        );
        r.register(
            "job_retries",
            "Jobs handed back for another attempt",
            m.retries.clone(),
        );
        r.register("dlq", "Messages copied to the dead-letter queue", m.dlq.clone());
        r.register(
            "worker_state",
            "1 for the worker's current state",
            m.worker_state.clone(),
        );
        r.register(
            "model_loaded",
            "1 for each loaded model version",
            m.model_loaded.clone(),
        );
        m
    }

    pub fn job(&self, state: &str, class: &str, model: &str) {
        self.jobs
            .get_or_create(&JobLabels {
                state: state.into(),
                class: class.into(),
                model: model.into(),
            })
            .inc();
    }

    pub fn observe(&self, stage: &str, class: &str, model: &str, seconds: f64) {
        self.durations
            .get_or_create(&StageLabels {
                stage: stage.into(),
                class: class.into(),
                model: model.into(),
            })
            .observe(seconds);
    }

    pub fn set_worker_state(&self, current: &str) {
        for s in ["ready", "busy", "draining"] {
            self.worker_state
                .get_or_create(&StateLabel { state: s.into() })
                .set(i64::from(s == current));
        }
    }
}
