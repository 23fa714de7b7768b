//! Plain servers inside rig network namespaces, run in-process (nodes or pods for the tests), and
//! the matching clients: a line server that answers each line with its name, a UDP server that
//! answers each datagram with its name, and an HTTP server with a settable status.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use super::netns::NetnsSockets;

/// The parsed PROXY protocol v2 header a backend received (`None` fields: none was sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub command: u8,
    pub family: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A running server; stops when dropped.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests (lines or datagrams) answered.
    pub hits: Arc<AtomicU64>,
    /// PPv2 headers seen, one per connection that had one.
    pub proxy_headers: Arc<Mutex<Vec<ProxyHeader>>>,
    /// Connections whose first bytes were not a PPv2 header.
    pub plain_connections: Arc<AtomicU64>,
    /// Status code of the HTTP server.
    pub status: Arc<AtomicU16>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn stop(self) {}
}

fn backend(name: &str, addr: SocketAddr, task: impl FnOnce(&Backend) -> JoinHandle<()>) -> Backend {
    let mut b = Backend {
        name: name.to_string(),
        addr,
        hits: Arc::default(),
        proxy_headers: Arc::default(),
        plain_connections: Arc::default(),
        status: Arc::new(AtomicU16::new(200)),
        task: tokio::spawn(async {}),
    };
    b.task = task(&b);
    b
}

const PP2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Parses a PPv2 header (IPv4 or IPv6 addresses); returns it and its length.
pub fn parse_proxy_v2(buf: &[u8]) -> Option<(ProxyHeader, usize)> {
    if buf.len() < 16 || &buf[..12] != PP2_SIGNATURE || buf[12] >> 4 != 2 {
        return None;
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len)?;
    let (source, destination) = match buf[13] >> 4 {
        1 if len >= 12 => {
            let ip =
                |o: usize| std::net::Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]);
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0).into(), port(8)),
                SocketAddr::new(ip(4).into(), port(10)),
            )
        }
        2 if len >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                std::net::Ipv6Addr::from(a)
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0).into(), port(32)),
                SocketAddr::new(ip(16).into(), port(34)),
            )
        }
        _ => return None,
    };
    Some((
        ProxyHeader {
            command: buf[12] & 0x0f,
            family: buf[13],
            source,
            destination,
        },
        16 + len,
    ))
}

/// A TCP server in the namespace at `addr`: each line gets `NAME\n` back. A PPv2 header at the
/// start of a connection is parsed and recorded.
pub fn tcp_line_server(sockets: &NetnsSockets, addr: SocketAddr, name: &str) -> Backend {
    let listener = sockets
        .tcp_listener(addr)
        .unwrap_or_else(|e| panic!("listen {addr} in {}: {e}", sockets.namespace()));
    backend(name, addr, |b| {
        let (hits, headers, plain) = (
            b.hits.clone(),
            b.proxy_headers.clone(),
            b.plain_connections.clone(),
        );
        let reply = format!("{name}\n");
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (hits, headers, plain, reply) =
                    (hits.clone(), headers.clone(), plain.clone(), reply.clone());
                tokio::spawn(async move {
                    let _ = serve_lines(conn, hits, headers, plain, reply).await;
                });
            }
        })
    })
}

async fn serve_lines(
    mut conn: TcpStream,
    hits: Arc<AtomicU64>,
    headers: Arc<Mutex<Vec<ProxyHeader>>>,
    plain: Arc<AtomicU64>,
    reply: String,
) -> std::io::Result<()> {
    let _ = conn.set_nodelay(true);
    // Read the first bytes: a PPv2 header, or the start of the first line.
    let mut first = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut need = 1;
    loop {
        while first.len() < need {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            first.extend_from_slice(&chunk[..n]);
        }
        let prefix = &first[..first.len().min(12)];
        if !PP2_SIGNATURE.starts_with(prefix) {
            plain.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if first.len() < 16 {
            need = 16;
            continue;
        }
        need = 16 + u16::from_be_bytes([first[14], first[15]]) as usize;
        if first.len() < need {
            continue;
        }
        if let Some((h, used)) = parse_proxy_v2(&first) {
            headers.lock().unwrap().push(h);
            first.drain(..used);
        }
        break;
    }
    let (rd, mut wr) = conn.into_split();
    let mut reader = BufReader::new(std::io::Cursor::new(first).chain(rd));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        hits.fetch_add(1, Ordering::Relaxed);
        wr.write_all(reply.as_bytes()).await?;
    }
}

/// A UDP server in the namespace at `addr`: each datagram gets `NAME` back.
pub fn udp_server(sockets: &NetnsSockets, addr: SocketAddr, name: &str) -> Backend {
    let socket = sockets
        .udp_socket(addr)
        .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    backend(name, addr, |b| {
        let hits = b.hits.clone();
        let reply = name.as_bytes().to_vec();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                if let Ok((_, peer)) = socket.recv_from(&mut buf).await {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        })
    })
}

/// An HTTP/1.x server in the namespace answering every request with `status` (settable).
pub fn http_status_server(sockets: &NetnsSockets, addr: SocketAddr, name: &str) -> Backend {
    let listener = sockets
        .tcp_listener(addr)
        .unwrap_or_else(|e| panic!("listen {addr}: {e}"));
    backend(name, addr, |b| {
        let (hits, status) = (b.hits.clone(), b.status.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let (hits, status) = (hits.clone(), status.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = conn.read(&mut buf).await;
                    hits.fetch_add(1, Ordering::Relaxed);
                    let code = status.load(Ordering::Relaxed);
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        })
    })
}

/// How one request went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend's name.
    Answered(String),
    /// The connection was reset (or refused) by the far side.
    Reset,
    /// Anything else: timeout, early close.
    Failed(String),
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionRefused | ConnectionAborted | BrokenPipe => Outcome::Reset,
        _ => Outcome::Failed(e.to_string()),
    }
}

/// One request on a fresh TCP connection: a line out, a line back (each step within `timeout`).
pub async fn tcp_request(addr: SocketAddr, timeout: Duration) -> Outcome {
    let attempt = async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        conn.write_all(b"ping\n").await?;
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before answering",
            ));
        }
        Ok(line.trim().to_string())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(name)) => Outcome::Answered(name),
        Ok(Err(e)) => classify(&e),
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

/// One UDP request from a fresh socket on the host: a datagram out, one back.
pub async fn udp_request(addr: SocketAddr, timeout: Duration) -> Outcome {
    let attempt = async {
        let s = UdpSocket::bind("0.0.0.0:0").await?;
        s.connect(addr).await?;
        s.send(b"ping").await?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(name)) => Outcome::Answered(name),
        Ok(Err(e)) => classify(&e),
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

/// A persistent TCP connection sending one line per request.
pub struct LineConn {
    reader: BufReader<TcpStream>,
}

impl LineConn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<LineConn> {
        let conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        Ok(LineConn {
            reader: BufReader::new(conn),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().expect("local address")
    }

    pub async fn request(&mut self, timeout: Duration) -> Outcome {
        let attempt = async {
            self.reader.get_mut().write_all(b"ping\n").await?;
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            Ok(line.trim().to_string())
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(name)) => Outcome::Answered(name),
            Ok(Err(e)) => classify(&e),
            Err(_) => Outcome::Failed("timeout".into()),
        }
    }
}

/// Results of a bounded load run: counts and latencies.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    pub resets: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    pub latencies: Vec<Duration>,
    /// backend name → answers
    pub by_backend: std::collections::BTreeMap<String, u64>,
    /// When each backend first answered.
    pub first_answer: std::collections::BTreeMap<String, Instant>,
}

impl LoadReport {
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.sent += 1;
        match outcome {
            Outcome::Answered(name) => {
                self.answered += 1;
                self.latencies.push(latency);
                self.first_answer
                    .entry(name.clone())
                    .or_insert_with(Instant::now);
                *self.by_backend.entry(name).or_default() += 1;
            }
            Outcome::Reset => {
                self.resets += 1;
                self.failures.push("reset".into());
            }
            Outcome::Failed(e) => {
                self.failed += 1;
                self.failures.push(e);
            }
        }
    }

    pub fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.resets += other.resets;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.latencies.extend(other.latencies);
        for (k, v) in other.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        for (k, v) in other.first_answer {
            let e = self.first_answer.entry(k).or_insert(v);
            if v < *e {
                *e = v;
            }
        }
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort();
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }

    pub fn summary(&self, what: &str) -> String {
        format!(
            "{what}: sent {} answered {} failed {} reset {} p50 {:?} p99 {:?} by backend {:?}",
            self.sent,
            self.answered,
            self.failed,
            self.resets,
            self.percentile(0.50),
            self.percentile(0.99),
            self.by_backend
        )
    }
}
