//! The ClusterIP leg in the kernel: one nftables table of the proxy's own (`ip <name>`) that
//! redirects each `virtual address:port` to the local listener serving it, as one `nft -f`
//! transaction that replaces the whole table (so a start after a SIGKILL leaves nothing stale).
//! Rendering is pure; [`Nft`] runs Debian's `nft` binary in the proxy's own network namespace.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::table::Protocol;

/// How long one `nft` run may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// nat priority: before kube-proxy's (and iptables-nft's) dstnat at -100.
const NAT_PRIORITY: i32 = -110;
/// filter priority of the guard on the listeners' ports: before the default filter at 0.
const FILTER_PRIORITY: i32 = -10;

/// One virtual address and port, redirected to a local listener port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Redirect {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The clusterIP or externalIP with the Service port.
    pub vip: SocketAddrV4,
    /// The local listener (bound on all addresses) that serves it.
    pub to_port: u16,
}

impl Redirect {
    /// The IPv4 redirects of a listener; IPv6 addresses are skipped (the table is `ip`).
    pub fn of(protocol: Protocol, vips: &[SocketAddr], to_port: u16) -> Vec<Redirect> {
        vips.iter()
            .filter_map(|v| match v {
                SocketAddr::V4(vip) => Some(Redirect {
                    protocol,
                    vip: *vip,
                    to_port,
                }),
                SocketAddr::V6(_) => None,
            })
            .collect()
    }
}

/// Whether `name` is usable as the table's name (nft identifiers; kept short and plain).
pub fn valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 32
}

/// The whole table for `redirects`, replacing any table of that name in one transaction
/// (`table … {}` first, so the delete succeeds when there is none).
///
/// nat prerouting (pods, other hosts) and output (the node itself) redirect through one map per
/// protocol keyed by address and port; the filter guard drops traffic sent straight to a
/// listener's port without having been redirected, so only virtual addresses reach them.
pub fn ruleset(table: &str, redirects: &[Redirect]) -> String {
    let mut sorted = redirects.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut out = format!("table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n");
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let p = protocol.as_str();
        let of: Vec<&Redirect> = sorted.iter().filter(|r| r.protocol == protocol).collect();
        let map: Vec<String> = of
            .iter()
            .map(|r| format!("{} . {} : {}", r.vip.ip(), r.vip.port(), r.to_port))
            .collect();
        let mut ports: Vec<u16> = of.iter().map(|r| r.to_port).collect();
        ports.sort();
        ports.dedup();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        out += &format!(
            "\tmap {p}_vips {{\n\t\ttype ipv4_addr . inet_service : inet_service\n{}\t}}\n",
            elements(&map)
        );
        out += &format!(
            "\tset {p}_ports {{\n\t\ttype inet_service\n{}\t}}\n",
            elements(&ports)
        );
    }
    out += "\tchain services {\n";
    out += "\t\tmeta l4proto tcp redirect to : ip daddr . tcp dport map @tcp_vips\n";
    out += "\t\tmeta l4proto udp redirect to : ip daddr . udp dport map @udp_vips\n";
    out += "\t}\n";
    for hook in ["prerouting", "output"] {
        out += &format!(
            "\tchain {hook} {{\n\t\ttype nat hook {hook} priority {NAT_PRIORITY}; policy accept;\n\t\tjump services\n\t}}\n"
        );
    }
    out += &format!(
        "\tchain input {{\n\t\ttype filter hook input priority {FILTER_PRIORITY}; policy accept;\n"
    );
    out += "\t\ttcp dport @tcp_ports ct status ! dnat reject with tcp reset\n";
    out += "\t\tudp dport @udp_ports ct status ! dnat drop\n";
    out += "\t}\n}\n";
    out
}

fn elements(items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!("\t\telements = {{ {} }}\n", items.join(", "))
}

/// Removes the table (nothing when it is already gone).
pub fn deletion(table: &str) -> String {
    format!("table ip {table} {{}}\ndelete table ip {table}\n")
}

/// Runs `nft -f -` with a generated ruleset, in the network namespace the proxy runs in.
#[derive(Clone, Debug)]
pub struct Nft {
    /// The `nft` program (a path, or a name looked up in `PATH`).
    pub program: String,
    /// The table's name.
    pub table: String,
}

impl Nft {
    /// Applies `ruleset` as one transaction; the error carries nft's message.
    pub async fn run(&self, ruleset: &str) -> io::Result<()> {
        let mut child = tokio::process::Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(ruleset.as_bytes()).await?;
        }
        let out = tokio::time::timeout(NFT_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nft did not finish"))??;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "nft: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(protocol: Protocol, vip: &str, to_port: u16) -> Redirect {
        Redirect {
            protocol,
            vip: vip.parse().unwrap(),
            to_port,
        }
    }

    #[test]
    fn rulesets() {
        struct Case {
            what: &'static str,
            redirects: Vec<Redirect>,
            /// Lines the ruleset must contain.
            has: Vec<&'static str>,
            /// Text it must not contain.
            lacks: Vec<&'static str>,
        }
        let cases = [
            Case {
                what: "empty: the table and its chains, no elements",
                redirects: vec![],
                has: vec![
                    "table ip cloudlb {}",
                    "delete table ip cloudlb",
                    "\t\ttype nat hook prerouting priority -110; policy accept;",
                    "\t\ttype nat hook output priority -110; policy accept;",
                    "\t\tmeta l4proto tcp redirect to : ip daddr . tcp dport map @tcp_vips",
                    "\t\ttcp dport @tcp_ports ct status ! dnat reject with tcp reset",
                ],
                lacks: vec!["elements"],
            },
            Case {
                what: "tcp and udp, sorted and deduplicated, one port per listener",
                redirects: vec![
                    r(Protocol::Tcp, "10.96.0.20:443", 40002),
                    r(Protocol::Tcp, "10.96.0.10:80", 40001),
                    r(Protocol::Tcp, "10.96.0.10:80", 40001),
                    r(Protocol::Tcp, "192.0.2.7:80", 40001),
                    r(Protocol::Udp, "10.96.0.10:53", 40003),
                ],
                has: vec![
                    "\t\telements = { 10.96.0.10 . 80 : 40001, 10.96.0.20 . 443 : 40002, 192.0.2.7 . 80 : 40001 }",
                    "\t\telements = { 40001, 40002 }",
                    "\t\telements = { 10.96.0.10 . 53 : 40003 }",
                    "\t\telements = { 40003 }",
                ],
                lacks: vec![],
            },
        ];
        for case in cases {
            let text = ruleset("cloudlb", &case.redirects);
            for line in &case.has {
                assert!(
                    text.lines().any(|l| l == *line),
                    "{}: missing {line:?} in\n{text}",
                    case.what
                );
            }
            for s in &case.lacks {
                assert!(!text.contains(s), "{}: has {s:?} in\n{text}", case.what);
            }
        }
    }

    #[test]
    fn ipv6_vips_are_skipped() {
        let vips: Vec<SocketAddr> = vec![
            "10.96.0.1:80".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap(),
        ];
        assert_eq!(
            Redirect::of(Protocol::Tcp, &vips, 9),
            vec![r(Protocol::Tcp, "10.96.0.1:80", 9)]
        );
    }

    #[test]
    fn table_names() {
        for (name, ok) in [
            ("cloudlb", true),
            ("cloudlb_edge2", true),
            ("", false),
            ("2x", false),
            ("a b", false),
            ("a;delete", false),
            ("cloudlb-x", false),
            (&"x".repeat(33), false),
        ] {
            assert_eq!(valid_table_name(name), ok, "{name:?}");
        }
        assert_eq!(deletion("t"), "table ip t {}\ndelete table ip t\n");
    }
}
