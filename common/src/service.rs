//! The shared `main` of the service binaries.

use std::fmt::Display;
use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::config::{CommonConfig, ConfigError, EXIT_BAD_CONFIG};

/// Runs a service to completion and exits the process: a bad configuration exits 64 with the
/// error (which names the variable); otherwise tracing is installed, SIGTERM/SIGINT cancel the
/// shutdown token passed to `run`, and the exit code is 0 on a clean stop, 1 on an error.
pub fn run_service<C, E, Fut>(
    name: &str,
    cfg: Result<C, ConfigError>,
    common: fn(&C) -> &CommonConfig,
    run: impl FnOnce(C, CancellationToken) -> Fut,
) -> !
where
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let c = common(&cfg);
    let telemetry = crate::telemetry::init_with_traces(&c.log, c.log_json, c.otel.as_ref(), name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::signals::cancel_on_signal(shutdown.clone()));
        match run(cfg, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "{name} failed");
                1
            }
        }
    });
    // Bounded: a blocking task (an engine step, a DNS lookup) still running must not keep a
    // process that has decided to exit alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    telemetry.shutdown();
    std::process::exit(code);
}
