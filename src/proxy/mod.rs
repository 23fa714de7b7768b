//! The node proxy: forwards NodePort traffic on this node to ready pod endpoints, like
//! kube-proxy's NodePort path in user space, and fails its health checks before it stops.
//!
//! `table` (pure) turns Services and EndpointSlices into frontends; `watch` keeps the table
//! current (or `statics` fixes it from flags); `dataplane` makes the sockets match it; `tcp`,
//! `udp` and `forward` move the bytes; `balance` picks backends; `health` and `metrics` report.

mod args;
mod balance;
mod clusterleg;
mod dataplane;
mod flows;
mod forward;
mod frontend;
mod health;
mod limits;
mod metrics;
mod nft;
mod ppv2;
mod rlimit;
mod splice;
mod statics;
mod table;
mod tcp;
mod tracker;
mod udp;
mod vips;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracker::Tracker;

pub use args::NodeProxyArgs;

use crate::runtime::http::{self, HttpLimits, HttpThread};
use crate::runtime::signals::Signals;
use dataplane::Dataplane;
use frontend::{Caps, Timeouts};
use health::{AdminRoutes, ProxyHealth};
use limits::{Budget, TcpLimits};
use metrics::Metrics;
use table::{Table, TableOptions};

/// How often binding a port that failed (e.g. in use) is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Runs the node proxy until SIGTERM/SIGINT and its drain, on a runtime of its own so
/// `--worker-threads` decides the data plane's thread budget (1 = a single-threaded runtime).
pub fn run(args: NodeProxyArgs) -> anyhow::Result<()> {
    crate::runtime::tokio_runtime(Some(args.worker_threads).filter(|n| *n > 0))
        .context("building the node proxy runtime")?
        .block_on(serve(args))
}

async fn serve(args: NodeProxyArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new().context("installing signal handlers")?;
    rlimit::raise_nofile();
    let metrics = Arc::new(Metrics::default());
    let proxy = Arc::new(ProxyHealth::default());
    let counters = metrics.limits();
    let http_limits = Arc::new(HttpLimits {
        header_timeout: args.http_header_timeout,
        max_connections: args.http_max_connections,
        evicted: counters.http_evicted.clone(),
        timed_out: counters.http_header_timeout.clone(),
    });
    let mut admin_addrs = vec![(
        args.metrics_addr,
        AdminRoutes::ProbesAndMetrics,
        "--metrics-addr",
    )];
    if args.health_addr != args.metrics_addr {
        admin_addrs.push((args.health_addr, AdminRoutes::Probes, "--health-addr"));
    }
    let http_thread = HttpThread::start().context("starting the HTTP thread")?;
    for (addr, routes, flag) in admin_addrs {
        let admin = http::bind(addr).with_context(|| format!("binding {flag} {addr}"))?;
        http_thread.serve(
            admin,
            health::admin_app(routes, Arc::clone(&metrics), Arc::clone(&proxy)),
            Arc::clone(&http_limits),
            CancellationToken::new(),
        );
    }
    let caps = Arc::new(Caps {
        tcp: TcpLimits::new(
            args.tcp_max_connections,
            args.tcp_max_connections_per_source,
            counters.tcp_refused.clone(),
            counters.tcp_source_refused.clone(),
        ),
        udp_flows: Budget::new(args.udp_max_flows),
        udp_flows_per_source: args.udp_max_flows_per_source,
        tcp_idle: (!args.tcp_idle_timeout.is_zero()).then_some(args.tcp_idle_timeout),
        affinity_max_clients: args.affinity_max_clients,
        counters,
    });

    let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(Table::default()));
    if args.static_ports.is_empty() {
        let node_name = args
            .node_name
            .clone()
            .context("--node-name (or NODE_NAME) is required unless --static is given")?;
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes")?;
        let opts = TableOptions {
            node_name: node_name.clone(),
            service_proxy_name: args.service_proxy_name.clone(),
            serve_unlabelled: args.serve_unlabelled,
            load_balancer_class: args.load_balancer_class.clone(),
            default_class: args.default_class,
            nodeport_services: args.nodeport_services,
        };
        info!(node = %node_name, bind = %args.bind_address,
              service_proxy_name = %args.service_proxy_name,
              serve_unlabelled = args.serve_unlabelled, "node proxy starting");
        tokio::spawn(watch::run(client, opts, table_tx));
    } else {
        let table = statics::build(&args.static_ports)?;
        info!(bind = %args.bind_address, frontends = table.frontends.len(),
              "node proxy starting in standalone mode");
        table_tx.send_replace(Arc::new(table));
        // Keep the sender: the table never changes, and the update loop just waits.
        tokio::spawn(async move {
            table_tx.closed().await;
        });
    }

    let draining = CancellationToken::new();
    let tracker = Tracker::default();
    let timeouts = Timeouts {
        connect: args.connect_timeout,
        udp_idle: args.udp_idle_timeout,
    };
    let cluster_leg = args.cluster_ips && args.static_ports.is_empty();
    if cluster_leg && !nft::valid_table_name(&args.nft_table) {
        anyhow::bail!(
            "--nft-table {:?}: a letter, then letters, digits or '_' (at most 32)",
            args.nft_table
        );
    }
    let mut dataplane = Dataplane::new(
        args.bind_address,
        Arc::clone(&metrics),
        Arc::clone(&proxy),
        timeouts,
        caps,
        (http_thread, http_limits),
        draining.clone(),
        tracker.clone(),
    )
    .with_node_port_linger(args.node_port_linger);
    if cluster_leg {
        info!(table = %args.nft_table, "ClusterIP leg on: nftables table ip {}", args.nft_table);
        dataplane = dataplane.with_cluster_leg(nft::Nft {
            program: args.nft.clone(),
            table: args.nft_table.clone(),
        });
    }
    // Table updates keep being applied through the whole shutdown: pods move meanwhile too.
    // Stopping them hands the dataplane back, so its rules can be removed.
    let stop_updates = CancellationToken::new();
    let updates = tokio::spawn(apply_updates(
        dataplane,
        table_rx,
        Arc::clone(&proxy),
        stop_updates.clone(),
    ));

    signals.recv().await;
    info!(delay = ?args.shutdown_health_delay, "shutting down: failing health checks first");
    proxy.set_draining();
    tokio::select! {
        _ = tokio::time::sleep(args.shutdown_health_delay) => {}
        _ = signals.recv() => info!("second signal: skipping the health delay"),
    }
    info!(timeout = ?args.drain_timeout, "no longer accepting; draining open connections");
    draining.cancel();
    let drained = tokio::select! {
        r = tokio::time::timeout(args.drain_timeout, tracker.wait()) => r.is_ok(),
        _ = signals.recv() => false,
    };
    if drained {
        info!("drained; exiting");
    } else {
        info!(
            open = tracker.len(),
            "drain ended with connections still open; exiting"
        );
    }
    stop_updates.cancel();
    if let Ok(mut dataplane) = updates.await {
        dataplane.remove_rules().await;
    }
    Ok(())
}

/// Applies each new table (and retries a failed bind or nft run every `BIND_RETRY`) until
/// `stop`; returns the dataplane.
async fn apply_updates(
    mut dataplane: Dataplane,
    mut table_rx: tokio::sync::watch::Receiver<Arc<Table>>,
    proxy: Arc<ProxyHealth>,
    stop: CancellationToken,
) -> Dataplane {
    let mut retry = false;
    loop {
        let next = async {
            if retry {
                tokio::time::timeout(BIND_RETRY, table_rx.changed())
                    .await
                    .unwrap_or(Ok(()))
            } else {
                table_rx.changed().await
            }
        };
        let changed = tokio::select! {
            _ = stop.cancelled() => return dataplane,
            changed = next => changed,
        };
        if changed.is_err() {
            warn!("table source ended; serving the last table");
            stop.cancelled().await;
            return dataplane;
        }
        let table = table_rx.borrow_and_update().clone();
        retry = !dataplane.apply(&table).await;
        proxy.set_synced();
    }
}
