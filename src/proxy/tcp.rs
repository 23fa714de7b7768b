//! The TCP frontend: accepts on a node port, picks a backend, connects and forwards. A
//! connection keeps the backend it got; endpoint updates only change where new ones go.
//! Connections past `--tcp-max-connections` (overall) or `--tcp-max-connections-per-source`
//! are reset at accept; one idle for `--tcp-idle-timeout` is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use super::forward::{self, Ended};
use super::frontend::{Lifecycle, PortState};
use super::limits::TcpPermit;
use super::ppv2;
use super::table::Frontend;

/// Connections waiting to be accepted, per listener.
const BACKLOG: u32 = 4096;
/// Backends tried for one connection before giving up on it.
const CONNECT_ATTEMPTS: usize = 3;

/// Binds a listener (SO_REUSEADDR, so a restarted proxy binds despite TIME_WAIT).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts until the frontend is removed or the proxy drains; each connection gets its own task
/// (tracked, so shutdown can wait for it) and outlives the listener.
pub async fn serve(
    listener: TcpListener,
    config: watch::Receiver<Arc<Frontend>>,
    port: Arc<PortState>,
    life: Lifecycle,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = life.removed.cancelled() => break,
            _ = life.draining.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let permit = match port.caps.tcp.admit(peer.ip()) {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        // Counted by the cap; a reset tells the client at once.
                        let _ = client.set_zero_linger();
                        debug!(frontend = %port.key, %peer, ?refusal, "connection refused by a cap");
                        continue;
                    }
                };
                let frontend = config.borrow().clone();
                life.tracker
                    .spawn(handle(client, peer, frontend, Arc::clone(&port), permit));
            }
            Err(e) => {
                // Out of file descriptors and the like: count, back off briefly, carry on.
                port.metrics.io_errors.inc();
                debug!(frontend = %port.key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    frontend: Arc<Frontend>,
    port: Arc<PortState>,
    _permit: TcpPermit,
) {
    let metrics = &port.metrics;
    let pp = frontend.proxy_protocol;
    // The client as the pod should see it: from the load balancer's header when it sends one.
    let (source, destination) = if pp.to_pod {
        match original_addresses(&mut client, peer, pp.from_load_balancer, &port).await {
            Some(addrs) => addrs,
            None => {
                metrics.io_errors.inc();
                let _ = client.set_zero_linger();
                return;
            }
        }
    } else {
        (peer, peer)
    };
    let Some(mut backend) = connect(source, &frontend, &port).await else {
        // No endpoint or none reachable: reset at once rather than leave the client waiting.
        let _ = client.set_zero_linger();
        return;
    };
    if pp.to_pod {
        let header = ppv2::header(source, destination);
        if backend.write_all(&header).await.is_err() {
            metrics.io_errors.inc();
            let _ = client.set_zero_linger();
            return;
        }
    }
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    metrics.connections.inc();
    let _active = super::metrics::ActiveGuard::new(&metrics.active);
    let idle = port.caps.tcp_idle;
    match forward::forward(
        &client,
        &backend,
        &metrics.bytes_in,
        &metrics.bytes_out,
        idle,
    )
    .await
    {
        Ok(Ended::Finished) => {}
        Ok(Ended::Idle) => {
            port.caps.counters.tcp_idle_closed.inc();
        }
        Err(_) => {
            // One side failed: reset the other too, as a NAT would pass the RST on.
            metrics.io_errors.inc();
            let _ = client.set_zero_linger();
            let _ = backend.set_zero_linger();
        }
    }
}

/// (client, address it connected to) for the PROXY header to the pod: the load balancer's
/// header when the target group sends one (its LOCAL form, or none, leaves the peer), else the
/// peer and the local address. `None` when the expected header is missing or malformed.
async fn original_addresses(
    client: &mut TcpStream,
    peer: SocketAddr,
    from_load_balancer: bool,
    port: &PortState,
) -> Option<(SocketAddr, SocketAddr)> {
    let local = client.local_addr().ok()?;
    if !from_load_balancer {
        return Some((peer, local));
    }
    match ppv2::read(client, port.connect_timeout).await {
        Ok(Some(addrs)) => Some(addrs),
        Ok(None) => Some((peer, local)),
        Err(e) => {
            debug!(frontend = %port.key, %peer, error = %e, "no PROXY header from the load balancer");
            None
        }
    }
}

/// Connects to the balancer's pick; when that fails, to the next targets in order (up to
/// `CONNECT_ATTEMPTS` in all). Counts what went wrong.
async fn connect(peer: SocketAddr, frontend: &Frontend, port: &PortState) -> Option<TcpStream> {
    let metrics = &port.metrics;
    let targets = &frontend.targets;
    let Some(first) = port
        .balancer
        .pick(targets, peer.ip(), frontend.affinity, Instant::now())
    else {
        metrics.no_endpoints.inc();
        return None;
    };
    let start = targets.binary_search(&first).unwrap_or(0);
    let attempts = targets.len().min(CONNECT_ATTEMPTS);
    for i in 0..attempts {
        let target = targets[(start + i) % targets.len()];
        match tokio::time::timeout(port.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(backend)) => return Some(backend),
            Ok(Err(e)) => {
                debug!(frontend = %port.key, %target, error = %e, "connect failed");
            }
            Err(_) => {
                debug!(frontend = %port.key, %target, "connect timed out");
            }
        }
        metrics.connect_errors.inc();
    }
    None
}
