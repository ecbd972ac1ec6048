//! An in-process HTTPS upstream (HTTP/1.1 and h2 by ALPN) that requires client certificates
//! and answers with what it saw, plus a few behaviours the tests need.
//!
//! Paths: `/…` echoes a JSON report; `/slow/<ms>` waits first; `/big/<bytes>` streams that
//! many bytes; `/echo` streams the request body back; `/trailers` answers like gRPC with a
//! `grpc-status` trailer; `/ws` accepts a WebSocket upgrade and then echoes raw bytes;
//! `/die-mid-body` sends half a body and resets the connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::upstream::{Observed, SeenClient, Upstream, seen_client};

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(s.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Starts an HTTPS upstream on 127.0.0.1:0.
pub async fn start_https(config: Arc<ServerConfig>) -> Upstream {
    start(Some(TlsAcceptor::from(config))).await
}

/// Starts a plaintext HTTP (h1 + h2c prior knowledge) upstream on 127.0.0.1:0.
pub async fn start_plain() -> Upstream {
    start(None).await
}

/// Serves HTTPS on an already bound listener (e.g. one inside a network namespace).
pub fn serve_https_on(listener: TcpListener, config: Arc<ServerConfig>) -> Upstream {
    serve_on(listener, Some(TlsAcceptor::from(config)))
}

async fn start(tls: Option<TlsAcceptor>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding the upstream: {e}"));
    serve_on(listener, tls)
}

fn serve_on(listener: TcpListener, tls: Option<TlsAcceptor>) -> Upstream {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("upstream address: {e}"));
    let observed = Arc::new(Observed::default());
    let obs = observed.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            obs.accepted.fetch_add(1, Ordering::SeqCst);
            let (tls, obs) = (tls.clone(), obs.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(tcp).await else { return };
                        let seen = seen_client(stream.get_ref().1);
                        obs.handshakes.fetch_add(1, Ordering::SeqCst);
                        obs.clients.lock().unwrap_or_else(|e| e.into_inner()).push(seen.clone());
                        serve(TokioIo::new(stream), Arc::new(seen), addr).await;
                    }
                    None => {
                        let seen = SeenClient {
                            subject: "-".into(),
                            serial: "-".into(),
                            resumed: false,
                            alpn: None,
                        };
                        serve(TokioIo::new(tcp), Arc::new(seen), addr).await;
                    }
                }
            });
        }
    });
    Upstream::from_parts(addr, observed, task)
}

async fn serve<I>(io: I, seen: Arc<SeenClient>, addr: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let seen = seen.clone();
        async move { Ok::<_, Infallible>(answer(req, &seen, addr).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, svc)
        .await;
}

fn report(req: &Request<Incoming>, seen: &SeenClient, body_len: usize) -> String {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_str().unwrap_or("?"))))
        .collect();
    serde_json::json!({
        "client_subject": seen.subject,
        "client_serial": seen.serial,
        "resumed": seen.resumed,
        "alpn": seen.alpn,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "version": format!("{:?}", req.version()),
        "body_len": body_len,
        "headers": headers,
    })
    .to_string()
}

fn accept_key(key: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ctx.finish();
    let pem = super::pki::pem("X", digest.as_ref());
    pem.lines().nth(1).unwrap_or_default().to_owned()
}

async fn answer(mut req: Request<Incoming>, seen: &SeenClient, _addr: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept_key(&key)) {
            h.insert("sec-websocket-accept", v);
        }
        return r;
    }
    if let Some(ms) = path.strip_prefix("/slow/").and_then(|s| s.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = path.strip_prefix("/big/").and_then(|s| s.parse::<usize>().ok()) {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = (0..n.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(n - i * chunk.len());
            Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
        });
        let body = StreamBody::new(futures_lite_stream(chunks)).boxed();
        return Response::new(body);
    }
    if path == "/die-mid-body" {
        let frames = vec![
            Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "upstream died",
            )),
        ];
        let mut r = Response::new(StreamBody::new(futures_lite_stream(frames.into_iter())).boxed());
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("100000"));
        return r;
    }
    if path == "/echo" {
        let (parts, body) = req.into_parts();
        let body = body.map_err(std::io::Error::other).boxed();
        let mut r = Response::new(body);
        if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, ct.clone());
        }
        return r;
    }
    let text = report(&req, seen, 0);
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let text = text.replacen("\"body_len\":0", &format!("\"body_len\":{body_len}"), 1);
    if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let frames = vec![Ok(Frame::data(Bytes::from(text))), Ok(Frame::trailers(trailers))];
        let mut r = Response::new(StreamBody::new(futures_lite_stream(frames.into_iter())).boxed());
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        return r;
    }
    let mut r = Response::new(full(text));
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An iterator as a `Stream` (no extra crate needed for tests).
fn futures_lite_stream<T, I: Iterator<Item = T> + Send + Unpin + 'static>(
    iter: I,
) -> impl futures_core::Stream<Item = T> + Send + 'static {
    struct S<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for S<I> {
        type Item = I::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<I::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    S(iter)
}
