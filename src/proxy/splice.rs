//! A pipe for `splice(2)`: socket → pipe → socket moves page references in the kernel instead
//! of copying bytes through user space, which is what makes bulk forwarding cheap. The only
//! unsafe code of the proxy lives here, around three system calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::net::TcpStream;

/// Pipe size asked for (the kernel may grant less; the default is 64 KiB).
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// A non-blocking pipe and how many bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
    capacity: usize,
}

impl Pipe {
    /// A new non-blocking, close-on-exec pipe, enlarged when the kernel allows.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ on a pipe descriptor we own.
        let size = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = usize::try_from(size).unwrap_or(0).max(4096);
        Ok(Pipe {
            read,
            write,
            len: 0,
            capacity,
        })
    }

    /// Bytes in the pipe.
    pub fn len(&self) -> usize {
        self.len
    }

    /// How much one fill may move.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Splices what `src` has (up to the free space) into the pipe; 0 means end of stream.
    pub fn fill_from(&mut self, src: &TcpStream) -> io::Result<usize> {
        let free = self.capacity - self.len;
        let n = splice(src.as_raw_fd(), self.write.as_raw_fd(), free)?;
        self.len += n;
        Ok(n)
    }

    /// Splices from the pipe into `dst` as much as it takes.
    pub fn drain_into(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), dst.as_raw_fd(), self.len)?;
        self.len -= n;
        Ok(n)
    }
}

fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from owners
    // that outlive it); null offsets are what splice wants for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_a_pipe_between_sockets_unchanged() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sender = TcpStream::connect(addr).await.unwrap();
        let (src, _) = listener.accept().await.unwrap();
        let dst = TcpStream::connect(addr).await.unwrap();
        let (mut receiver, _) = listener.accept().await.unwrap();

        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&to_send).await.unwrap();
            sender.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::new().unwrap();
        loop {
            src.readable().await.unwrap();
            let n = match src.try_io(tokio::io::Interest::READABLE, || pipe.fill_from(&src)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            };
            if n == 0 {
                break;
            }
            while pipe.len() > 0 {
                dst.writable().await.unwrap();
                match dst.try_io(tokio::io::Interest::WRITABLE, || pipe.drain_into(&dst)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        drop(dst);
        writer.await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert_eq!(got, data);
    }
}
