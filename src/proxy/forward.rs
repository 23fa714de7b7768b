//! Moves bytes both ways between a client and a backend TCP socket until both directions end.
//!
//! Both directions run in the connection's one task, on readiness (`readable`/`try_read`), and
//! read into a per-thread scratch buffer that is written on at once; a connection only holds
//! bytes of its own while its peer is slower than its sender. So an idle or keep-alive
//! connection costs no buffer, and nothing is allocated per request.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

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

/// One direction: src → dst, then a write shutdown of dst at end-of-stream.
async fn pump(src: &TcpStream, dst: &TcpStream, bytes: &Counter) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut sent = 0;
    loop {
        if sent < pending.len() {
            dst.writable().await?;
            match dst.try_write(&pending[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            if sent == pending.len() {
                pending.clear();
                sent = 0;
            }
            continue;
        }
        src.readable().await?;
        let moved = SCRATCH.with_borrow_mut(|buf| move_once(src, dst, buf, &mut pending));
        match moved {
            Ok(0) => {
                // End of stream: pass the half-close on; the other direction may go on.
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                bytes.inc_by(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads once into `buf` and writes as much as `dst` takes right away; what it does not take
/// goes to `pending`. Returns the bytes read (0 at end-of-stream).
fn move_once(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> io::Result<usize> {
    let n = src.try_read(buf)?;
    if n == 0 {
        return Ok(0);
    }
    let written = match dst.try_write(&buf[..n]) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written < n {
        pending.extend_from_slice(&buf[written..n]);
    }
    Ok(n)
}
