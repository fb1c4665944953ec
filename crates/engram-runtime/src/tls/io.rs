//! The bytes under mutual TLS: the server's stream of handshaken connections (each carrying
//! the caller's identity into tonic's request extensions) and the client's connector.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::{MutualTls, identity_of};

/// A handshake that takes longer than this is dropped (a slow or silent client must not hold
/// a task and a socket for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an accepted connection: in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The caller's address.
    pub remote_addr: Option<SocketAddr>,
    /// The service named by the caller's `spiffe://engram/<service>` certificate; `None`
    /// when its certificate (valid, from our CA) carries no such identity.
    pub identity: Option<String>,
}

/// An accepted, handshaken connection.
#[derive(Debug)]
pub struct TlsIo {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener` and yields connections whose mutual-TLS handshake succeeded with
/// the configuration current at accept time. Handshakes run concurrently (one slow client
/// does not hold up the others); failures are logged on the `security` target and counted,
/// never yielded. Accepting stops when the stream is dropped (the server stopped).
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<MutualTls>,
) -> ReceiverStream<Result<TlsIo, std::io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Without TCP_NODELAY, Nagle holds a response's last small frame until the
            // peer's delayed ACK (~40 ms).
            let _ = tcp.set_nodelay(true);
            let Some(config) = tls.server_config() else {
                tls.count_handshake_failure("server", "no_certificate_yet");
                continue;
            };
            let sender = sender.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let handshake = TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(identity_of);
                        let info = PeerInfo {
                            remote_addr: Some(remote),
                            identity,
                        };
                        let _ = sender
                            .send(Ok(TlsIo {
                                inner: stream,
                                info,
                            }))
                            .await;
                    }
                    Ok(Err(error)) => {
                        tls.count_handshake_failure("server", "refused");
                        tracing::warn!(
                            target: "security",
                            remote = %remote,
                            error = %error,
                            "mutual-TLS handshake refused"
                        );
                    }
                    Err(_) => tls.count_handshake_failure("server", "timeout"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// Connects to a peer over mutual TLS with the client configuration current at connect
/// time, accepting it only if it proves the identity `spiffe://engram/<peer>`.
#[derive(Clone, Debug)]
pub struct MtlsConnector {
    tls: Arc<MutualTls>,
    peer: String,
}

impl MtlsConnector {
    /// A connector to `peer` (a service name).
    pub fn new(tls: Arc<MutualTls>, peer: &str) -> Self {
        Self {
            tls,
            peer: peer.to_owned(),
        }
    }
}

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let peer = self.peer.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| std::io::Error::other(format!("{uri} has no host")))?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("http") {
                    80
                } else {
                    443
                });
            let config = tls.client_config().ok_or_else(|| {
                std::io::Error::other("no mutual-TLS certificate yet for outgoing calls")
            })?;
            let name = ServerName::try_from(peer.clone())
                .map_err(|_| std::io::Error::other(format!("{peer} is not a service name")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            match TlsConnector::from(config).connect(name, tcp).await {
                Ok(stream) => Ok(TokioIo::new(stream)),
                Err(error) => {
                    tls.count_handshake_failure("client", "refused");
                    Err(std::io::Error::other(format!(
                        "mutual TLS with {peer} at {host}:{port} failed: {error}"
                    )))
                }
            }
        })
    }
}
