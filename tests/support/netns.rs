//! Sockets inside a rig network namespace, made from a process that lives outside it: a thread
//! enters the namespace (`setns`) and creates sockets there on request. A socket belongs to the
//! namespace it was created in, so it can be bound, connected and used from any thread after.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;

use socket2::{Domain, Protocol, Socket, Type};

type Request = (Type, mpsc::Sender<io::Result<Socket>>);

/// A socket factory for one network namespace (`clb-NAME`).
#[derive(Clone)]
pub struct NetnsSockets {
    namespace: String,
    requests: mpsc::Sender<Request>,
}

impl NetnsSockets {
    /// Enters `/var/run/netns/<namespace>` on a dedicated thread; fails when it cannot.
    pub fn enter(namespace: &str) -> io::Result<NetnsSockets> {
        let file = File::open(format!("/var/run/netns/{namespace}"))?;
        let (requests, incoming) = mpsc::channel::<Request>();
        let (entered_tx, entered_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{namespace}"))
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace fd we hold open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if !ok {
                    return;
                }
                for (ty, reply) in incoming {
                    let protocol = if ty == Type::STREAM {
                        Protocol::TCP
                    } else {
                        Protocol::UDP
                    };
                    let socket = Socket::new(Domain::IPV4, ty, Some(protocol)).and_then(|s| {
                        s.set_nonblocking(true)?;
                        Ok(s)
                    });
                    let _ = reply.send(socket);
                }
            })?;
        entered_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread died"))??;
        Ok(NetnsSockets {
            namespace: namespace.to_string(),
            requests,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A new non-blocking IPv4 socket of `ty` (STREAM or DGRAM) in the namespace.
    pub fn socket(&self, ty: Type) -> io::Result<Socket> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((ty, tx))
            .map_err(|_| io::Error::other("netns thread gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns thread gone"))?
    }

    /// A TCP listener bound to `addr` in the namespace.
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let s = self.socket(Type::STREAM)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        tokio::net::TcpListener::from_std(s.into())
    }

    /// A UDP socket bound to `addr` in the namespace.
    pub fn udp_socket(&self, addr: std::net::SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let s = self.socket(Type::DGRAM)?;
        s.bind(&addr.into())?;
        tokio::net::UdpSocket::from_std(s.into())
    }

    /// A TCP connection from the namespace (source address `from`, port chosen by the kernel).
    pub async fn tcp_connect(
        &self,
        from: Option<std::net::IpAddr>,
        to: std::net::SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let s = self.socket(Type::STREAM)?;
        if let Some(ip) = from {
            s.bind(&std::net::SocketAddr::new(ip, 0).into())?;
        }
        let std_stream: std::net::TcpStream = s.into();
        tokio::net::TcpSocket::from_std_stream(std_stream)
            .connect(to)
            .await
    }
}
