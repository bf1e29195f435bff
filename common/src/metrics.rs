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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// `submit`, `work` or `dead`.
    pub queue: String,
    /// The work queue's class; `none` for the submit queue and the DLQ.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub class: String,
    pub model: String,
    pub tenant: String,
}

/// A LoRA adapter cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoraCacheLabels {
    /// `download` (the worker's verified files) or `engine` (adapters the engine holds loaded).
    pub cache: String,
    /// `hit` or `miss`.
    pub result: String,
}

/// Which LoRA cache.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoraCacheName {
    pub cache: String,
}

/// A float counter (seconds).
pub type SecondsCounter = Counter<f64, std::sync::atomic::AtomicU64>;

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
    /// 1 for the worker's current state (`ready`, `busy`, `draining`, `degraded`, `reconnecting`), 0 for the others.
    pub worker_state: Family<StateLabel, Gauge>,
    /// 1 for each model version loaded.
    pub model_loaded: Family<ModelLabels, Gauge>,
    /// Messages ready in each queue (scheduler, polled with passive declares).
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Consumers attached to each queue (scheduler).
    pub queue_consumers: Family<QueueLabels, Gauge>,
    /// Seconds the oldest job waiting in a work queue has waited since it was routed (0 when
    /// none waits; scheduler, from Redis).
    pub queue_oldest_age: Family<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Cost (image tokens x steps x model factor) of the jobs finished, per class, model, tenant.
    pub job_cost: Family<CostLabels, Counter>,
    /// GPU-seconds (devices of the job's plan x its generation wall time; on a CPU-only worker
    /// its CPU device counts alike) of the jobs that ran to an end here, successful or not, per
    /// class, model, tenant.
    pub gpu_seconds: Family<CostLabels, SecondsCounter>,
    /// GPU-seconds of this worker by what its devices did: `startup` (loading the engine),
    /// `busy` (slots running jobs), `idle` (slots waiting). Their sum over all workers, divided by
    /// the succeeded jobs, is the cost per image including idle, start-up and failed work.
    pub worker_gpu_seconds: Family<StateLabel, SecondsCounter>,
    /// LoRA adapter cache lookups (`ditfleet_lora_cache_total`).
    pub lora_cache: Family<LoraCacheLabels, Counter>,
    /// Bytes per LoRA cache (`ditfleet_lora_cache_bytes`).
    pub lora_cache_bytes: Family<LoraCacheName, Gauge>,
    /// Stack switch (apply) time (`ditfleet_lora_apply_seconds`).
    pub lora_apply: Histogram,
    /// Scheduler: jobs with adapters by route (`ditfleet_lora_routed_total{via}`).
    pub lora_affinity: Family<StateLabel, Counter>,
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
            queue_depth: Family::default(),
            queue_consumers: Family::default(),
            queue_oldest_age: Family::default(),
            job_cost: Family::default(),
            gpu_seconds: Family::default(),
            worker_gpu_seconds: Family::default(),
            lora_cache: Family::default(),
            lora_cache_bytes: Family::default(),
            lora_apply: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            lora_affinity: Family::default(),
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
        r.register(
            "queue_depth",
            "Messages ready in each queue",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_consumers",
            "Consumers attached to each queue",
            m.queue_consumers.clone(),
        );
        r.register(
            "queue_oldest_age_seconds",
            "Seconds the oldest job waiting in a work queue has waited since routing",
            m.queue_oldest_age.clone(),
        );
        r.register(
            "job_cost_token_steps",
            "Cost of the finished jobs in token-steps",
            m.job_cost.clone(),
        );
        r.register(
            "job_gpu_seconds",
            "GPU-seconds of the jobs run here (devices of the plan x generation time)",
            m.gpu_seconds.clone(),
        );
        r.register(
            "lora_cache",
            "LoRA adapter lookups by cache (download: the worker's verified files; engine: adapters held loaded) and result (hit, miss)",
            m.lora_cache.clone(),
        );
        r.register(
            "lora_cache_bytes",
            "Bytes held by each LoRA adapter cache",
            m.lora_cache_bytes.clone(),
        );
        r.register(
            "lora_apply_seconds",
            "Seconds an engine took to switch its applied LoRA stack (jobs that found their stack hot add nothing)",
            m.lora_apply.clone(),
        );
        r.register(
            "lora_routed",
            "Jobs with a LoRA stack routed by the scheduler, by where (affinity: a worker holding the stack; class: the class queue)",
            m.lora_affinity.clone(),
        );
        r.register(
            "worker_gpu_seconds",
            "GPU-seconds of this worker by activity (startup, busy, idle)",
            m.worker_gpu_seconds.clone(),
        );
        m
    }

    /// Accounts a job that ran on `devices` devices for `seconds`.
    pub fn job_cost(&self, class: &str, model: &str, tenant: &str, cost: u64, devices: u32, seconds: f64) {
        let l = CostLabels {
            class: class.into(),
            model: model.into(),
            tenant: tenant.into(),
        };
        self.job_cost.get_or_create(&l).inc_by(cost);
        self.gpu_seconds
            .get_or_create(&l)
            .inc_by(f64::from(devices) * seconds);
    }

    /// Adds GPU-seconds to `state` (`startup`, `busy`, `idle`).
    pub fn device_time(&self, state: &str, gpu_seconds: f64) {
        if gpu_seconds > 0.0 {
            self.worker_gpu_seconds
                .get_or_create(&StateLabel { state: state.into() })
                .inc_by(gpu_seconds);
        }
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
        for s in ["ready", "busy", "draining", "degraded", "reconnecting"] {
            self.worker_state
                .get_or_create(&StateLabel { state: s.into() })
                .set(i64::from(s == current));
        }
    }
}
