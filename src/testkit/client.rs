//! A plaintext HTTP client that plays the application: HTTP/1.1 (origin or absolute form) or
//! h2c with prior knowledge, one fresh connection per call unless a `Conn` is kept.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A response with its body collected.
#[derive(Debug)]
pub struct Collected {
    /// Status, headers, version.
    pub head: http::response::Parts,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl Collected {
    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `x-mtls-sidecar-error` header.
    pub fn error_reason(&self) -> Option<String> {
        self.head
            .headers
            .get("x-mtls-sidecar-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// Errors a client call can end with.
pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

/// A kept-alive connection to the sidecar.
pub enum Conn {
    /// HTTP/1.1.
    H1(http1::SendRequest<Full<Bytes>>),
    /// h2c.
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// Opens a connection; `h2` for prior-knowledge h2c.
    pub async fn open(addr: SocketAddr, h2: bool) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        if h2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Conn::H2(s))
        } else {
            let (s, conn) = http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            Ok(Conn::H1(s))
        }
    }

    /// Sends a request and collects the response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Collected, ClientError> {
        let resp: Response<hyper::body::Incoming> = match self {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (head, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Collected {
            head,
            body: collected.to_bytes(),
            trailers,
        })
    }
}

/// `GET` with a `Host` header (origin form) over a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Collected, ClientError> {
    let req = Request::get(path).header("host", host).body(Full::new(Bytes::new()))?;
    Conn::open(addr, false).await?.send(req).await
}

/// `GET http://host/path` in absolute form, as an app with `HTTP_PROXY` sends it.
pub async fn get_via_proxy(addr: SocketAddr, url: &str) -> Result<Collected, ClientError> {
    let uri: http::Uri = url.parse()?;
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let req = Request::get(uri).header("host", host).body(Full::new(Bytes::new()))?;
    Conn::open(addr, false).await?.send(req).await
}

/// `GET http://host/path` over a fresh h2c connection.
pub async fn get_h2c(addr: SocketAddr, url: &str) -> Result<Collected, ClientError> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    Conn::open(addr, true).await?.send(req).await
}
