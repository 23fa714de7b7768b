//! The proxy's small HTTP servers (health-check node ports, `/healthz` + `/readyz`, `/metrics`)
//! hardened for the host network, where every client of the node reaches them: a request's
//! headers must arrive within `header_timeout` (slowloris), one request per connection, every
//! connection over in twice that, and at most `max_connections` open per server. A new one past
//! it closes the oldest connection of its own client IP, or, when that IP has none, the server's
//! oldest: a flood of slow clients churns its own connections and cannot lock a health check
//! (the NLB's, from other addresses) out. They run on a thread of their own ([`HttpThread`]), so
//! a data plane busy with a flood never delays a health check's answer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Connections waiting to be accepted, per HTTP listener.
const BACKLOG: i32 = 1024;

/// A single-threaded runtime on its own OS thread that runs every HTTP server of the proxy
/// (tokio does not preempt tasks, so sharing the data plane's threads would queue health checks
/// behind forwarding work).
#[derive(Clone, Debug)]
pub struct HttpThread {
    handle: Handle,
}

impl HttpThread {
    /// Starts the thread; it lives as long as the process.
    pub fn start() -> std::io::Result<HttpThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("cloudlb-http".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(HttpThread { handle })
    }

    /// Serves `app` on `listener` (from [`bind`]) on this thread until `stop`.
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        app: Router,
        limits: Arc<HttpLimits>,
        stop: CancellationToken,
    ) {
        self.handle.spawn(async move {
            // Registered with this thread's reactor, not the data plane's.
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, app, limits, stop).await,
                Err(e) => warn!(error = %e, "cannot register an HTTP listener"),
            }
        });
    }
}

/// A non-blocking listener on `addr` (SO_REUSEADDR, so a restarted proxy binds at once).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Limits of every HTTP server of the proxy, with the counters of what they cut.
#[derive(Debug)]
pub struct HttpLimits {
    /// Time from accept until the request headers are complete.
    pub header_timeout: Duration,
    /// Open connections per server.
    pub max_connections: usize,
    /// Connections closed to make room for a new one.
    pub evicted: Counter,
    /// Connections closed for not finishing in time.
    pub timed_out: Counter,
}

/// Open connections of one server by age (accept order) with their client IP, to abort the
/// oldest.
type Open = Arc<Mutex<BTreeMap<u64, (IpAddr, AbortHandle)>>>;

/// Serves `app` on `listener` until `stop`; then closes every open connection.
async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Arc<HttpLimits>,
    stop: CancellationToken,
) {
    let open: Open = Arc::default();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        next_id += 1;
        let mut conns = lock(&open);
        while conns.len() >= limits.max_connections.max(1) {
            let same_source = conns
                .iter()
                .find(|(_, (ip, _))| *ip == peer.ip())
                .map(|(id, _)| *id);
            let victim = same_source.or_else(|| conns.keys().next().copied());
            let Some((_, oldest)) = victim.and_then(|id| conns.remove(&id)) else {
                break;
            };
            oldest.abort();
            limits.evicted.inc();
        }
        // Spawned under the lock, so the task's own removal always comes after this insert.
        let task = tokio::spawn(connection(
            stream,
            app.clone(),
            Arc::clone(&limits),
            Registered {
                open: Arc::clone(&open),
                id: next_id,
            },
        ));
        conns.insert(next_id, (peer.ip(), task.abort_handle()));
    }
    for (_, (_, conn)) in std::mem::take(&mut *lock(&open)) {
        conn.abort();
    }
}

fn lock(open: &Open) -> std::sync::MutexGuard<'_, BTreeMap<u64, (IpAddr, AbortHandle)>> {
    open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a connection from its server's table when its task ends (or is aborted).
struct Registered {
    open: Open,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).remove(&self.id);
    }
}

async fn connection(
    stream: TcpStream,
    app: Router,
    limits: Arc<HttpLimits>,
    _registered: Registered,
) {
    let _ = stream.set_nodelay(true);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let timed_out = match tokio::time::timeout(limits.header_timeout * 2, conn).await {
        Err(_) => true,
        Ok(Err(e)) => e.is_timeout(),
        Ok(Ok(())) => false,
    };
    if timed_out {
        limits.timed_out.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(
        max: usize,
        header_timeout: Duration,
    ) -> (std::net::SocketAddr, Arc<HttpLimits>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Arc::new(HttpLimits {
            header_timeout,
            max_connections: max,
            evicted: Counter::default(),
            timed_out: Counter::default(),
        });
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve(
            listener,
            app,
            Arc::clone(&limits),
            CancellationToken::new(),
        ));
        (addr, limits)
    }

    async fn get_healthz(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn slow_headers_are_cut_and_a_full_server_closes_its_oldest() {
        let (addr, limits) = server(4, Duration::from_millis(300)).await;
        // Four slow clients: half a header each, never finished.
        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nX-a: ")
                .await
                .unwrap();
            slow.push(s);
        }
        // The server is full, yet a real request gets in (the oldest slow one is closed).
        let reply = tokio::time::timeout(Duration::from_millis(200), get_healthz(addr))
            .await
            .expect("answered while full");
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
            "{reply}"
        );
        assert_eq!(limits.evicted.get(), 1);
        // The remaining slow clients are closed by the header timeout.
        for mut s in slow.into_iter().skip(1) {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .expect("closed by the header timeout")
                .unwrap_or(0);
            // hyper may answer 408 before closing; either way the connection ends.
            let _ = n;
            let end =
                tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut Vec::new())).await;
            assert!(end.is_ok(), "still open");
        }
        assert_eq!(limits.timed_out.get(), 3);
    }
}
