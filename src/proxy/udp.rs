//! The UDP frontend: a flow table keyed by client address. A client's first datagram picks a
//! backend and opens a socket connected to it; later datagrams follow that flow; replies go back
//! to the client from the node port. A flow ends after `udp_idle_timeout` without traffic either
//! way, when its backend stops serving (as kube-proxy clears conntrack entries), or when the
//! backend refuses (ICMP port unreachable), so the client's next datagram is balanced afresh.
//!
//! Bounded: a client IP holds at most `--udp-max-flows-per-source` flows of a port and all ports
//! together at most `--udp-max-flows`; a new flow past either cap replaces the idlest flow (of
//! that client, or of the port). Datagrams are received into the thread's one scratch buffer,
//! so a flow costs a socket and a small task, never a buffer of its own.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::debug;

use super::flows::{Activity, FlowTable};
use super::forward::with_scratch;
use super::frontend::{Lifecycle, PortState};
use super::limits::Permit;
use super::metrics::ActiveGuard;
use super::table::Frontend;

/// Datagrams taken from the node-port socket per wake-up before other tasks get a turn.
const RECV_BATCH: usize = 64;

/// Binds the node-port socket.
pub async fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(addr).await
}

/// A live flow. Dropping it stops its reply task and gives its slot of the flow budget back.
struct Flow {
    backend: SocketAddr,
    socket: Arc<UdpSocket>,
    clock: Arc<FlowClock>,
    replies: AbortHandle,
    _slot: Permit,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

impl Activity for Flow {
    fn last_active(&self) -> u64 {
        self.clock.last_ms()
    }
}

/// Last activity of a flow in milliseconds since its frontend's `epoch`, shared by both
/// directions (and comparable between the frontend's flows, for eviction).
#[derive(Debug)]
struct FlowClock {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl FlowClock {
    fn new(epoch: Instant) -> FlowClock {
        let clock = FlowClock {
            epoch,
            last_ms: AtomicU64::new(0),
        };
        clock.touch();
        clock
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }

    /// Time left before the flow counts as idle (zero when it already does).
    fn idle_left(&self, idle: Duration) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_ms());
        (last + idle).saturating_duration_since(Instant::now())
    }
}

/// The frontend's state while it runs.
struct UdpFrontend {
    socket: Arc<UdpSocket>,
    port: Arc<PortState>,
    life: Lifecycle,
    frontend: Arc<Frontend>,
    flows: FlowTable<Flow>,
    ended_tx: mpsc::UnboundedSender<(SocketAddr, u64)>,
    epoch: Instant,
    next_id: u64,
    draining: bool,
}

/// Runs the frontend until it is removed, or, once draining, until its last flow ends.
pub async fn serve(
    socket: UdpSocket,
    mut config: watch::Receiver<Arc<Frontend>>,
    port: Arc<PortState>,
    life: Lifecycle,
) {
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut this = UdpFrontend {
        socket: Arc::new(socket),
        port,
        frontend: config.borrow_and_update().clone(),
        life,
        flows: FlowTable::default(),
        ended_tx,
        epoch: Instant::now(),
        next_id: 0,
        draining: false,
    };
    let (removed, draining) = (this.life.removed.clone(), this.life.draining.clone());
    loop {
        if this.draining && this.flows.is_empty() {
            break;
        }
        tokio::select! {
            _ = removed.cancelled() => break,
            _ = draining.cancelled(), if !this.draining => this.draining = true,
            changed = config.changed() => {
                if changed.is_err() {
                    break;
                }
                this.frontend = config.borrow_and_update().clone();
                let serving = &this.frontend.serving;
                this.flows.retain(|f| serving.binary_search(&f.backend).is_ok());
            }
            Some((client, id)) = ended_rx.recv() => {
                this.flows.remove_if(&client, id);
            }
            ready = this.socket.readable() => {
                if let Err(e) = ready {
                    this.port.metrics.io_errors.inc();
                    debug!(frontend = %this.port.key, error = %e, "poll failed");
                    continue;
                }
                this.receive_batch();
            }
        }
    }
}

impl UdpFrontend {
    /// Takes up to `RECV_BATCH` datagrams off the node-port socket and forwards each.
    fn receive_batch(&mut self) {
        for _ in 0..RECV_BATCH {
            let more = with_scratch(|buf| match self.socket.try_recv_from(buf) {
                Ok((n, client)) => {
                    self.datagram(&buf[..n], client);
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) => {
                    self.port.metrics.io_errors.inc();
                    debug!(frontend = %self.port.key, error = %e, "recv failed");
                    false
                }
            });
            if !more {
                return;
            }
        }
    }

    /// One datagram from `client`: onto its flow, or a new flow within the caps.
    fn datagram(&mut self, datagram: &[u8], client: SocketAddr) {
        let port = &self.port;
        let metrics = &port.metrics;
        if let Some(flow) = self.flows.get(&client) {
            flow.clock.touch();
            send(&flow.socket, datagram, port);
            return;
        }
        if self.draining {
            return;
        }
        if self.frontend.targets.is_empty() {
            metrics.no_endpoints.inc();
            return;
        }
        let caps = &port.caps;
        let per_source = caps.udp_flows_per_source;
        if per_source > 0
            && self.flows.source_len(client.ip()) >= per_source
            && self.flows.evict_idlest_of(client.ip()).is_some()
        {
            caps.counters.udp_source_evicted.inc();
        }
        let slot = caps.udp_flows.take().or_else(|| {
            // The budget is spent: this port's idlest flow makes room (if it has one).
            self.flows.evict_idlest()?;
            caps.counters.udp_evicted.inc();
            caps.udp_flows.take()
        });
        let Some(slot) = slot else {
            caps.counters.udp_refused.inc();
            return;
        };
        let frontend = &self.frontend;
        let Some(backend) = port.balancer.pick(
            &frontend.targets,
            client.ip(),
            frontend.affinity,
            Instant::now(),
        ) else {
            metrics.no_endpoints.inc();
            return;
        };
        let upstream = match open(backend) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                metrics.connect_errors.inc();
                debug!(frontend = %port.key, %backend, error = %e, "flow socket failed");
                return;
            }
        };
        self.next_id += 1;
        let clock = Arc::new(FlowClock::new(self.epoch));
        send(&upstream, datagram, port);
        metrics.connections.inc();
        let replies = self.life.tracker.spawn(relay_replies(
            Arc::clone(&self.socket),
            Arc::clone(&upstream),
            client,
            Arc::clone(&clock),
            Arc::clone(port),
            self.ended_tx.clone(),
            self.next_id,
        ));
        let flow = Flow {
            backend,
            socket: upstream,
            clock,
            replies: replies.abort_handle(),
            _slot: slot,
        };
        self.flows.insert(client, self.next_id, flow);
    }
}

/// A non-blocking socket connected to the backend, on an ephemeral port (plain system calls,
/// so it can be opened while the scratch buffer is borrowed).
fn open(backend: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
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

/// What one attempt to relay a reply did.
enum Relayed {
    Sent,
    Empty,
    Ended(io::Error),
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
    let front = socket2::SockRef::from(&*front);
    let client_addr = socket2::SockAddr::from(client);
    loop {
        let left = clock.idle_left(port.udp_idle_timeout);
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, upstream.readable()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                port.metrics.io_errors.inc();
                debug!(frontend = %port.key, %client, error = %e, "poll failed");
                break;
            }
            Ok(Ok(())) => {}
        }
        let relayed = with_scratch(|buf| match upstream.try_recv(buf) {
            Ok(n) => {
                match front.send_to(&buf[..n], &client_addr) {
                    Ok(sent) => port.metrics.bytes_out.inc_by(sent as u64),
                    Err(_) => port.metrics.io_errors.inc(),
                };
                Relayed::Sent
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Relayed::Empty,
            Err(e) => Relayed::Ended(e),
        });
        match relayed {
            Relayed::Sent => clock.touch(),
            Relayed::Empty => {}
            Relayed::Ended(e) => {
                port.metrics.io_errors.inc();
                debug!(frontend = %port.key, %client, error = %e, "flow ended by backend");
                break;
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
        let clock = FlowClock::new(Instant::now());
        let idle = Duration::from_secs(30);
        assert!(clock.idle_left(idle) > Duration::from_secs(29));
        assert!(clock.idle_left(Duration::ZERO).is_zero());
        clock.touch();
        assert!(clock.idle_left(idle) <= idle);
    }
}
