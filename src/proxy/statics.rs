//! PURE: the standalone mode's table from `--static` flags, for benchmarks and trying the proxy
//! without a cluster. A spec reads `PROTOCOL:NODE_PORT=BACKEND[,BACKEND...]`, e.g.
//! `tcp:30021=127.0.0.1:5201`.

use std::net::SocketAddr;
use std::sync::Arc;

use super::table::{Frontend, FrontendKey, Protocol, ServicePortName, Table};

/// Namespace shown in logs and metrics for static frontends.
const STATIC_NAMESPACE: &str = "static";

/// A `--static` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaticSpecError {
    /// The overall shape is wrong.
    #[error(
        "{0:?}: expected PROTOCOL:NODE_PORT=BACKEND[,BACKEND...], e.g. tcp:30021=127.0.0.1:5201"
    )]
    Shape(String),
    /// Not tcp or udp.
    #[error("{0:?}: protocol must be tcp or udp")]
    Protocol(String),
    /// Not a port number.
    #[error("{0:?}: node port must be 1-65535")]
    Port(String),
    /// Not an ip:port.
    #[error("{0:?}: backend must be IP:PORT")]
    Backend(String),
    /// The same protocol and port twice.
    #[error("{0} given twice")]
    Duplicate(String),
}

/// Builds the table from the specs (in flag order; a protocol/port may appear once).
pub fn build(specs: &[String]) -> Result<Table, StaticSpecError> {
    let mut table = Table::default();
    for spec in specs {
        let (key, targets) = parse(spec)?;
        let mut targets = targets;
        targets.sort();
        targets.dedup();
        let frontend = Frontend {
            service: ServicePortName {
                namespace: STATIC_NAMESPACE.into(),
                name: format!("{}-{}", key.protocol, key.node_port),
                port: String::new(),
            },
            serving: targets.clone(),
            targets,
            affinity: None,
            proxy_protocol: Default::default(),
        };
        if table.frontends.insert(key, Arc::new(frontend)).is_some() {
            return Err(StaticSpecError::Duplicate(key.to_string()));
        }
    }
    Ok(table)
}

fn parse(spec: &str) -> Result<(FrontendKey, Vec<SocketAddr>), StaticSpecError> {
    let shape = || StaticSpecError::Shape(spec.to_string());
    let (front, backends) = spec.split_once('=').ok_or_else(shape)?;
    let (protocol, port) = front.split_once(':').ok_or_else(shape)?;
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(StaticSpecError::Protocol(spec.to_string())),
    };
    let node_port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| StaticSpecError::Port(spec.to_string()))?;
    let targets = backends
        .split(',')
        .map(|b| {
            b.trim()
                .parse::<SocketAddr>()
                .map_err(|_| StaticSpecError::Backend(spec.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        FrontendKey {
            protocol,
            node_port,
        },
        targets,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_why_not() {
        let ok = build(&[
            "tcp:30021=127.0.0.1:5201".into(),
            "UDP:30053=127.0.0.2:53,127.0.0.1:53".into(),
        ])
        .unwrap();
        let tcp = &ok.frontends[&FrontendKey {
            protocol: Protocol::Tcp,
            node_port: 30021,
        }];
        assert_eq!(tcp.targets, vec!["127.0.0.1:5201".parse().unwrap()]);
        assert_eq!(tcp.service.name, "tcp-30021");
        let udp = &ok.frontends[&FrontendKey {
            protocol: Protocol::Udp,
            node_port: 30053,
        }];
        assert_eq!(
            udp.targets,
            vec![
                "127.0.0.1:53".parse().unwrap(),
                "127.0.0.2:53".parse().unwrap()
            ]
        );

        type Want = fn(String) -> StaticSpecError;
        let cases: [(&str, Want); 5] = [
            ("tcp:30021", StaticSpecError::Shape),
            ("sctp:30021=127.0.0.1:1", StaticSpecError::Protocol),
            ("tcp:0=127.0.0.1:1", StaticSpecError::Port),
            ("tcp:70000=127.0.0.1:1", StaticSpecError::Port),
            ("tcp:30021=localhost:1", StaticSpecError::Backend),
        ];
        for (spec, err) in cases {
            assert_eq!(
                build(&[spec.to_string()]),
                Err(err(spec.to_string())),
                "{spec}"
            );
        }
        assert_eq!(
            build(&["tcp:1=1.1.1.1:1".into(), "tcp:1=1.1.1.1:2".into()]),
            Err(StaticSpecError::Duplicate("tcp:1".into()))
        );
    }
}
