//! `ditfleet-scheduler`: routes submitted jobs to class queues. Configured by environment.

use clap::Parser;
use ditfleet_common::config::{self, COMMON_VARS, Env, SCHEDULER_VARS, SchedulerConfig};
use tokio_util::sync::CancellationToken;

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
    let cfg = match SchedulerConfig::from_env(&Env::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ditfleet-scheduler: {e}");
            std::process::exit(config::EXIT_BAD_CONFIG);
        }
    };
    ditfleet_common::telemetry::init(&cfg.common.log, cfg.common.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(ditfleet_common::signals::cancel_on_signal(shutdown.clone()));
        match ditfleet_scheduler::run(cfg, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "scheduler failed");
                1
            }
        }
    });
    std::process::exit(code);
}
