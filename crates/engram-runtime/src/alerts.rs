//! Alerts to the person in charge: a service raises one with [`ServiceContext::alert`] and the
//! Telegram gateway's `SendAlert` delivers it to the admin chat (de-duplicated and
//! rate-limited there). Sending never blocks the caller and never fails it: an alert that
//! cannot be delivered is logged on the `security` target instead.
//!
//! [`ServiceContext::alert`]: crate::ServiceContext::alert

use std::time::Duration;

use engram_proto::v1::telegram_gateway_client::TelegramGatewayClient;
use engram_proto::v1::{Actor, RequestContext, SendAlertRequest, Severity};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use url::Url;

use crate::grpc::inject_trace_context;
use crate::tls::Transport;

type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// Sends alerts to the gateway at `ENGRAM_ALERT_ADDR`.
#[derive(Clone)]
pub struct AlertSender {
    service: &'static str,
    client: TelegramGatewayClient<InterceptedService<Channel, Interceptor>>,
}

impl std::fmt::Debug for AlertSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSender")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl AlertSender {
    /// A sender for `service`'s alerts to the gateway at `addr` over `transport` (connected
    /// lazily).
    ///
    /// # Errors
    ///
    /// When `addr` is not a usable endpoint.
    pub fn new(service: &'static str, transport: &Transport, addr: &Url) -> anyhow::Result<Self> {
        let channel = transport.channel_to(addr, "telegram-gateway", Duration::from_secs(10))?;
        let interceptor: Interceptor = inject_trace_context;
        Ok(Self {
            service,
            client: TelegramGatewayClient::with_interceptor(channel, interceptor),
        })
    }

    /// Sends one alert in the background.
    pub fn send(&self, severity: Severity, kind: &str, message: &str) {
        let mut client = self.client.clone();
        let request = SendAlertRequest {
            context: Some(RequestContext {
                idempotency_key: String::new(),
                correlation_id: String::new(),
                actor: Some(Actor {
                    service: self.service.to_owned(),
                    telegram_user_id: 0,
                    telegram_chat_id: 0,
                }),
            }),
            severity: severity as i32,
            kind: kind.to_owned(),
            message: message.to_owned(),
            occurred_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        };
        tokio::spawn(async move {
            let kind = request.kind.clone();
            match client.send_alert(request).await {
                Ok(answer) if !answer.get_ref().delivered => tracing::info!(
                    kind,
                    reason = %answer.get_ref().suppressed_reason,
                    "alert not delivered by the gateway"
                ),
                Ok(_) => {}
                Err(status) => tracing::warn!(
                    target: "security",
                    kind,
                    error = %status.message(),
                    "alert could not reach the gateway"
                ),
            }
        });
    }
}
