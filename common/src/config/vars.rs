//! The documented `DITFLEET_*` variables of each service (its `--help`, and what the docs list):
//! one table per service, checked against the tree by `tests/env_vars_documented.rs`.

/// One documented variable (for `--help` and the docs).
#[derive(Debug, Clone, Copy)]
pub struct VarDoc {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Variables every service reads.
pub const COMMON_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_AMQP_URL",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        help: "RabbitMQ URL (amqp:// or amqps://)",
    },
    VarDoc {
        name: "DITFLEET_REDIS_URL",
        default: "redis://127.0.0.1:6379/0",
        help: "Redis URL (redis:// or rediss://)",
    },
    VarDoc {
        name: "DITFLEET_NAMESPACE",
        default: "ditfleet",
        help: "prefix of every exchange, queue and Redis key",
    },
    VarDoc {
        name: "DITFLEET_LOG",
        default: "info",
        help: "tracing filter, e.g. info,ditfleet_worker=debug",
    },
    VarDoc {
        name: "DITFLEET_LOG_FORMAT",
        default: "text",
        help: "log format: text or json",
    },
    VarDoc {
        name: "DITFLEET_JOB_TTL_S",
        default: "604800",
        help: "seconds a job's status is kept in Redis after its last change",
    },
    VarDoc {
        name: "DITFLEET_HTTP_ADDR",
        default: "unset (not served)",
        help: "address of /healthz, /readyz and /metrics, e.g. 0.0.0.0:9090",
    },
    VarDoc {
        name: "DITFLEET_AMQP_CA_FILE",
        default: "system roots",
        help: "PEM file of CA certificates trusted for amqps:// (e.g. a private CA)",
    },
    VarDoc {
        name: "DITFLEET_REDIS_CA_FILE",
        default: "system roots",
        help: "PEM file of CA certificates trusted for rediss:// (e.g. a private CA)",
    },
    VarDoc {
        name: "DITFLEET_BROKER_RECOVERY_TIMEOUT_MS",
        default: "60000",
        help: "a worker or scheduler without a working RabbitMQ connection, channels and consumers for this long exits with code 1 (for its supervisor to restart it); shorter outages are ridden out by reconnecting",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: "unset (traces off)",
        help: "OTLP/HTTP collector base URL, e.g. http://otel-collector:4318; setting it turns traces on",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        default: "<endpoint>/v1/traces",
        help: "full OTLP/HTTP traces URL (instead of OTEL_EXPORTER_OTLP_ENDPOINT)",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: "http/protobuf",
        help: "only http/protobuf is built in (no gRPC: use the collector's HTTP port 4318)",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_HEADERS",
        default: "unset",
        help: "extra export headers, k1=v1,k2=v2 (e.g. an API key)",
    },
    VarDoc {
        name: "OTEL_SERVICE_NAME",
        default: "the binary's name",
        help: "service.name of the exported spans",
    },
    VarDoc {
        name: "OTEL_TRACES_SAMPLER",
        default: "parentbased_always_on",
        help: "sampler, e.g. parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG=0.1",
    },
    VarDoc {
        name: "OTEL_BSP_SCHEDULE_DELAY",
        default: "5000",
        help: "milliseconds between span batch exports",
    },
    VarDoc {
        name: "OTEL_SDK_DISABLED",
        default: "false",
        help: "true turns traces off even with an endpoint set",
    },
];

/// Variables the scheduler reads (besides [`COMMON_VARS`]).
pub const SCHEDULER_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_SCHEDULER_PREFETCH",
        default: "64",
        help: "submit messages handled concurrently",
    },
    VarDoc {
        name: "DITFLEET_CLASSES",
        default: "small=50000,medium=250000,large=1500000,xlarge",
        help: "job classes by cost (image tokens x steps x model factor), ascending upper bounds; the last has none",
    },
    VarDoc {
        name: "DITFLEET_MAX_PROMPT_CHARS",
        default: "2000",
        help: "longest accepted prompt and negative prompt, in characters",
    },
    VarDoc {
        name: "DITFLEET_SERVED_MODELS",
        default: "(the models workers of the fleet ever held)",
        help: "comma list of the models this fleet serves: jobs for other models are rejected; unset, a job is rejected only for a model no worker ever held once some worker has registered (a fleet that never had a worker accepts jobs, so scale-from-zero works)",
    },
    VarDoc {
        name: "DITFLEET_QUEUE_POLL_S",
        default: "5",
        help: "seconds between reads of the queue depths for ditfleet_queue_depth",
    },
    VarDoc {
        name: "DITFLEET_TENANT_RATE",
        default: "0",
        help: "jobs per second each tenant may submit (token bucket refill rate); 0 = unlimited",
    },
    VarDoc {
        name: "DITFLEET_TENANT_BURST",
        default: "20",
        help: "token bucket size per tenant: jobs a tenant may submit at once after idling",
    },
    VarDoc {
        name: "DITFLEET_TENANT_LIMITS",
        default: "none",
        help: "per-tenant overrides as tenant=rate:burst, comma-separated, e.g. acme=5:50,trial=0.1:3 (rate 0 = unlimited)",
    },
    VarDoc {
        name: "DITFLEET_BALANCE_INTERVAL_MS",
        default: "1000",
        help: "how often the scheduler refreshes live load (workers, queue depths, step-time calibration)",
    },
    VarDoc {
        name: "DITFLEET_SPILL",
        default: "1",
        help: "1: a job whose class has a backlog goes to an idle bigger class; 0: always its cost class",
    },
    VarDoc {
        name: "DITFLEET_LORA_REGISTRY",
        default: "unset (jobs naming LoRA adapters are rejected)",
        help: "the LoRA registry: s3://bucket[/prefix] (the result store's bucket; AWS_* variables as for DITFLEET_RESULT_URL) or file:///dir (e.g. the model root); adapters are <prefix>/loras/<name>/<version>/ (docs/message-contract.md)",
    },
    VarDoc {
        name: "DITFLEET_LORA_MANIFEST_CACHE_MS",
        default: "5000",
        help: "how long the scheduler reuses an adapter's manifest (or its absence) when admitting jobs",
    },
    VarDoc {
        name: "DITFLEET_AFFINITY_WAIT_MS",
        default: "3000",
        help: "LoRA affinity: longest time a job waits in the queue of a worker that holds its adapter stack applied before any worker of its class may take it; 0 = no affinity",
    },
];

/// Variables the worker reads (besides [`COMMON_VARS`]).
pub const WORKER_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_WORKER_ID",
        default: "<hostname>-<pid>",
        help: "unique id of this worker in the fleet",
    },
    VarDoc {
        name: "DITFLEET_WORKER_CLASSES",
        default: "all classes",
        help: "comma list of job classes this worker consumes",
    },
    VarDoc {
        name: "DITFLEET_WORKER_SLOTS",
        default: "1",
        help: "jobs run concurrently (the consumer prefetch)",
    },
    VarDoc {
        name: "DITFLEET_ENGINE",
        default: "flux",
        help: "engine: flux (the real pipelines, Flux.1 or SDXL by the model directory; tiny random-weight Flux and SDXL configs when no model directory is set) or simulated",
    },
    VarDoc {
        name: "DITFLEET_SIM_STEP_MS",
        default: "20",
        help: "simulated engine: milliseconds per denoising step",
    },
    VarDoc {
        name: "DITFLEET_SIM_LOAD_MS",
        default: "0",
        help: "simulated engine: milliseconds its model load takes (start-up probe and SIGTERM-while-loading tests)",
    },
    VarDoc {
        name: "DITFLEET_MODEL_DIR",
        default: "unset",
        help: "diffusers-layout model directory, Flux.1 or SDXL (told apart by its model_index.json); an SDXL folder may hold the single-file checkpoint instead of per-component weights",
    },
    VarDoc {
        name: "FLUX_MODEL_DIR",
        default: "unset",
        help: "the model directory when DITFLEET_MODEL_DIR is unset (its older name)",
    },
    VarDoc {
        name: "DITFLEET_LOW_MEMORY",
        default: "0",
        help: "1: Flux text encoders are loaded per request and freed after encoding (less device memory, slower encode)",
    },
    VarDoc {
        name: "DITFLEET_PRECISION",
        default: "bf16",
        help: "numeric format of the Flux transformer: bf16 or fp8 (e4m3 linear layers; fast on Hopper/Ada GPUs, emulated slowly on the CPU; SDXL is bf16 only); applies to DITFLEET_MODEL_DIR and is the default of the versions under DITFLEET_MODEL_ROOT, whose folder's ditfleet.json may set {\"precision\": \"fp8\"}; tiny-random-<seed>-fp8 is the tiny config in fp8",
    },
    VarDoc {
        name: "DITFLEET_PLAN",
        default: "single",
        help: "Flux: how one image is split over DITFLEET_DEVICES, e.g. ulysses=4, ring=2,ulysses=2, cfg=2,ulysses=2, dp=2,ulysses=2, or auto: measure every plan on first start and run each job with the fastest for its size (docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_PLAN_CACHE",
        default: "$XDG_CACHE_HOME/ditfleet/plans.json",
        help: "with DITFLEET_PLAN=auto: where the measured plan table is kept (measured again when the devices, model or engine version change); falls back to ~/.cache, then /tmp",
    },
    VarDoc {
        name: "DITFLEET_AUTOTUNE_SIZES",
        default: "1024x1024,2048x2048",
        help: "with DITFLEET_PLAN=auto: image sizes the plans are measured at; a job runs the fastest plan of the nearest size",
    },
    VarDoc {
        name: "DITFLEET_CUDA_GRAPHS",
        default: "on",
        help: "multi-GPU Flux plans: on = each rank's step runs as a CUDA graph (plans without Ring), all = Ring plans too, off = eager launches (docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_CUDA_GRAPHS_MAX",
        default: "2",
        help: "CUDA graphs kept per GPU (one per image size; each holds one forward's activations)",
    },
    VarDoc {
        name: "DITFLEET_FLUX_OPT",
        default: "all",
        help: "Flux transformer formulations: all (fused CUDA kernels, GELU epilogues, split single blocks, copy-free Ulysses all-to-alls, single blocks' MLP matmuls overlapping the all-to-alls, each block's residual carried into the next block's LayerNorm kernel), none (the op-for-op port), or a list such as all,-qkv or all,-overlap (docs/benchmarks-flux-1gpu.md, docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_NCCL_STREAM",
        default: "side",
        help: "where NCCL runs: side (a stream of its own, ordered with the compute stream by events; needed for overlap) or legacy (the compute stream itself)",
    },
    VarDoc {
        name: "DITFLEET_OVERLAP_CHUNKS",
        default: "2",
        help: "parts the double blocks' image q/k/v go out in under a pure Ulysses plan (each part's projection runs while the previous part travels)",
    },
    VarDoc {
        name: "DITFLEET_RING",
        default: "",
        help: "Ring/USP A/B switches, comma-separated: stacked (pure Ring stacks q/k/v instead of taking the joint buffer as it lies), blocking (wait for each K/V block before attending over the one held)",
    },
    VarDoc {
        name: "DITFLEET_RELAYOUT",
        default: "wide",
        help: "how a Ulysses rank re-lays the attention output it gets back from head groups to tokens: wide (one copy in 16-byte elements) or elementwise (the same copy element by element; for A/B runs)",
    },
    VarDoc {
        name: "DITFLEET_NCCL_A2A",
        default: "p2p",
        help: "how an even Ulysses all-to-all goes over NCCL: p2p (grouped send/recv per peer) or collective (one ncclAlltoAll per tensor; not yet measured on several GPUs)",
    },
    VarDoc {
        name: "DITFLEET_FAULT_GPU",
        default: "",
        help: "fault injection for GPU-isolation drills: <slot>:<step> makes the device in that slot of DITFLEET_DEVICES fail at that step, <slot>:<step>:hang makes it stop answering there (with DITFLEET_PLAN)",
    },
    VarDoc {
        name: "DITFLEET_STEP_TIMEOUT_S",
        default: "300",
        help: "multi-GPU Flux: a job that finishes no step for this long is aborted (a GPU stopped answering); the device NVML reports unhealthy is quarantined",
    },
    VarDoc {
        name: "DITFLEET_DEVICES",
        default: "auto",
        help: "devices to compute on, e.g. cuda:0,cuda:1 or cpu",
    },
    VarDoc {
        name: "DITFLEET_RESULT_DIR",
        default: "./results",
        help: "directory of the local result store",
    },
    VarDoc {
        name: "DITFLEET_RESULT_URL",
        default: "unset (local directory)",
        help: "s3://bucket/prefix: results go to S3 or an S3-compatible server (credentials, region and endpoint from the standard AWS_* variables: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or IRSA, AWS_ALLOW_HTTP=true for plain HTTP)",
    },
    VarDoc {
        name: "DITFLEET_RESULT_PRESIGN_S",
        default: "0 (off)",
        help: "S3 store: the result URL is a presigned GET URL valid this many seconds (at most 604800) instead of s3://bucket/key",
    },
    VarDoc {
        name: "DITFLEET_RESULT_PUBLIC_URL",
        default: "unset",
        help: "S3 store: the result URL is <this>/<key> (a public bucket or CDN) instead of s3://bucket/key",
    },
    VarDoc {
        name: "DITFLEET_SHUTDOWN_GRACE_S",
        default: "300",
        help: "on SIGTERM, seconds in-flight jobs may take before they are requeued",
    },
    VarDoc {
        name: "DITFLEET_HEARTBEAT_S",
        default: "5",
        help: "seconds between worker heartbeats in Redis",
    },
    VarDoc {
        name: "DITFLEET_JOB_LEASE_S",
        default: "15",
        help: "seconds a running job's lease lasts without renewal (a redelivered job waits for it)",
    },
    VarDoc {
        name: "DITFLEET_MAX_ATTEMPTS",
        default: "3",
        help: "deliveries of one job before it is dead-lettered",
    },
    VarDoc {
        name: "DITFLEET_WORKER_PREFETCH",
        default: "slots+1",
        help: "messages buffered per consumed queue (one more than the slots lets a higher-priority job overtake)",
    },
    VarDoc {
        name: "DITFLEET_ENGINE_RETRIES",
        default: "2",
        help: "in-process retries of a transient engine failure (out of memory after freeing caches, device error), with exponential back-off and jitter",
    },
    VarDoc {
        name: "DITFLEET_RETRY_BASE_MS",
        default: "200",
        help: "first back-off of engine and storage retries; doubles per retry, with jitter, capped at 32x",
    },
    VarDoc {
        name: "DITFLEET_CHECKPOINT_EVERY",
        default: "5",
        help: "save the running job's latents every this many steps (a retried job resumes there); 0 = off",
    },
    VarDoc {
        name: "DITFLEET_CONTROL_POLL_MS",
        default: "1000",
        help: "how often the worker reads operator control (ditfleetctl drain, model load/unload)",
    },
    VarDoc {
        name: "DITFLEET_MODEL_ROOT",
        default: "parent of the model directory",
        help: "directory of model versions (Flux.1 or SDXL folders): version v of a model is <root>/<v>",
    },
    VarDoc {
        name: "DITFLEET_SWAP_MODE",
        default: "alongside",
        help: "model version swap: alongside (load the new version next to the old, then switch) or drain (finish running jobs and unload the old first: less memory)",
    },
    VarDoc {
        name: "DITFLEET_SIM_VERSION",
        default: "sim-1",
        help: "simulated engine: the model version it starts with",
    },
    VarDoc {
        name: "DITFLEET_SIM_MODELS",
        default: "every known model (flux-dev,flux-schnell,sdxl-base)",
        help: "simulated engine: the models it serves (a worker consumes only its models' queues)",
    },
    VarDoc {
        name: "DITFLEET_LORA_REGISTRY",
        default: "file://<DITFLEET_MODEL_ROOT> when that is set",
        help: "the LoRA registry the worker downloads adapters from (as the scheduler's)",
    },
    VarDoc {
        name: "DITFLEET_LORA_CACHE_DIR",
        default: "$XDG_CACHE_HOME/ditfleet/loras",
        help: "where downloaded and verified adapters are kept (falls back to ~/.cache, then /tmp)",
    },
    VarDoc {
        name: "DITFLEET_LORA_DISK_CACHE_BYTES",
        default: "8589934592",
        help: "bound of the adapter download cache in bytes; least recently used adapters are removed beyond it",
    },
    VarDoc {
        name: "DITFLEET_AFFINITY_POLL_MS",
        default: "100",
        help: "how often a worker with a free slot takes a job from its LoRA affinity queue (only while it advertises a LoRA stack, and 30 s after)",
    },
    VarDoc {
        name: "DITFLEET_SIM_LORA_APPLY_MS",
        default: "0",
        help: "simulated engine: milliseconds a switch of the applied LoRA stack takes",
    },
    VarDoc {
        name: "DITFLEET_SIM_FAULTS",
        default: "none",
        help: "simulated engine fault injection, comma list: oom=N (first N tries of every job run out of memory), device=N, panic=N (first N tries panic inside the engine), bad-weights (every job fails permanently)",
    },
];

/// Renders variable docs for `--help`.
pub fn help_text(groups: &[&[VarDoc]]) -> String {
    let mut s = String::from("Environment variables:\n");
    for g in groups {
        for v in *g {
            s.push_str(&format!("  {:<28} {} [default: {}]\n", v.name, v.help, v.default));
        }
    }
    s
}
