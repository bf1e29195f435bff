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

/// Opens a connection with automatic recovery (reconnect + topology replay).
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .enable_auto_recover();
    Connection::connect(url, props).await
}

/// [`connect`] with TLS settings: for `amqps://`, the CA certificates in `ca_file` (PEM) are
/// trusted besides the system roots (e.g. a private CA). Errors never contain the URL.
pub async fn connect_tls(
    url: &str,
    name: &str,
    ca_file: Option<&std::path::Path>,
) -> lapin::Result<Connection> {
    let Some(ca) = ca_file else {
        return connect(url, name).await;
    };
    let pem = std::fs::read_to_string(ca)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading the AMQP CA file: {e}")))?;
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .enable_auto_recover();
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    };
    Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
}

/// Connects with the service's configured URL and TLS settings.
pub async fn connect_cfg(cfg: &crate::config::CommonConfig, name: &str) -> lapin::Result<Connection> {
    connect_tls(&cfg.amqp_url, name, cfg.amqp_ca_file.as_deref()).await
}

/// A channel in confirm mode: every publish waits for the broker's ack.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
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
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
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
            .map_err(|_| PublishError::ConfirmTimeout {
                exchange: exchange.into(),
                key: key.into(),
                secs: CONFIRM_TIMEOUT.as_secs(),
            })??;
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
