//! Moves bytes both ways between a client and a backend TCP socket until both directions end.
//!
//! Both directions run in the connection's one task, on readiness. A direction starts in copy
//! mode: it reads into a per-thread scratch buffer and writes on at once, so a connection only
//! holds bytes of its own while its peer is slower than its sender; an idle or keep-alive
//! connection costs no buffer and nothing is allocated per request. A read that comes back
//! short means the socket is drained, so readiness is dropped without the extra `read` that
//! would only say `EAGAIN`. A direction that fills the whole scratch buffer is bulk: it moves
//! to `splice(2)` through a pipe, and its bytes no longer cross user space. With an idle
//! timeout, a connection that moves no byte either way for that long is closed.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::splice::Pipe;

/// Scratch read size: large enough for bulk transfers to need few system calls.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Runs `f` on this thread's scratch buffer (also the UDP path's one receive buffer).
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| f(buf))
}

/// How a forwarded connection ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions saw end-of-stream.
    Finished,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// Forwards until both directions have seen end-of-stream (each half-close is passed on),
/// until nothing moved for `idle` (when given), or until an error on either socket, which is
/// returned; the caller then resets both sides.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    bytes_in: &Counter,
    bytes_out: &Counter,
    idle: Option<Duration>,
) -> io::Result<Ended> {
    let progress = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            pump(client, backend, bytes_in, &progress),
            pump(backend, client, bytes_out, &progress)
        )
    };
    match idle {
        None => both.await.map(|_| Ended::Finished),
        Some(idle) => tokio::select! {
            r = both => r.map(|_| Ended::Finished),
            _ = until_idle(&progress, idle) => Ok(Ended::Idle),
        },
    }
}

/// Returns once `progress` has not moved for `idle` (checked in quarters of it, so the close
/// comes between `idle` and 1.25 × `idle` after the last byte).
async fn until_idle(progress: &AtomicU64, idle: Duration) {
    const CHECKS: u32 = 4;
    let tick = (idle / CHECKS).max(Duration::from_millis(1));
    let mut last = progress.load(Ordering::Relaxed);
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        let now = progress.load(Ordering::Relaxed);
        if now == last {
            quiet += 1;
            if quiet >= CHECKS {
                return;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
}

/// What one read-and-write step did.
enum Step {
    /// Bytes read (and written or queued).
    Moved(usize),
    /// End of stream.
    Eof,
}

/// One direction: src → dst, then a write shutdown of dst at end-of-stream. Every step that
/// moves bytes bumps `progress`.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &Counter,
    progress: &AtomicU64,
) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut sent = 0;
    let mut bulk = false;
    loop {
        if sent < pending.len() {
            dst.writable().await?;
            match dst.try_write(&pending[sent..]) {
                Ok(n) => {
                    sent += n;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            if sent == pending.len() {
                pending = Vec::new();
                sent = 0;
            }
            continue;
        }
        if bulk {
            if let Ok(pipe) = Pipe::new() {
                return splice_pump(src, dst, pipe, bytes, progress).await;
            }
            bulk = false;
        }
        src.readable().await?;
        let mut step = None;
        let result = SCRATCH.with_borrow_mut(|buf| {
            src.try_io(Interest::READABLE, || {
                let s = copy_once(src, dst, buf, &mut pending)?;
                let drained = matches!(s, Step::Moved(n) if n < buf.len());
                step = Some(s);
                if drained {
                    // A short read emptied the socket: drop readiness now, skip the EAGAIN read.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            })
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        match step {
            None => {}
            Some(Step::Eof) => {
                // End of stream: pass the half-close on; the other direction may go on.
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            Some(Step::Moved(n)) => {
                bytes.inc_by(n as u64);
                progress.fetch_add(1, Ordering::Relaxed);
                bulk = n == SCRATCH_SIZE;
            }
        }
    }
}

/// Reads once into `buf` and writes as much as `dst` takes right away; the rest goes to
/// `pending`. Plain non-blocking system calls: tokio's readiness is handled by the caller.
fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> io::Result<Step> {
    let n = (&*SockRef::from(src)).read(buf)?;
    if n == 0 {
        return Ok(Step::Eof);
    }
    let written = match (&*SockRef::from(dst)).write(&buf[..n]) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written < n {
        pending.extend_from_slice(&buf[written..n]);
    }
    Ok(Step::Moved(n))
}

/// Bulk mode: socket → pipe → socket with `splice(2)`, until end-of-stream.
async fn splice_pump(
    src: &TcpStream,
    dst: &TcpStream,
    mut pipe: Pipe,
    bytes: &Counter,
    progress: &AtomicU64,
) -> io::Result<()> {
    loop {
        while pipe.len() > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || pipe.drain_into(dst)) {
                Ok(n) => {
                    bytes.inc_by(n as u64);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        src.readable().await?;
        // Unlike read(2), a short splice does not mean the socket is drained (the pipe may run
        // out of slots first), so only EAGAIN drops readiness here.
        let filled = match src.try_io(Interest::READABLE, || pipe.fill_from(src)) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => return Err(e),
        };
        if filled == Some(0) {
            let _ = SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn small_and_bulk_bytes_cross_unchanged_with_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, proxy_client_side) = pair(&listener).await;
        let (proxy_backend_side, mut backend) = pair(&listener).await;
        let (bytes_in, bytes_out) = (Counter::default(), Counter::default());
        let counters = (bytes_in.clone(), bytes_out.clone());
        let proxy = tokio::spawn(async move {
            forward(
                &proxy_client_side,
                &proxy_backend_side,
                &counters.0,
                &counters.1,
                Some(Duration::from_secs(60)),
            )
            .await
        });

        // A small exchange (copy mode), then 8 MiB each way (switches to splice).
        client.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        backend.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"ping");
        backend.write_all(b"pong").await.unwrap();
        client.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");

        let up: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (mut client_r, mut client_w) = client.into_split();
        let sent_up = up.clone();
        let writer = tokio::spawn(async move {
            client_w.write_all(&sent_up).await.unwrap();
            client_w.shutdown().await.unwrap(); // half-close: the backend sees EOF
            client_w
        });
        let mut got_up = Vec::new();
        backend.read_to_end(&mut got_up).await.unwrap();
        assert!(got_up == up, "upstream bytes changed");
        // The other direction still works after the half-close.
        backend.write_all(&down).await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got_down = Vec::new();
        client_r.read_to_end(&mut got_down).await.unwrap();
        assert!(got_down == down, "downstream bytes changed");
        drop(writer.await.unwrap());

        assert_eq!(proxy.await.unwrap().unwrap(), Ended::Finished);
        assert_eq!(bytes_in.get(), 4 + (8 << 20));
        assert_eq!(bytes_out.get(), 4 + (8 << 20));
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_timeout_ends_and_one_in_use_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, proxy_client_side) = pair(&listener).await;
        let (proxy_backend_side, mut backend) = pair(&listener).await;
        let idle = Duration::from_millis(400);
        let proxy = tokio::spawn(async move {
            let (i, o) = (Counter::default(), Counter::default());
            let start = std::time::Instant::now();
            let ended = forward(&proxy_client_side, &proxy_backend_side, &i, &o, Some(idle)).await;
            (ended.unwrap(), start.elapsed())
        });
        // Traffic every 150 ms for 1.2 s keeps it open (each gap is under the timeout).
        for _ in 0..8 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            backend.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert!(!proxy.is_finished(), "closed while in use");
        let (ended, took) = proxy.await.unwrap();
        assert_eq!(ended, Ended::Idle);
        // The last byte moved after 7 × 150 ms; the close comes at least 400 ms after it.
        assert!(took >= Duration::from_millis(1050 + 400), "{took:?}");
    }
}
