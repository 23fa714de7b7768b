//! The rig's AWS endpoint with real target health (issue 17): an HTTP proxy in front of
//! LocalStack (or a fault proxy) that forwards every request, but answers ELBv2
//! `DescribeTargetHealth` with the NLB emulator's view of each target (initial → healthy after a
//! passing check, unhealthy, draining, unused), since LocalStack says `healthy` always.
//!
//! The set of targets and every error (unknown group, bad input) still come from LocalStack: the
//! request is forwarded and only the states are rewritten, plus the targets the emulator still
//! drains after LocalStack forgot them (AWS lists those as `draining`). A group the emulator does
//! not serve (behind no listener of a load balancer it serves) reports its targets `unused`, as
//! AWS does for a group no load balancer sends to. The controller is pointed at [`url`] as
//! `AWS_ENDPOINT_URL` and calls AWS exactly as in production. Test rig only.
//!
//! [`url`]: HealthEndpoint::url

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::emulator::{Health, HealthView};
use super::faultproxy::action_of;

/// The running endpoint; stops when dropped.
pub struct HealthEndpoint {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    upstream: String,
    view: HealthView,
    client: Client<HttpConnector, Full<Bytes>>,
    /// DescribeTargetHealth requests answered (for tests counting the controller's polls).
    describe_target_health: AtomicU64,
}

impl HealthEndpoint {
    /// Listens on `listen` (e.g. `127.0.0.1:0`), forwarding to `upstream`
    /// (`http://127.0.0.1:4566`, or a fault proxy's URL).
    pub async fn start(listen: &str, upstream: &str, view: HealthView) -> HealthEndpoint {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("bind health endpoint {listen}: {e}"));
        let addr = listener.local_addr().expect("health endpoint addr");
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            view,
            client: Client::builder(TokioExecutor::new()).build_http(),
            describe_target_health: AtomicU64::new(0),
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
        HealthEndpoint { addr, shared, task }
    }

    /// `http://ADDR`, for the controller's `AWS_ENDPOINT_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// DescribeTargetHealth requests seen so far (every caller, the controller's included).
    pub fn describe_target_health_calls(&self) -> u64 {
        self.shared.describe_target_health.load(Ordering::Relaxed)
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &shared).await) }
    });
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let is_health = action_of(&body).as_deref() == Some("DescribeTargetHealth");
    let form = is_health.then(|| parse_form(&body));
    let resp = forward(shared, parts, body).await;
    let Some(form) = form else {
        return resp;
    };
    shared
        .describe_target_health
        .fetch_add(1, Ordering::Relaxed);
    if resp.status() != 200 {
        return resp; // LocalStack's error (TargetGroupNotFound, …) as it is
    }
    let (parts, body) = resp.into_parts();
    let listed = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let listed = listed_targets(&String::from_utf8_lossy(&listed));
    let arn = form.get("TargetGroupArn").cloned().unwrap_or_default();
    let asked = asked_targets(&form);
    let states = answer(&listed, &asked, shared.view.target_group(&arn).as_ref());
    let mut resp = Response::from_parts(parts, Full::new(Bytes::from(response_xml(&states))));
    resp.headers_mut().remove(hyper::header::CONTENT_LENGTH);
    resp
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
        return super::faultproxy::error_response(500, "InternalFailure", "bad request", false);
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
        Err(e) => super::faultproxy::error_response(
            502,
            "BadGateway",
            &format!("health endpoint: upstream unreachable: {e}"),
            false,
        ),
    }
}

/// One target's answer: id, port, state, reason code and description (AWS's wording).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetState {
    pub id: String,
    pub port: i32,
    pub state: &'static str,
    pub reason: Option<(&'static str, &'static str)>,
}

fn state_of(h: Health) -> (&'static str, Option<(&'static str, &'static str)>) {
    match h {
        Health::Initial => (
            "initial",
            Some((
                "Elb.InitialHealthChecking",
                "Initial health checks in progress",
            )),
        ),
        Health::Healthy => ("healthy", None),
        Health::Unhealthy => (
            "unhealthy",
            Some(("Target.FailedHealthChecks", "Health checks failed")),
        ),
        Health::UnhealthyDraining => (
            "unhealthy.draining",
            Some(("Target.FailedHealthChecks", "Health checks failed")),
        ),
        Health::Draining => (
            "draining",
            Some((
                "Target.DeregistrationInProgress",
                "Target deregistration is in progress",
            )),
        ),
        Health::Unused => (
            "unused",
            Some(("Target.NotRegistered", "Target is not registered")),
        ),
    }
}

/// The answer for the targets LocalStack listed (and those asked for, if any), in the emulator's
/// view (`None`: it does not serve the group).
pub fn answer(
    listed: &[(String, i32)],
    asked: &[(String, Option<i32>)],
    view: Option<&BTreeMap<(String, i32), Health>>,
) -> Vec<TargetState> {
    let mut out: Vec<TargetState> = Vec::new();
    let mut push = |id: &str, port: i32, h: Option<Health>| {
        if out.iter().any(|t| t.id == id && t.port == port) {
            return;
        }
        let (state, reason) = match (view, h) {
            (None, _) => (
                "unused",
                Some((
                    "Target.NotInUse",
                    "Target group is not configured to receive traffic from the load balancer",
                )),
            ),
            (Some(_), Some(h)) => state_of(h),
            (Some(_), None) => (
                "initial",
                Some((
                    "Elb.RegistrationInProgress",
                    "Target registration is in progress",
                )),
            ),
        };
        out.push(TargetState {
            id: id.to_string(),
            port,
            state,
            reason,
        });
    };
    let known = |id: &str, port: i32| view.and_then(|v| v.get(&(id.to_string(), port)).copied());
    for (id, port) in listed {
        push(id, *port, known(id, *port));
    }
    // Targets LocalStack forgot but the emulator still drains: AWS lists them as draining.
    if let Some(v) = view {
        for ((id, port), h) in v {
            let wanted = asked.is_empty()
                || asked
                    .iter()
                    .any(|(i, p)| i == id && p.is_none_or(|p| p == *port));
            if wanted && *h == Health::Draining {
                push(id, *port, Some(*h));
            }
        }
    }
    out
}

/// `DescribeTargetHealthResponse` in ELBv2's query-protocol XML.
pub fn response_xml(states: &[TargetState]) -> String {
    let mut members = String::new();
    for t in states {
        let reason = t
            .reason
            .map(|(r, d)| format!("<Reason>{r}</Reason><Description>{d}</Description>"))
            .unwrap_or_default();
        members.push_str(&format!(
            "<member><Target><Id>{}</Id><Port>{}</Port></Target><HealthCheckPort>{}</HealthCheckPort><TargetHealth><State>{}</State>{reason}</TargetHealth></member>",
            xml_escape(&t.id),
            t.port,
            t.port,
            t.state
        ));
    }
    format!(
        "<DescribeTargetHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><DescribeTargetHealthResult><TargetHealthDescriptions>{members}</TargetHealthDescriptions></DescribeTargetHealthResult><ResponseMetadata><RequestId>00000000-0000-0000-0000-0000000d7e11</RequestId></ResponseMetadata></DescribeTargetHealthResponse>"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `(id, port)` of every `<Target>` in a DescribeTargetHealth response.
pub fn listed_targets(xml: &str) -> Vec<(String, i32)> {
    let field = |block: &str, tag: &str| {
        let open = format!("<{tag}>");
        let start = block.find(&open)? + open.len();
        let end = block[start..].find(&format!("</{tag}>"))? + start;
        Some(block[start..end].trim().to_string())
    };
    xml.split("<Target>")
        .skip(1)
        .filter_map(|rest| {
            let block = &rest[..rest.find("</Target>")?];
            let id = field(block, "Id")?;
            let port = field(block, "Port")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            Some((id, port))
        })
        .collect()
}

/// The `Targets.member.N.Id` / `.Port` the request asked about.
fn asked_targets(form: &BTreeMap<String, String>) -> Vec<(String, Option<i32>)> {
    (1..)
        .map_while(|n| {
            let id = form.get(&format!("Targets.member.{n}.Id"))?;
            let port = form
                .get(&format!("Targets.member.{n}.Port"))
                .and_then(|p| p.parse().ok());
            Some((id.clone(), port))
        })
        .collect()
}

/// A form-encoded body as key → value (percent-decoded).
pub fn parse_form(body: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
