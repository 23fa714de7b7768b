//! Health endpoints: kube-proxy's health-check nodePort contract for externalTrafficPolicy Local
//! Services (so an NLB's HTTP health check finds the nodes with local endpoints), the proxy's
//! own `/healthz` and `/readyz` (`--health-addr`), and `/metrics` (`--metrics-addr`, with the
//! probes too). All of them run on the hardened server of `http`, on its own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::table::HealthCheck;

/// The proxy's own health, shared by every health endpoint.
#[derive(Debug, Default)]
pub struct ProxyHealth {
    synced: AtomicBool,
    draining: AtomicBool,
}

impl ProxyHealth {
    /// The first table (from the cluster or the static flags) is applied.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Shutdown began: health checks fail from now on so load balancers stop sending.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Healthy unless shutting down (kube-proxy's `serviceProxyHealthy`).
    pub fn healthy(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Ready to take traffic: synced and not shutting down.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.healthy()
    }
}

/// Header kube-proxy sets to the local endpoint count (a weight for load balancers).
const WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

#[derive(Serialize)]
struct HealthCheckBody<'a> {
    service: ServiceRef<'a>,
    #[serde(rename = "localEndpoints")]
    local_endpoints: usize,
    #[serde(rename = "serviceProxyHealthy")]
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// kube-proxy's answer: 200 when there are local endpoints and the proxy is healthy, else 503;
/// JSON body with the count; `X-Load-Balancing-Endpoint-Weight` with the count.
pub fn health_check_response(hc: &HealthCheck, proxy_healthy: bool) -> Response {
    let body = HealthCheckBody {
        service: ServiceRef {
            namespace: &hc.namespace,
            name: &hc.name,
        },
        local_endpoints: hc.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let status = if hc.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    let mut resp = (status, json).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(WEIGHT_HEADER, HeaderValue::from(hc.local_endpoints));
    resp
}

#[derive(Clone)]
struct HealthCheckState {
    check: watch::Receiver<HealthCheck>,
    proxy: Arc<ProxyHealth>,
}

/// The app of one health-check nodePort. Like kube-proxy it answers every path the same (the
/// NLB asks for `/healthz`). Count changes arrive through `check`.
pub fn health_check_app(check: watch::Receiver<HealthCheck>, proxy: Arc<ProxyHealth>) -> Router {
    Router::new()
        .fallback(|State(s): State<HealthCheckState>| async move {
            let hc = s.check.borrow().clone();
            health_check_response(&hc, s.proxy.healthy())
        })
        .with_state(HealthCheckState { check, proxy })
}

/// What an admin listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRoutes {
    /// `/healthz` and `/readyz` only (`--health-addr`, reachable from the network).
    Probes,
    /// `/metrics` as well (`--metrics-addr`, loopback by default).
    ProbesAndMetrics,
}

impl crate::runtime::admin::Readiness for ProxyHealth {
    /// Ready once the first table is applied; not again from the start of shutdown.
    fn readiness(&self) -> Result<(), &'static str> {
        if self.ready() {
            Ok(())
        } else if self.healthy() {
            Err("not synced")
        } else {
            Err("draining")
        }
    }
}

/// An admin listener's app: `/healthz` (liveness: the process serves), `/readyz` (200 once the
/// first table is applied, 503 again from the start of shutdown) and, with
/// [`AdminRoutes::ProbesAndMetrics`], `/metrics` (OpenMetrics text).
pub fn admin_app(routes: AdminRoutes, metrics: Arc<Metrics>, proxy: Arc<ProxyHealth>) -> Router {
    let registry = (routes == AdminRoutes::ProbesAndMetrics).then(|| metrics.registry());
    crate::runtime::admin::app(proxy, registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> String {
        let bytes = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn health_check_answers_like_kube_proxy() {
        struct Case {
            local: usize,
            healthy: bool,
            status: u16,
            body: &'static str,
        }
        let cases = [
            Case {
                local: 2,
                healthy: true,
                status: 200,
                body: r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#,
            },
            Case {
                local: 0,
                healthy: true,
                status: 503,
                body: r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":0,"serviceProxyHealthy":true}"#,
            },
            Case {
                local: 1,
                healthy: false,
                status: 503,
                body: r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":1,"serviceProxyHealthy":false}"#,
            },
        ];
        for case in cases {
            let hc = HealthCheck {
                namespace: "ns".into(),
                name: "web".into(),
                local_endpoints: case.local,
            };
            let resp = health_check_response(&hc, case.healthy);
            assert_eq!(resp.status().as_u16(), case.status);
            let h = resp.headers();
            assert_eq!(h["content-type"], "application/json");
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(
                h["x-load-balancing-endpoint-weight"],
                case.local.to_string().as_str()
            );
            assert_eq!(body(resp).await, case.body);
        }
    }

    #[test]
    fn proxy_health_follows_sync_and_drain() {
        let p = ProxyHealth::default();
        assert!(p.healthy() && !p.ready());
        p.set_synced();
        assert!(p.healthy() && p.ready());
        p.set_draining();
        assert!(!p.healthy() && !p.ready());
    }
}
