//! The data plane: picking a target per flow, PROXY protocol v2 headers, and the TCP and UDP
//! listeners that carry clients' flows to targets.

use super::*;

/// The PROXY protocol v2 header for a TCP (or UDP) flow over IPv4, as an NLB sends it.
pub fn proxy_protocol_v2_header(client: SocketAddr, listener: SocketAddr, udp: bool) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (client, listener) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(if udp { 0x12 } else { 0x11 });
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
        (c, l) => {
            h.push(if udp { 0x22 } else { 0x21 });
            h.extend_from_slice(&36u16.to_be_bytes());
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            h.extend_from_slice(&v6(c));
            h.extend_from_slice(&v6(l));
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    h
}

/// The targets that may take a new flow: healthy ones, or — when none is healthy but some
/// failed their checks — every registered one (fail open).
pub(super) fn pick_target(tg: &TgRuntime, flow_hash: u64) -> Option<Arc<TargetRuntime>> {
    let targets = tg.targets.lock().unwrap();
    let healthy: Vec<&Arc<TargetRuntime>> = targets
        .values()
        .filter(|t| t.health() == Health::Healthy)
        .collect();
    let pool = if healthy.is_empty() {
        let registered: Vec<&Arc<TargetRuntime>> = targets
            .values()
            .filter(|t| {
                matches!(
                    t.health(),
                    Health::Unhealthy | Health::UnhealthyDraining | Health::Initial
                )
            })
            .collect();
        if registered.iter().any(|t| t.health() != Health::Initial) {
            registered
        } else {
            Vec::new()
        }
    } else {
        healthy
    };
    if pool.is_empty() {
        return None;
    }
    Some(pool[(flow_hash % pool.len() as u64) as usize].clone())
}

pub(super) fn flow_hash(client: SocketAddr, listener: SocketAddr, udp: bool) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (client, listener, udp).hash(&mut h);
    h.finish()
}

pub(super) fn start_listener(
    shared: &Arc<Shared>,
    address: Ipv4Addr,
    port: u16,
    protocol: &str,
    target_group: &Arc<Mutex<String>>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let addr = SocketAddr::new(IpAddr::V4(address), port);
    let mut tasks = Vec::new();
    if matches!(protocol, "TCP" | "TCP_UDP" | "TLS") {
        let listener = shared.sockets.tcp_listener(addr)?;
        tasks.push(tokio::spawn(tcp_accept_loop(
            shared.clone(),
            listener,
            addr,
            target_group.clone(),
        )));
    }
    if matches!(protocol, "UDP" | "TCP_UDP") {
        let socket = shared.sockets.udp_socket(addr)?;
        tasks.push(tokio::spawn(udp_loop(
            shared.clone(),
            Arc::new(socket),
            addr,
            target_group.clone(),
        )));
    }
    Ok(tasks)
}

pub(super) fn target_group_of(shared: &Shared, arn: &Mutex<String>) -> Option<Arc<TgRuntime>> {
    let arn = arn.lock().unwrap().clone();
    shared
        .state
        .lock()
        .unwrap()
        .target_groups
        .get(&arn)
        .cloned()
}

/// Drops a TCP stream with an RST instead of a FIN.
pub(super) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

pub(super) async fn tcp_accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    target_group: Arc<Mutex<String>>,
) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        shared
            .counters
            .tcp_connections
            .fetch_add(1, Ordering::Relaxed);
        let tg = target_group_of(&shared, &target_group);
        let target = tg
            .as_ref()
            .and_then(|tg| pick_target(tg, flow_hash(peer, addr, false)));
        let (Some(tg), Some(target)) = (tg, target) else {
            shared.counters.no_target.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        };
        let ppv2 = tg.settings.lock().unwrap().proxy_protocol_v2;
        tokio::spawn(tcp_flow(shared.clone(), client, peer, addr, target, ppv2));
    }
}

pub(super) async fn tcp_flow(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    listener: SocketAddr,
    target: Arc<TargetRuntime>,
    ppv2: bool,
) {
    let kill = target.kill.lock().unwrap().clone();
    target.active.fetch_add(1, Ordering::Relaxed);
    target.flows.fetch_add(1, Ordering::Relaxed);
    let connect = shared.sockets.tcp_connect(Some(listener.ip()), target.addr);
    let upstream = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), connect) => r.ok().and_then(Result::ok),
        _ = kill.cancelled() => None,
    };
    let Some(mut upstream) = upstream else {
        shared
            .counters
            .target_connect_failures
            .fetch_add(1, Ordering::Relaxed);
        target.active.fetch_sub(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    if ppv2 {
        let header = proxy_protocol_v2_header(peer, listener, false);
        if upstream.write_all(&header).await.is_err() {
            target.active.fetch_sub(1, Ordering::Relaxed);
            reset(client);
            return;
        }
    }
    // Each direction on its own, FIN for FIN: what one side sent before closing (or resetting)
    // still reaches the other, as through an NLB. A reset on either side resets both at the end.
    let outcome = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let to_target = async {
            let r = tokio::io::copy(&mut cr, &mut uw).await;
            let _ = uw.shutdown().await;
            r
        };
        let to_client = async {
            let r = tokio::io::copy(&mut ur, &mut cw).await;
            let _ = cw.shutdown().await;
            r
        };
        tokio::select! {
            (a, b) = async { tokio::join!(to_target, to_client) } => Some(a.is_ok() && b.is_ok()),
            _ = kill.cancelled() => None,
        }
    };
    target.active.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Some(true) => {}
        Some(false) => {
            // the target reset or failed: the client sees a reset too
            reset(client);
            reset(upstream);
        }
        None => {
            reset(client);
            reset(upstream);
        }
    }
}

pub(super) struct UdpFlow {
    upstream: Arc<UdpSocket>,
    last_seen: Arc<Mutex<Instant>>,
}

pub(super) async fn udp_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    target_group: Arc<Mutex<String>>,
) {
    // NLB's UDP flow idle timeout is 120 s, scaled like every cloud duration (at least 2 s).
    let idle = Duration::from_secs_f64((120.0 * shared.config.time_scale).max(2.0));
    let flows: Arc<Mutex<HashMap<SocketAddr, UdpFlow>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let existing = flows
            .lock()
            .unwrap()
            .get(&peer)
            .map(|f| (f.upstream.clone(), f.last_seen.clone()));
        if let Some((up, seen)) = existing {
            *seen.lock().unwrap() = Instant::now();
            let _ = up.send(&buf[..n]).await;
            continue;
        }
        let tg = target_group_of(&shared, &target_group);
        let target = tg
            .as_ref()
            .and_then(|tg| pick_target(tg, flow_hash(peer, addr, true)));
        let Some(target) = target else {
            shared.counters.no_target.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(up) = shared
            .sockets
            .udp_socket(SocketAddr::new(addr.ip(), 0))
            .map(Arc::new)
        else {
            continue;
        };
        if up.connect(target.addr).await.is_err() {
            continue;
        }
        shared.counters.udp_flows.fetch_add(1, Ordering::Relaxed);
        target.flows.fetch_add(1, Ordering::Relaxed);
        target.active.fetch_add(1, Ordering::Relaxed);
        let seen = Arc::new(Mutex::new(Instant::now()));
        flows.lock().unwrap().insert(
            peer,
            UdpFlow {
                upstream: up.clone(),
                last_seen: seen.clone(),
            },
        );
        let _ = up.send(&buf[..n]).await;
        let kill = target.kill.lock().unwrap().clone();
        let socket = socket.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            let mut rbuf = vec![0u8; 65536];
            loop {
                let since = seen.lock().unwrap().elapsed();
                if since >= idle {
                    break;
                }
                tokio::select! {
                    r = up.recv(&mut rbuf) => match r {
                        Ok(n) => {
                            *seen.lock().unwrap() = Instant::now();
                            let _ = socket.send_to(&rbuf[..n], peer).await;
                        }
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep(idle - since) => {}
                    _ = kill.cancelled() => break,
                }
            }
            flows.lock().unwrap().remove(&peer);
            target.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
