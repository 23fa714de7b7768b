//! A fault-injecting HTTP proxy between the controller and LocalStack (test-only).
//!
//! Started in-process on 127.0.0.1:0; the controller gets `AWS_ENDPOINT_URL=<proxy url>`.
//! ELBv2 and EC2 speak the query protocol, so the operation is the `Action=` field of the
//! form-encoded POST body. Per request the proxy draws from a seeded PRNG and either forwards,
//! delays then forwards, answers with an AWS-shaped error (throttling: HTTP 400 `Throttling` for
//! ELBv2, HTTP 503 `RequestLimitExceeded` for EC2, as AWS does; 500/503 server errors), or
//! resets the connection (RST, no response). Every decision is counted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Fault rates (0.0–1.0) for one request; tried in order throttle, 5xx, reset, lost response.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    pub throttle: f64,
    pub server_error: f64,
    pub reset: f64,
    /// Forward the request, then reset the connection instead of answering (the call took
    /// effect but its response is lost — a non-idempotent create then sees a duplicate).
    pub lost_response: f64,
    /// Added latency: with probability `latency_rate`, sleep a uniform draw from `latency`.
    pub latency_rate: f64,
    pub latency: (Duration, Duration),
}

impl Faults {
    pub fn none() -> Faults {
        Faults::default()
    }
}

/// Which faults apply: a default for every operation, overridden per operation (`Action`).
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    pub default: Faults,
    pub per_operation: BTreeMap<String, Faults>,
}

impl FaultPlan {
    pub fn uniform(f: Faults) -> FaultPlan {
        FaultPlan {
            default: f,
            per_operation: BTreeMap::new(),
        }
    }

    fn for_operation(&self, op: &str) -> &Faults {
        self.per_operation.get(op).unwrap_or(&self.default)
    }
}

/// What the proxy did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Decision {
    Forward,
    Throttle,
    ServerError(u16),
    Reset,
    LostResponse,
}

/// Counts of requests and injected faults, overall and per operation.
#[derive(Clone, Debug, Default)]
pub struct FaultCounts {
    pub requests: u64,
    pub forwarded: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub resets: u64,
    pub lost_responses: u64,
    pub delayed: u64,
    pub by_operation: BTreeMap<String, u64>,
}

impl FaultCounts {
    /// Faults that failed a request (delays are not failures).
    pub fn injected(&self) -> u64 {
        self.throttled + self.server_errors + self.resets + self.lost_responses
    }
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests: {} forwarded, {} faults injected ({} throttled, {} 5xx, {} resets, {} lost responses), {} delayed",
            self.requests,
            self.forwarded,
            self.injected(),
            self.throttled,
            self.server_errors,
            self.resets,
            self.lost_responses,
            self.delayed
        )
    }
}

/// SplitMix64: small, seedable, good enough for fault draws.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Shared {
    plan: Mutex<FaultPlan>,
    rng: Mutex<Rng>,
    counts: Mutex<FaultCounts>,
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Shared {
    /// Draws the decision and the added latency for one request of `op`.
    fn decide(&self, op: &str) -> (Decision, Option<Duration>) {
        let f = self.plan.lock().unwrap().for_operation(op).clone();
        let mut rng = self.rng.lock().unwrap();
        let delay = (rng.unit() < f.latency_rate).then(|| {
            let (lo, hi) = f.latency;
            lo + (hi.saturating_sub(lo)).mul_f64(rng.unit())
        });
        let r = rng.unit();
        let d = if r < f.throttle {
            Decision::Throttle
        } else if r < f.throttle + f.server_error {
            Decision::ServerError(if rng.unit() < 0.5 { 500 } else { 503 })
        } else if r < f.throttle + f.server_error + f.reset {
            Decision::Reset
        } else if r < f.throttle + f.server_error + f.reset + f.lost_response {
            Decision::LostResponse
        } else {
            Decision::Forward
        };
        drop(rng);
        let mut c = self.counts.lock().unwrap();
        c.requests += 1;
        *c.by_operation.entry(op.to_string()).or_default() += 1;
        match d {
            Decision::Forward => c.forwarded += 1,
            Decision::Throttle => c.throttled += 1,
            Decision::ServerError(_) => c.server_errors += 1,
            Decision::Reset => c.resets += 1,
            Decision::LostResponse => c.lost_responses += 1,
        }
        if delay.is_some() {
            c.delayed += 1;
        }
        (d, delay)
    }
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (e.g. `http://127.0.0.1:4566`).
    pub async fn start(upstream: &str, seed: u64, plan: FaultPlan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            plan: Mutex::new(plan),
            rng: Mutex::new(Rng(seed)),
            counts: Mutex::new(FaultCounts::default()),
            upstream: upstream.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(stream, s.clone()));
            }
        });
        FaultProxy { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`, for `AWS_ENDPOINT_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the fault plan (takes effect for the next request).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().unwrap() = plan;
    }

    pub fn counts(&self) -> FaultCounts {
        self.shared.counts.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection that sends RST instead of FIN when it is dropped after a reset fault.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
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
}

#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault proxy: connection reset")
    }
}

impl std::error::Error for ResetConnection {}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let reset = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        reset: reset.clone(),
    });
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let reset = reset.clone();
        async move { handle(req, &shared, &reset).await }
    });
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    reset: &AtomicBool,
) -> Result<Response<Full<Bytes>>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let op = action_of(&body).unwrap_or_else(|| "unknown".into());
    let ec2 = is_ec2(&parts.headers, &body);
    let (decision, delay) = shared.decide(&op);
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match decision {
        Decision::Forward => Ok(forward(shared, parts, body).await),
        Decision::Throttle => Ok(if ec2 {
            error_response(503, "RequestLimitExceeded", "Request limit exceeded.", true)
        } else {
            error_response(400, "Throttling", "Rate exceeded", false)
        }),
        Decision::ServerError(500) => Ok(error_response(
            500,
            "InternalFailure",
            "We encountered an internal error. Please try again.",
            ec2,
        )),
        Decision::ServerError(status) => Ok(error_response(
            status,
            "ServiceUnavailable",
            "Service is unavailable. Please try again.",
            ec2,
        )),
        Decision::Reset => {
            reset.store(true, Ordering::Relaxed);
            Err(ResetConnection)
        }
        Decision::LostResponse => {
            let _ = forward(shared, parts, body).await;
            reset.store(true, Ordering::Relaxed);
            Err(ResetConnection)
        }
    }
}

async fn forward(
    shared: &Shared,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = format!("{}{path}", shared.upstream);
    let mut builder = Request::builder().method(parts.method).uri(uri);
    for (k, v) in &parts.headers {
        builder = builder.header(k, v);
    }
    let Ok(req) = builder.body(Full::new(body)) else {
        return error_response(500, "InternalFailure", "proxy: bad request", false);
    };
    match shared.client.request(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, Full::new(bytes))
        }
        Err(e) => error_response(
            502,
            "BadGateway",
            &format!("proxy: upstream unreachable: {e}"),
            false,
        ),
    }
}

/// The `Action` of a query-protocol body (`Action=DescribeLoadBalancers&Version=…`).
pub fn action_of(body: &[u8]) -> Option<String> {
    std::str::from_utf8(body)
        .ok()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .map(str::to_string)
}

/// EC2 (its own error shape) vs ELBv2: the SigV4 credential scope names the service, and EC2's
/// API version is 2016-11-15.
fn is_ec2(headers: &hyper::HeaderMap, body: &[u8]) -> bool {
    let scope = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    scope.contains("/ec2/")
        || std::str::from_utf8(body).is_ok_and(|b| b.contains("Version=2016-11-15"))
}

/// An AWS error response: the query protocol's `<ErrorResponse>` (ELBv2) or EC2's `<Response>`.
pub fn error_response(status: u16, code: &str, message: &str, ec2: bool) -> Response<Full<Bytes>> {
    let request_id = "00000000-0000-0000-0000-00000fa017ed";
    let body = if ec2 {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
        )
    } else {
        let kind = if status >= 500 { "Receiver" } else { "Sender" };
        format!(
            "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{code}</Code>\n    <Message>{message}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    resp.headers_mut().insert(
        "x-amzn-requestid",
        hyper::header::HeaderValue::from_static(request_id),
    );
    resp
}
