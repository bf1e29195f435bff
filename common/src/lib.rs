//! Shared pieces of the ditfleet services: the public job contract, configuration, AMQP topology,
//! Redis job state and telemetry. Never links libtorch.

pub mod amqp;
pub mod config;
pub mod cost;
pub mod events;
pub mod http;
pub mod ident;
pub mod job;
pub mod lora;
pub mod metrics;
pub mod redact;
pub mod service;
pub mod signals;
pub mod state;
pub mod telemetry;
pub mod topology;

pub use config::{ConfigError, EXIT_BAD_CONFIG};
pub use job::{JobError, JobEvent, JobSpec, Limits, Priority, WorkOrder};
pub use state::{JobState, JobStore};
pub use topology::Topology;
