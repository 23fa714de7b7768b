//! Moves bytes both ways between a client and a backend TCP socket until both directions end.
//!
//! Both directions run in the connection's one task, on readiness. A direction starts in copy
//! mode: it reads into a per-thread scratch buffer and writes on at once, so a connection only
//! holds bytes of its own while its peer is slower than its sender; an idle or keep-alive
//! connection costs no buffer and nothing is allocated per request. A read that comes back
//! short means the socket is drained, so readiness is dropped without the extra `read` that
//! would only say `EAGAIN`. A direction that fills the whole scratch buffer is bulk: it moves
//! to `splice(2)` through a pipe, and its bytes no longer cross user space.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::Shutdown;

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

/// Forwards until both directions have seen end-of-stream (each half-close is passed on), or
/// until an error on either socket, which is returned; the caller then resets both sides.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    bytes_in: &Counter,
    bytes_out: &Counter,
) -> io::Result<()> {
    tokio::try_join!(
        pump(client, backend, bytes_in),
        pump(backend, client, bytes_out)
    )?;
    Ok(())
}

/// What one read-and-write step did.
enum Step {
    /// Bytes read (and written or queued).
    Moved(usize),
    /// End of stream.
    Eof,
}

/// One direction: src → dst, then a write shutdown of dst at end-of-stream.
async fn pump(src: &TcpStream, dst: &TcpStream, bytes: &Counter) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut sent = 0;
    let mut bulk = false;
    loop {
        if sent < pending.len() {
            dst.writable().await?;
            match dst.try_write(&pending[sent..]) {
                Ok(n) => sent += n,
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
                return splice_pump(src, dst, pipe, bytes).await;
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
) -> io::Result<()> {
    loop {
        while pipe.len() > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || pipe.drain_into(dst)) {
                Ok(n) => {
                    bytes.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        src.readable().await?;
        let mut filled = None;
        let result = src.try_io(Interest::READABLE, || {
            let n = pipe.fill_from(src)?;
            filled = Some(n);
            if n > 0 && n < pipe.capacity() {
                // Short: the socket is drained (see `pump`).
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
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

        proxy.await.unwrap().unwrap();
        assert_eq!(bytes_in.get(), 4 + (8 << 20));
        assert_eq!(bytes_out.get(), 4 + (8 << 20));
    }
}
