//! The UDP frontend: a flow table keyed by client address. A client's first datagram picks a
//! backend and opens a socket connected to it; later datagrams follow that flow; replies go back
//! to the client from the node port. A flow ends after `udp_idle_timeout` without traffic either
//! way, when its backend stops serving (as kube-proxy clears conntrack entries), or when the
//! backend refuses (ICMP port unreachable), so the client's next datagram is balanced afresh.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::debug;

use super::frontend::{Lifecycle, PortState};
use super::metrics::ActiveGuard;
use super::table::Frontend;

/// Largest UDP payload.
const DATAGRAM_MAX: usize = 65_536;

/// Binds the node-port socket.
pub async fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(addr).await
}

/// A live flow. Dropping it stops its reply task.
struct Flow {
    id: u64,
    backend: SocketAddr,
    socket: Arc<UdpSocket>,
    clock: Arc<FlowClock>,
    replies: AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Last activity of a flow in milliseconds since `start`, shared by both directions.
#[derive(Debug)]
struct FlowClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl FlowClock {
    fn new() -> FlowClock {
        FlowClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time left before the flow counts as idle (zero when it already does).
    fn idle_left(&self, idle: Duration) -> Duration {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        (last + idle).saturating_duration_since(Instant::now())
    }
}

/// Runs the frontend until it is removed, or, once draining, until its last flow ends.
pub async fn serve(
    socket: UdpSocket,
    mut config: watch::Receiver<Arc<Frontend>>,
    port: Arc<PortState>,
    life: Lifecycle,
) {
    let socket = Arc::new(socket);
    let mut frontend = config.borrow_and_update().clone();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut draining = false;
    let mut buf = vec![0u8; DATAGRAM_MAX];
    let metrics = &port.metrics;
    loop {
        if draining && flows.is_empty() {
            break;
        }
        tokio::select! {
            _ = life.removed.cancelled() => break,
            _ = life.draining.cancelled(), if !draining => draining = true,
            changed = config.changed() => {
                if changed.is_err() {
                    break;
                }
                frontend = config.borrow_and_update().clone();
                flows.retain(|_, f| frontend.serving.binary_search(&f.backend).is_ok());
            }
            Some((client, id)) = ended_rx.recv() => {
                if flows.get(&client).is_some_and(|f| f.id == id) {
                    flows.remove(&client);
                }
            }
            received = socket.recv_from(&mut buf) => {
                let (n, client) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        metrics.io_errors.inc();
                        debug!(frontend = %port.key, error = %e, "recv failed");
                        continue;
                    }
                };
                let datagram = &buf[..n];
                if let Some(flow) = flows.get(&client) {
                    flow.clock.touch();
                    send(&flow.socket, datagram, &port);
                    continue;
                }
                if draining {
                    continue;
                }
                let Some(backend) = port.balancer.pick(
                    &frontend.targets, client.ip(), frontend.affinity, Instant::now()
                ) else {
                    metrics.no_endpoints.inc();
                    continue;
                };
                let upstream = match open(backend).await {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        metrics.connect_errors.inc();
                        debug!(frontend = %port.key, %backend, error = %e, "flow socket failed");
                        continue;
                    }
                };
                next_id += 1;
                let clock = Arc::new(FlowClock::new());
                send(&upstream, datagram, &port);
                metrics.connections.inc();
                let replies = life.tracker.spawn(relay_replies(
                    Arc::clone(&socket),
                    Arc::clone(&upstream),
                    client,
                    Arc::clone(&clock),
                    Arc::clone(&port),
                    ended_tx.clone(),
                    next_id,
                ));
                flows.insert(client, Flow {
                    id: next_id,
                    backend,
                    socket: upstream,
                    clock,
                    replies: replies.abort_handle(),
                });
            }
        }
    }
}

/// A socket connected to the backend, on an ephemeral port.
async fn open(backend: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(backend).await?;
    Ok(socket)
}

/// Sends without waiting: a full socket buffer drops the datagram, as the network would. The
/// socket is non-blocking, so this is one system call whatever tokio's readiness says (a fresh
/// socket has none recorded yet).
fn send(upstream: &UdpSocket, datagram: &[u8], port: &PortState) {
    match socket2::SockRef::from(upstream).send(datagram) {
        Ok(n) => {
            port.metrics.bytes_in.inc_by(n as u64);
        }
        Err(_) => {
            port.metrics.io_errors.inc();
        }
    }
}

/// Carries the backend's replies to the client until the flow is idle or the backend refuses.
async fn relay_replies(
    front: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    clock: Arc<FlowClock>,
    port: Arc<PortState>,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    id: u64,
) {
    let _active = ActiveGuard::new(&port.metrics.active);
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let left = clock.idle_left(port.udp_idle_timeout);
        if left.is_zero() {
            break;
        }
        let n = match tokio::time::timeout(left, upstream.recv(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                port.metrics.io_errors.inc();
                debug!(frontend = %port.key, %client, error = %e, "flow ended by backend");
                break;
            }
        };
        clock.touch();
        match front.send_to(&buf[..n], client).await {
            Ok(sent) => {
                port.metrics.bytes_out.inc_by(sent as u64);
            }
            Err(_) => {
                port.metrics.io_errors.inc();
            }
        }
    }
    let _ = ended.send((client, id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_clock_counts_idle_time_from_last_activity() {
        let clock = FlowClock::new();
        let idle = Duration::from_secs(30);
        assert!(clock.idle_left(idle) > Duration::from_secs(29));
        assert!(clock.idle_left(Duration::ZERO).is_zero());
        clock.touch();
        assert!(clock.idle_left(idle) <= idle);
    }
}
