//! Where results go: webhooks (HTTP POST of the JSON) and MQTT topics (QoS
//! 1). Each sink runs on its own, reading the messages it has not answered
//! from the ledger, oldest first, and recording each answer there, so a
//! restart sends again exactly what was not acknowledged.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use flawscope_results::outbox::{Message, Outcome};
use flawscope_results::store::Store;
use reqwest::Url;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::Metrics;
use crate::commands::UsageError;

/// How long an MQTT broker may take to answer a CONNECT or a PUBLISH.
const MQTT_ANSWER: Duration = Duration::from_secs(10);
/// First wait before a failed send is tried again; it doubles up to the
/// `--max-backoff-secs` bound.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Largest MQTT packet sent or read (a result is a few kilobytes).
const MQTT_MAX_PACKET: usize = 1 << 20;

/// A sink's answer to one send.
#[derive(Debug)]
pub enum Sent {
    Acked,
    /// Refused for good: recorded, not sent again.
    Rejected(String),
    /// Not acknowledged (connection, timeout, 5xx): sent again later.
    Retry(String),
}

/// A webhook: `--webhook URL`.
pub struct Webhook {
    url: Url,
    client: reqwest::Client,
    token: Option<String>,
}

impl Webhook {
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> anyhow::Result<Self> {
        let url = Url::parse(url).map_err(|e| UsageError(format!("--webhook {url}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UsageError(format!(
                "--webhook {url}: only http:// and https:// URLs are posted to"
            ))
            .into());
        }
        // A redirect would turn the POST into a GET: it is reported instead.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("making the HTTP client")?;
        Ok(Self { url, client, token })
    }

    /// The sink's name in the ledger and the metrics: the URL without its
    /// password.
    pub fn name(&self) -> String {
        format!("webhook {}", redacted(&self.url))
    }

    async fn send(&self, message: &Message) -> Sent {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &message.key)
            .body(message.payload.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Err(err) => Sent::Retry(chain(&err)),
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return Sent::Acked;
                }
                // Busy or down: wait. A refusal of this message: report it.
                let transient = status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(200).collect();
                let why = format!("HTTP {status}: {}", body.trim());
                if transient {
                    Sent::Retry(why)
                } else {
                    Sent::Rejected(why)
                }
            }
        }
    }
}

/// The error and its causes in one line (reqwest hides the cause of a
/// refused connection in its source chain).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// An MQTT topic: `--mqtt mqtt[s]://[user[:password]@]host[:port]/topic`.
pub struct Mqtt {
    url: Url,
    options: MqttOptions,
    topic: String,
    connection: Option<(AsyncClient, EventLoop)>,
}

impl Mqtt {
    pub fn new(url: &str, client_id: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let usage = |why: String| UsageError(format!("--mqtt {url}: {why}"));
        let parsed = Url::parse(url).map_err(|e| usage(e.to_string()))?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(
                    usage(format!("unknown scheme {other}: (use mqtt:// or mqtts://)")).into(),
                );
            }
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| usage("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
        let topic = parsed.path().trim_start_matches('/').to_owned();
        if topic.is_empty() {
            return Err(usage(
                "no topic (the URL's path is the topic: mqtt://host/line/verdicts)".into(),
            )
            .into());
        }
        if topic.contains(['+', '#']) || topic.len() > 1024 {
            return Err(usage(
                "a topic to publish to has no wildcards (+, #) and at most 1024 bytes".into(),
            )
            .into());
        }
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MQTT_MAX_PACKET, MQTT_MAX_PACKET)
            .set_clean_session(true);
        if !parsed.username().is_empty() {
            options.set_credentials(parsed.username(), parsed.password().unwrap_or(""));
        }
        if tls {
            let config = tls_config(ca).map_err(|e| usage(format!("{e:#}")))?;
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
            ));
        }
        Ok(Self {
            url: parsed,
            options,
            topic,
            connection: None,
        })
    }

    pub fn name(&self) -> String {
        format!("mqtt {}", redacted(&self.url))
    }

    /// Connects (a fresh session each time: after any failure the old
    /// connection is dropped whole, so no old packet is replayed and every
    /// PUBACK read belongs to the message just sent).
    async fn connect(&mut self) -> Result<(), String> {
        if self.connection.is_some() {
            return Ok(());
        }
        let (client, mut events) = AsyncClient::new(self.options.clone(), 16);
        let deadline = Instant::now() + MQTT_ANSWER;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => return Err("no CONNACK from the broker within 10 s".into()),
                Ok(Err(err)) => return Err(chain(&err)),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
            }
        }
        self.connection = Some((client, events));
        Ok(())
    }

    async fn send(&mut self, message: &Message) -> Sent {
        if let Err(why) = self.connect().await {
            return Sent::Retry(why);
        }
        let Some((client, events)) = self.connection.as_mut() else {
            return Sent::Retry("not connected".into());
        };
        let sent = Self::publish(client, events, &self.topic, message).await;
        if !matches!(sent, Sent::Acked) {
            self.connection = None;
        }
        sent
    }

    async fn publish(
        client: &AsyncClient,
        events: &mut EventLoop,
        topic: &str,
        message: &Message,
    ) -> Sent {
        if let Err(err) = client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                message.payload.clone().into_bytes(),
            )
            .await
        {
            return Sent::Retry(chain(&err));
        }
        let deadline = Instant::now() + MQTT_ANSWER;
        let mut packet = None;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => return Sent::Retry("no PUBACK from the broker within 10 s".into()),
                Ok(Err(err)) => return Sent::Retry(chain(&err)),
                Ok(Ok(Event::Outgoing(Outgoing::Publish(id)))) if packet.is_none() => {
                    packet = Some(id);
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) if Some(ack.pkid) == packet => {
                    return Sent::Acked;
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Keeps the connection alive (pings) while there is nothing to send;
    /// returns when it breaks, never while it is fine.
    async fn idle(&mut self) {
        let Some((_, events)) = self.connection.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            if let Err(err) = events.poll().await {
                tracing::info!(
                    "{}: connection closed ({}); reconnecting on the next message",
                    redacted(&self.url),
                    chain(&err)
                );
                self.connection = None;
                return;
            }
        }
    }
}

/// Roots for `mqtts://`: the system's, plus `--mqtt-ca` when given.
fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // One unusable system certificate does not stop the others.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading --mqtt-ca {}", path.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("reading --mqtt-ca {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("--mqtt-ca {}", path.display()))?;
        }
    }
    if roots.is_empty() {
        anyhow::bail!("no trusted certificates (none in the system store; give --mqtt-ca FILE)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS settings")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub enum Sink {
    Webhook(Webhook),
    Mqtt(Box<Mqtt>),
}

impl Sink {
    pub fn name(&self) -> String {
        match self {
            Self::Webhook(w) => w.name(),
            Self::Mqtt(m) => m.name(),
        }
    }

    async fn send(&mut self, message: &Message) -> Sent {
        match self {
            Self::Webhook(w) => w.send(message).await,
            Self::Mqtt(m) => m.send(message).await,
        }
    }

    async fn idle(&mut self) {
        match self {
            Self::Webhook(_) => std::future::pending().await,
            Self::Mqtt(m) => m.idle().await,
        }
    }
}

/// Where the watch stands, as the sinks see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    Running,
    /// Stopping: send what is pending until the deadline, then stop.
    Draining(Instant),
}

/// What one sink's loop needs.
pub struct SinkTask {
    pub sink: Sink,
    pub name: String,
    /// Its own connection to the ledger.
    pub store: Arc<Mutex<Store>>,
    /// Messages at or before this outbox place predate the sink.
    pub since: i64,
    pub metrics: Arc<Metrics>,
    pub max_backoff: Duration,
    /// Bumped by the scorer after each new message.
    pub news: watch::Receiver<u64>,
    pub phase: watch::Receiver<Phase>,
}

/// Runs a ledger call off the async threads.
async fn ledger<T: Send + 'static>(
    store: &Arc<Mutex<Store>>,
    call: impl FnOnce(&Store) -> Result<T, flawscope_results::store::StoreError> + Send + 'static,
) -> anyhow::Result<T> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let store = store.lock().unwrap_or_else(|e| e.into_inner());
        call(&store).map_err(anyhow::Error::from)
    })
    .await
    .context("the ledger's worker stopped")?
}

impl SinkTask {
    fn deadline(&self) -> Option<Instant> {
        match *self.phase.borrow() {
            Phase::Running => None,
            Phase::Draining(deadline) => Some(deadline),
        }
    }

    /// Sends every message the sink has not answered, then waits for news;
    /// returns when drained (or the drain deadline passes) after a stop.
    pub async fn run(mut self) -> anyhow::Result<()> {
        loop {
            match self.serve().await {
                Ok(()) => return Ok(()),
                // The ledger failing (a locked or full disk) pauses this
                // sink; its messages stay pending.
                Err(err) if self.deadline().is_none() => {
                    tracing::error!("{}: {err:#}; trying again in 1 s", self.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        loop {
            self.news.borrow_and_update();
            let (name, since) = (self.name.clone(), self.since);
            let batch = ledger(&self.store, move |s| s.pending_messages(&name, since, 64)).await?;
            self.report_lag().await?;
            if batch.is_empty() {
                if self.deadline().is_some() {
                    return Ok(());
                }
                tokio::select! {
                    _ = self.news.changed() => {}
                    _ = self.phase.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = self.sink.idle() => {}
                }
                continue;
            }
            for message in batch {
                if !self.deliver(&message).await? {
                    return Ok(());
                }
            }
        }
    }

    async fn report_lag(&mut self) -> anyhow::Result<()> {
        let (name, since) = (self.name.clone(), self.since);
        let (pending, lag) = ledger(&self.store, move |s| s.sink_lag(&name, since)).await?;
        self.metrics.set_lag(&self.name, pending, lag);
        Ok(())
    }

    /// Sends one message until the sink answers it; false when the drain
    /// deadline passed first (it stays pending for the next start).
    async fn deliver(&mut self, message: &Message) -> anyhow::Result<bool> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.deadline().is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let sent = self.sink.send(message).await;
            let outcome = match sent {
                Sent::Acked => {
                    self.metrics.delivered(&self.name);
                    self.metrics.set_connected(&self.name, true);
                    Outcome::Delivered
                }
                Sent::Rejected(why) => {
                    tracing::error!(
                        "{}: message {} ({}) refused, not sent again: {why}",
                        self.name,
                        message.key,
                        message.created_at
                    );
                    self.metrics.rejected(&self.name);
                    Outcome::Rejected(why)
                }
                Sent::Retry(why) => {
                    self.report_lag().await?;
                    self.metrics.retried(&self.name);
                    self.metrics.set_connected(&self.name, false);
                    tracing::warn!(
                        "{}: message {} not acknowledged ({why}); trying again in {:.1} s",
                        self.name,
                        message.key,
                        backoff.as_secs_f64()
                    );
                    let wait = tokio::time::sleep(backoff);
                    match self.deadline() {
                        Some(deadline) => {
                            tokio::select! {
                                () = wait => {}
                                () = tokio::time::sleep_until(deadline) => return Ok(false),
                            }
                        }
                        None => {
                            // A stop during the wait ends it early, to drain.
                            tokio::select! {
                                () = wait => {}
                                _ = self.phase.changed() => {}
                            }
                        }
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                    continue;
                }
            };
            let (id, name) = (message.id, self.name.clone());
            ledger(&self.store, move |s| s.record_delivery(id, &name, &outcome)).await?;
            return Ok(true);
        }
    }
}
