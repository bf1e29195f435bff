//! RabbitMQ connection and a confirming publisher.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// Errors of a publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker nacked the message to {exchange}/{key}")]
    Nacked { exchange: String, key: String },
    #[error("no queue is bound for {exchange}/{key}; message returned")]
    Unroutable { exchange: String, key: String },
    #[error("no confirm from the broker for {exchange}/{key} within {secs} s")]
    ConfirmTimeout {
        exchange: String,
        key: String,
        secs: u64,
    },
}

/// How long a publish waits for the broker's confirm. A confirm pending when the connection drops
/// can stay pending through lapin's recovery; past this the publish fails like any other broker
/// error (callers retry or requeue, and consumers dedupe), instead of hanging the caller.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long opening a connection (TCP, TLS, AMQP handshake) may take. A broker that accepts the
/// socket and never answers, or a handshake failure that recovery keeps retrying, fails the
/// connect instead of hanging the caller.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a connection with automatic recovery (reconnect + topology replay).
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    connect_with(url, name, None, true).await
}

/// [`connect`] with TLS settings: for `amqps://`, the CA certificates in `ca_file` (PEM) are
/// trusted besides the system roots (e.g. a private CA). Errors never contain the URL.
pub async fn connect_tls(
    url: &str,
    name: &str,
    ca_file: Option<&std::path::Path>,
) -> lapin::Result<Connection> {
    connect_with(url, name, ca_file, true).await
}

/// Opens a connection within [`CONNECT_TIMEOUT`]; `recover` enables lapin's automatic recovery,
/// which long-running services want and a one-shot command does not (it should fail, not wait
/// for a broker that went away).
pub async fn connect_with(
    url: &str,
    name: &str,
    ca_file: Option<&std::path::Path>,
    recover: bool,
) -> lapin::Result<Connection> {
    let mut props = ConnectionProperties::default().with_connection_name(name.into());
    if recover {
        props = props.enable_auto_recover();
    }
    let connecting = async {
        let Some(ca) = ca_file else {
            return Connection::connect(url, props).await;
        };
        let pem = std::fs::read_to_string(ca)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reading the AMQP CA file: {e}")))?;
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        };
        Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no AMQP handshake within {} s", CONNECT_TIMEOUT.as_secs()),
        )
        .into()),
    }
}

/// Connects with the service's configured URL and TLS settings, with automatic recovery. A
/// broker that cannot be reached or does not answer the handshake (restarting, or stalled for a
/// while under load) is tried again with back-off for up to `broker_recovery_timeout`, the same
/// bound a running service gives a lost link; what the broker refuses (credentials, vhost) fails
/// at once.
pub async fn connect_cfg(cfg: &crate::config::CommonConfig, name: &str) -> lapin::Result<Connection> {
    let deadline = std::time::Instant::now() + cfg.broker_recovery_timeout;
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        match connect_with(&cfg.amqp_url, name, cfg.amqp_ca_file.as_deref(), true).await {
            Err(e)
                if matches!(e.kind(), lapin::ErrorKind::IOError(_))
                    && std::time::Instant::now() + pause < deadline =>
            {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "RabbitMQ not reachable yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// [`connect_cfg`] without automatic recovery, for one-shot commands (ditfleetctl).
pub async fn connect_cfg_once(cfg: &crate::config::CommonConfig, name: &str) -> lapin::Result<Connection> {
    connect_with(&cfg.amqp_url, name, cfg.amqp_ca_file.as_deref(), false).await
}

/// A channel in confirm mode: every publish waits for the broker's ack.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// Publishes in a row that got no confirm within [`CONFIRM_TIMEOUT`] (0 after any confirm):
    /// one of the signs a [`LinkWatch`] reads.
    confirm_timeouts: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl Publisher {
    pub async fn new(conn: &Connection) -> lapin::Result<Self> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self {
            channel,
            confirm_timeouts: Default::default(),
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes in a row that timed out waiting for their confirm (0 since the last confirm).
    pub fn confirm_timeouts_in_a_row(&self) -> u32 {
        self.confirm_timeouts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes and waits for the confirm (at most [`CONFIRM_TIMEOUT`]). With `mandatory`, a
    /// message no queue takes is an error.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let publish = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .map_err(|_| {
                self.confirm_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                PublishError::ConfirmTimeout {
                    exchange: exchange.into(),
                    key: key.into(),
                    secs: CONFIRM_TIMEOUT.as_secs(),
                }
            })??;
        self.confirm_timeouts
            .store(0, std::sync::atomic::Ordering::Relaxed);
        if confirm.is_nack() {
            return Err(PublishError::Nacked {
                exchange: exchange.into(),
                key: key.into(),
            });
        }
        if confirm.take_message().is_some() {
            return Err(PublishError::Unroutable {
                exchange: exchange.into(),
                key: key.into(),
            });
        }
        Ok(())
    }
}

/// Publishes in a row without a confirm after which a [`LinkWatch`] counts the link as down even
/// though lapin reports it connected (about 90 s without any confirm).
pub const CONFIRM_TIMEOUTS_DOWN: u32 = 3;

/// Whether a connection and the channels a service uses all report `Connected`. While lapin
/// recovers a connection they report `Reconnecting`; a recovery that wedged leaves them so.
pub fn link_up(conn: &Connection, channels: &[&Channel]) -> bool {
    conn.status().connected() && channels.iter().all(|c| c.status().connected())
}

/// A connection's state in one word, for logs.
pub fn connection_state(conn: &Connection) -> &'static str {
    let s = conn.status();
    if s.connected() {
        "connected"
    } else if s.reconnecting() {
        "reconnecting"
    } else if s.connecting() {
        "connecting"
    } else if s.closing() {
        "closing"
    } else if s.closed() {
        "closed"
    } else {
        "error"
    }
}

/// A channel's state in one word, for logs.
pub fn channel_state(channel: &Channel) -> &'static str {
    let s = channel.status();
    if s.connected() {
        "connected"
    } else if s.reconnecting() {
        "reconnecting"
    } else if s.initializing() {
        "opening"
    } else if s.closing() {
        "closing"
    } else {
        "closed or error"
    }
}

/// What a [`LinkWatch`] concluded from one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// The link works.
    Up,
    /// The link came back after being down this long.
    Recovered(std::time::Duration),
    /// The link is down (for this long so far), within the recovery bound.
    Down(std::time::Duration),
    /// The link has been down for longer than the recovery bound: the service should give up
    /// (exit non-zero for its supervisor to restart it); its unacked deliveries are redelivered.
    Lost(std::time::Duration),
}

/// Watchdog of a service's broker link. lapin's automatic recovery can wedge after a broker
/// restart (a connection or channel left `Reconnecting` for good, or confirms that never come);
/// the watch turns "no working link for longer than `bound`" into [`LinkState::Lost`] so the
/// service stops instead of sitting alive but idle.
#[derive(Debug)]
pub struct LinkWatch {
    bound: std::time::Duration,
    down_since: Option<std::time::Instant>,
}

impl LinkWatch {
    pub fn new(bound: std::time::Duration) -> Self {
        Self {
            bound,
            down_since: None,
        }
    }

    /// How often to observe: often enough to see an outage quickly, at least 4 times per bound.
    pub fn period(&self) -> std::time::Duration {
        (self.bound / 4).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_millis(250),
        )
    }

    /// Whether the link was down at the last observation.
    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }

    /// Records one observation (`up`: the link works now).
    pub fn observe(&mut self, up: bool) -> LinkState {
        self.observe_at(up, std::time::Instant::now())
    }

    fn observe_at(&mut self, up: bool, now: std::time::Instant) -> LinkState {
        match (up, self.down_since) {
            (true, None) => LinkState::Up,
            (true, Some(since)) => {
                self.down_since = None;
                LinkState::Recovered(now.saturating_duration_since(since))
            }
            (false, None) => {
                self.down_since = Some(now);
                LinkState::Down(std::time::Duration::ZERO)
            }
            (false, Some(since)) => {
                let down = now.saturating_duration_since(since);
                if down > self.bound {
                    LinkState::Lost(down)
                } else {
                    LinkState::Down(down)
                }
            }
        }
    }
}

/// Persistent-message properties with a content type.
pub fn persistent(content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type.into())
}

/// Builds a header table from string pairs.
pub fn headers(pairs: &[(&str, String)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), AMQPValue::LongString(v.as_str().into()));
    }
    t
}

/// Reads a string header.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    let h = props.headers().as_ref()?;
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// How often the broker has delivered this message before (quorum queues set `x-delivery-count`
/// on redeliveries; 0 on a first delivery or where the broker does not count).
pub fn delivery_count(props: &BasicProperties) -> u32 {
    let Some(h) = props.headers().as_ref() else {
        return 0;
    };
    match h.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongUInt(n)) => *n,
        _ => 0,
    }
}

/// Back-off before requeueing a message that failed for a transient reason: 250 ms doubling with
/// each earlier delivery, capped at `cap`.
pub fn requeue_delay(props: &BasicProperties, cap: std::time::Duration) -> std::time::Duration {
    let n = delivery_count(props).min(16);
    (std::time::Duration::from_millis(250) * 2u32.pow(n)).min(cap)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A passive declare: the queue's message and consumer counts, or an error (which closes the
/// channel) when it does not exist. Needs no permission on the queue.
pub async fn passive_declare(ch: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn link_watch_reports_down_then_lost_past_the_bound_and_recovery() {
        let mut w = LinkWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.observe_at(true, t0), LinkState::Up);
        assert_eq!(w.observe_at(false, t0), LinkState::Down(Duration::ZERO));
        assert!(w.is_down());
        let t = t0 + Duration::from_secs(4);
        assert_eq!(w.observe_at(false, t), LinkState::Down(Duration::from_secs(4)));
        assert_eq!(
            w.observe_at(true, t),
            LinkState::Recovered(Duration::from_secs(4))
        );
        assert!(!w.is_down());
        // A new outage counts from its own start.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(w.observe_at(false, t1), LinkState::Down(Duration::ZERO));
        assert_eq!(
            w.observe_at(false, t1 + Duration::from_secs(10)),
            LinkState::Down(Duration::from_secs(10))
        );
        assert_eq!(
            w.observe_at(false, t1 + Duration::from_secs(11)),
            LinkState::Lost(Duration::from_secs(11))
        );
        assert_eq!(w.period(), Duration::from_millis(250));
        assert_eq!(
            LinkWatch::new(Duration::from_millis(100)).period(),
            Duration::from_millis(25)
        );
    }
}
