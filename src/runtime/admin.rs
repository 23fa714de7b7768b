//! The admin endpoints of both processes: `/healthz` (the process serves), `/readyz` (what the
//! process says of itself) and `/metrics` (OpenMetrics text of its registry), served on the
//! hardened server of [`super::http`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

/// What a process says on `/readyz`.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok(())` when ready; otherwise why not (a short word for the body).
    fn readiness(&self) -> Result<(), &'static str>;
}

/// The controller's flag: set once its caches are synced.
impl Readiness for std::sync::atomic::AtomicBool {
    fn readiness(&self) -> Result<(), &'static str> {
        if self.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not ready")
        }
    }
}

/// The OpenMetrics text of `registry`.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Option<Arc<Registry>>,
    readiness: Arc<dyn Readiness>,
}

/// An admin app: the probes, and `/metrics` when `registry` is given (a listener reachable from
/// the network serves the probes only).
pub fn app(readiness: Arc<dyn Readiness>, registry: Option<Arc<Registry>>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    if registry.is_some() {
        app = app.route("/metrics", get(metrics));
    }
    app.with_state(AdminState {
        registry,
        readiness,
    })
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match &s.registry {
        Some(registry) => metrics_response(registry),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.readiness.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// One GET over a real connection: (status, body).
    async fn get_path(app: Router, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn probes_follow_readiness_and_metrics_only_with_a_registry() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut registry = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("demo", "a demo counter", c.clone());
        let registry = Arc::new(registry);
        let with = app(flag.clone(), Some(registry));
        let without = app(flag.clone(), None);
        assert_eq!(
            get_path(with.clone(), "/healthz").await,
            (200, "ok\n".into())
        );
        assert_eq!(
            get_path(with.clone(), "/readyz").await,
            (503, "not ready\n".into())
        );
        flag.store(true, Ordering::Relaxed);
        assert_eq!(get_path(with.clone(), "/readyz").await.0, 200);
        let (status, text) = get_path(with, "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("demo_total 0"), "{text}");
        assert_eq!(get_path(without, "/metrics").await.0, 404);
    }
}
