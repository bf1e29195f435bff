//! The health and metrics endpoint every service serves on `DITFLEET_HTTP_ADDR`:
//!
//! * `/healthz` (liveness): 200 while the process runs and, once loaded, its main loop keeps
//!   turning; 503 when the loop has not turned for [`LOOP_STALL`] (a wedged service, for the
//!   kubelet to restart). Also 200 while a model loads: loading is not a failure.
//! * `/startupz` (start-up): 503 `loading` until the models are loaded (and verified), then 200.
//!   A start-up probe on it keeps liveness and readiness probes off a pod that is still loading.
//! * `/readyz` (readiness): 200 only while the service can take work: `ready`, or `degraded`
//!   (serving on fewer GPUs); 503 while `loading`, `reconnecting` (broker link down), `draining`
//!   or `stopped`. The body names the state (and a degraded service's reason).
//! * `/metrics`: Prometheus text format.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// How long a loaded service's main loop may go without turning before `/healthz` fails.
pub const LOOP_STALL: Duration = Duration::from_secs(120);

/// What a service is doing, as its probes and registry report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServiceState {
    /// Loading (and verifying) models, building engines, autotuning; no work taken yet.
    Loading = 0,
    /// Consuming and able to run work.
    Ready = 1,
    /// Consuming with reduced capacity (e.g. a quarantined GPU).
    Degraded = 2,
    /// The broker link is down; nothing is consumed until it recovers.
    Reconnecting = 3,
    /// Stopping: no new work, running work finishes or is handed back.
    Draining = 4,
    Stopped = 5,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Loading => "loading",
            ServiceState::Ready => "ready",
            ServiceState::Degraded => "degraded",
            ServiceState::Reconnecting => "reconnecting",
            ServiceState::Draining => "draining",
            ServiceState::Stopped => "stopped",
        }
    }

    /// Whether a service in this state can take work (readiness).
    pub fn takes_work(self) -> bool {
        matches!(self, ServiceState::Ready | ServiceState::Degraded)
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ServiceState::Ready,
            2 => ServiceState::Degraded,
            3 => ServiceState::Reconnecting,
            4 => ServiceState::Draining,
            5 => ServiceState::Stopped,
            _ => ServiceState::Loading,
        }
    }
}

/// State shared between a service and its HTTP endpoint.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    loaded: AtomicBool,
    /// Milliseconds since `epoch` when the main loop last turned.
    beat_ms: AtomicU64,
    epoch: Instant,
    degraded_reason: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(ServiceState::Loading as u8),
            loaded: AtomicBool::new(false),
            beat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            degraded_reason: Mutex::new(None),
        }
    }
}

impl Health {
    /// Models are loaded and verified: `/startupz` turns 200 for good.
    pub fn set_loaded(&self) {
        self.beat();
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    pub fn set_state(&self, state: ServiceState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    pub fn state(&self) -> ServiceState {
        ServiceState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Ready, or degraded with `reason` while a degraded reason is recorded.
    pub fn set_serving(&self) {
        let degraded = self
            .degraded_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        self.set_state(if degraded {
            ServiceState::Degraded
        } else {
            ServiceState::Ready
        });
    }

    /// Records why the service runs with reduced capacity; a serving service turns `degraded`.
    pub fn set_degraded(&self, reason: String) {
        *self.degraded_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        if self.state() == ServiceState::Ready {
            self.set_state(ServiceState::Degraded);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state().takes_work()
    }

    /// The main loop turned (liveness).
    pub fn beat(&self) {
        self.beat_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the main loop last turned.
    pub fn since_beat(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.beat_ms.load(Ordering::Relaxed)))
    }

    fn describe(&self) -> String {
        let state = self.state();
        match (
            state,
            self.degraded_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref(),
        ) {
            (ServiceState::Degraded, Some(r)) => format!("degraded: {r}\n"),
            (s, _) => format!("{}\n", s.as_str()),
        }
    }
}

struct AppState {
    health: Arc<Health>,
    registry: Arc<Registry>,
}

async fn healthz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let h = &s.health;
    let stalled = h.is_loaded() && h.state() != ServiceState::Stopped && h.since_beat() > LOOP_STALL;
    if stalled {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("main loop stalled for {} s\n", h.since_beat().as_secs()),
        )
    } else {
        (StatusCode::OK, "ok\n".to_string())
    }
}

async fn startupz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if s.health.is_loaded() {
        (StatusCode::OK, "loaded\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n")
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let code = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, s.health.describe())
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding failed: {e}\n"),
        ),
    }
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/startupz", get(startupz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(AppState { health, registry }));
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "http endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "serving /healthz, /startupz, /readyz, /metrics");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_and_degraded_services_take_work_and_degraded_keeps_its_reason() {
        let h = Health::default();
        assert_eq!(h.state(), ServiceState::Loading);
        assert!(!h.is_loaded() && !h.is_ready());
        h.set_loaded();
        h.set_serving();
        assert_eq!(h.state(), ServiceState::Ready);
        assert!(h.is_ready());
        h.set_degraded("gpu 3 quarantined".into());
        assert_eq!(h.state(), ServiceState::Degraded);
        assert!(h.is_ready());
        assert_eq!(h.describe(), "degraded: gpu 3 quarantined\n");
        h.set_state(ServiceState::Reconnecting);
        assert!(!h.is_ready());
        // Back from the outage it is degraded again, not ready.
        h.set_serving();
        assert_eq!(h.state(), ServiceState::Degraded);
        for s in [
            ServiceState::Draining,
            ServiceState::Stopped,
            ServiceState::Loading,
        ] {
            h.set_state(s);
            assert!(!h.is_ready(), "{s:?}");
            assert_eq!(h.describe(), format!("{}\n", s.as_str()));
        }
    }

    #[tokio::test]
    async fn the_endpoints_answer_each_state_with_its_code() {
        let h = Arc::new(Health::default());
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            h.clone(),
            Arc::new(Registry::default()),
            stop.clone(),
        )
        .await
        .expect("serve");
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            let code: u16 = out[9..12].parse().expect("status code");
            let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            (code, body)
        };
        assert_eq!(get("/healthz").await, (200, "ok\n".into()));
        assert_eq!(get("/startupz").await, (503, "loading\n".into()));
        assert_eq!(get("/readyz").await, (503, "loading\n".into()));
        h.set_loaded();
        h.set_serving();
        assert_eq!(get("/startupz").await, (200, "loaded\n".into()));
        assert_eq!(get("/readyz").await, (200, "ready\n".into()));
        h.set_state(ServiceState::Draining);
        assert_eq!(get("/readyz").await, (503, "draining\n".into()));
        assert_eq!(get("/healthz").await.0, 200);
        stop.cancel();
    }
}
