//! PROXY protocol v2 (haproxy's `proxy-protocol.txt`, what AWS NLB sends with
//! `proxy_protocol_v2.enabled`): the header the node proxy writes to a pod so it learns the
//! client's address (`cloudlb.io/proxy-protocol-to-pod: v2`), and the reading of the NLB's own
//! header when the target group has it, so the client is taken from there.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL (health checks and the like: no addresses to take).
const V2_LOCAL: u8 = 0x20;
/// Address family and transport: TCP over IPv4 / IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// The largest header accepted from a load balancer (AWS's TLVs are far below this).
const MAX_HEADER: usize = 1024;

/// A v2 PROXY header for a TCP connection from `source` to `destination` (IPv4 when both are,
/// else both as IPv6, v4 ones mapped).
pub fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&SIGNATURE);
    out.push(V2_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// What a received header says: the connection's original (source, destination), or `None`
/// for a LOCAL header or an address family without addresses (the peer is then the client).
pub type Addresses = Option<(SocketAddr, SocketAddr)>;

/// Parses a complete header: its 16-byte fixed part and `body` (the `len` bytes after it).
pub fn parse(fixed: &[u8; 16], body: &[u8]) -> io::Result<Addresses> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("PROXY v2: {why}"));
    if fixed[..12] != SIGNATURE {
        return Err(bad("no signature"));
    }
    let (command, family) = (fixed[12], fixed[13]);
    if command == V2_LOCAL {
        return Ok(None);
    }
    if command != V2_PROXY {
        return Err(bad("unknown version or command"));
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match family {
        TCP4 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            Ok(Some((
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            )))
        }
        TCP6 if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::from(a)
            };
            Ok(Some((
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            )))
        }
        TCP4 | TCP6 => Err(bad("address block too short")),
        _ => Ok(None),
    }
}

/// Reads one header from the start of `stream` within `timeout` (the load balancer sends it
/// at once); anything else at the start of the stream is an error.
pub async fn read(stream: &mut TcpStream, timeout: Duration) -> io::Result<Addresses> {
    let read = async {
        let mut fixed = [0u8; 16];
        stream.read_exact(&mut fixed).await?;
        if fixed[..12] != SIGNATURE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "PROXY v2: no signature",
            ));
        }
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        if len > MAX_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "PROXY v2: header too long",
            ));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        parse(&fixed, &body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY v2: no header in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(h: &[u8]) -> ([u8; 16], &[u8]) {
        let mut fixed = [0u8; 16];
        fixed.copy_from_slice(&h[..16]);
        (fixed, &h[16..])
    }

    #[test]
    fn headers_round_trip() {
        let cases: [(&str, &str, usize, &str, &str); 3] = [
            (
                "10.1.2.3:40000",
                "10.213.0.5:30080",
                28,
                "10.1.2.3:40000",
                "10.213.0.5:30080",
            ),
            (
                "[2001:db8::1]:443",
                "[2001:db8::2]:80",
                52,
                "[2001:db8::1]:443",
                "[2001:db8::2]:80",
            ),
            // mixed families: both as IPv6, the v4 one mapped
            (
                "10.1.2.3:1",
                "[2001:db8::2]:80",
                52,
                "[::ffff:10.1.2.3]:1",
                "[2001:db8::2]:80",
            ),
        ];
        for (src, dst, len, want_src, want_dst) in cases {
            let h = header(src.parse().unwrap(), dst.parse().unwrap());
            assert_eq!(h.len(), len, "{src}");
            assert_eq!(h[12], 0x21);
            assert_eq!(usize::from(u16::from_be_bytes([h[14], h[15]])), len - 16);
            let (fixed, body) = split(&h);
            let (s, d) = parse(&fixed, body).unwrap().unwrap();
            assert_eq!(
                (s, d),
                (want_src.parse().unwrap(), want_dst.parse().unwrap())
            );
        }
    }

    #[test]
    fn ipv4_header_bytes_are_the_spec_example() {
        let h = header(
            "192.0.2.1:56324".parse().unwrap(),
            "192.0.2.2:443".parse().unwrap(),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 192, 0, 2, 2, 0xdc, 0x04, 1, 0xbb,
        ]);
        assert_eq!(h, want);
    }

    #[test]
    fn parse_rejects_or_ignores_what_it_should() {
        let good = header("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        // (header, Ok(has addresses) or Err)
        let cases: Vec<(Vec<u8>, Result<bool, ()>)> = vec![
            (good.clone(), Ok(true)),
            (with(0, b'X'), Err(())),       // signature
            (with(12, 0x20), Ok(false)),    // LOCAL
            (with(12, 0x11), Err(())),      // version 1 in a v2 header
            (with(13, 0x00), Ok(false)),    // UNSPEC family
            (good[..20].to_vec(), Err(())), // truncated address block
        ];
        for (i, (h, want)) in cases.into_iter().enumerate() {
            let (fixed, body) = split(&h);
            let got = parse(&fixed, body).map(|a| a.is_some()).map_err(|_| ());
            assert_eq!(got, want, "case {i}");
        }
    }

    #[tokio::test]
    async fn read_takes_the_header_and_leaves_the_payload() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut bytes = header("10.9.8.7:1234".parse().unwrap(), addr);
            bytes.extend_from_slice(b"payload");
            s.write_all(&bytes).await.unwrap();
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let (src, _) = read(&mut server, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src, "10.9.8.7:1234".parse().unwrap());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"payload");
        client.await.unwrap();
    }
}
