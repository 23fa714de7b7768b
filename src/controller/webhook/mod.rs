//! The mutating admission webhook that injects pod readiness gates ([`inject`]): HTTPS on
//! `--webhook-addr` with the certificate in `--webhook-cert-dir` (`tls.crt`, `tls.key`, as the
//! chart's Secret or cert-manager writes them). Served by every replica (it only reads the
//! Service cache); the MutatingWebhookConfiguration has `failurePolicy: Ignore`, so a controller
//! that is down never blocks a pod.

pub mod inject;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Context;

/// Settings of the pod readiness-gate webhook.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Serve the readiness-gate injection webhook (HTTPS) on this address; off when unset.
    #[arg(long, env = "CLOUDLB_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Directory holding the webhook's `tls.crt` and `tls.key`.
    #[arg(
        long,
        env = "CLOUDLB_WEBHOOK_CERT_DIR",
        default_value = "/tmp/k8s-webhook-server/serving-certs"
    )]
    pub webhook_cert_dir: PathBuf,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading {0}: {1}")]
    Pem(PathBuf, rustls_pki_types::pem::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

fn tls_config(dir: &Path) -> Result<rustls::ServerConfig, WebhookError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let certs = CertificateDer::pem_file_iter(&crt)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| WebhookError::Pem(crt.clone(), e))?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| WebhookError::Pem(key.clone(), e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the webhook until `shutdown`. The certificate is read at start (a rotated Secret
/// takes effect on the next restart).
pub async fn serve(
    ctx: Arc<Context>,
    args: WebhookArgs,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let Some(addr) = args.webhook_addr else {
        return Ok(());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&args.webhook_cert_dir)?));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| WebhookError::Listen(addr, e))?;
    info!(%addr, "readiness-gate webhook listening");
    let app = Router::new()
        .route("/mutate-pod", post(mutate))
        .with_state(ctx);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!(error = %e, "webhook accept"); continue; }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(t) => t,
                Err(e) => return debug!(%peer, error = %e, "webhook TLS handshake"),
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %e, "webhook connection");
            }
        });
    }
}

async fn mutate(
    State(ctx): State<Arc<Context>>,
    body: axum::body::Bytes,
) -> impl axum::response::IntoResponse {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let services = ctx.services.state();
    let out = inject::review(&body, |ns, pod: &Pod| {
        inject::gates_for(
            pod.metadata.labels.as_ref().unwrap_or(&Default::default()),
            ns,
            services.iter().map(|s| &**s),
            &ctx.cluster,
        )
    });
    if out["response"]["patch"].is_string() {
        debug!("readiness gate injected");
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out.to_string(),
    )
}
