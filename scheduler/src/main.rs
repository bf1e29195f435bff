//! `ditfleet-scheduler`: routes submitted jobs to class queues. Configured by environment.

use clap::Parser;
use ditfleet_common::config::{self, COMMON_VARS, Env, SCHEDULER_VARS, SchedulerConfig};

#[derive(Parser)]
#[command(
    name = "ditfleet-scheduler",
    version,
    about = "Consumes the submit queue, validates jobs, and routes each to its class queue by cost.",
    after_help = config::help_text(&[COMMON_VARS, SCHEDULER_VARS])
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    ditfleet_common::service::run_service(
        "ditfleet-scheduler",
        SchedulerConfig::from_env(&Env::process()),
        |c| &c.common,
        ditfleet_scheduler::run,
    )
}
