//! Target-group health checks: the defaults of the AWS Load Balancer Controller per traffic
//! policy, and the user's overrides on top.

use super::ModelError;
use super::vocabulary::{HealthCheckPort, HealthCheckProtocol, TargetType};

/// Target-group health check, fully resolved (no defaults left to AWS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub protocol: HealthCheckProtocol,
    /// `traffic-port` or a port number, as ELBv2 spells it.
    pub port: String,
    pub path: Option<String>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    /// HTTP success codes (HTTP/HTTPS checks only).
    pub success_codes: Option<String>,
}

/// Health-check settings the user asked for; unset fields take the model's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckOverrides {
    pub protocol: Option<HealthCheckProtocol>,
    pub port: Option<HealthCheckPort>,
    pub path: Option<String>,
    pub interval_seconds: Option<i32>,
    pub timeout_seconds: Option<i32>,
    pub healthy_threshold: Option<i32>,
    pub unhealthy_threshold: Option<i32>,
    pub success_codes: Option<String>,
}

/// What decides the default check of a target group.
#[derive(Clone, Copy, Debug)]
pub struct HealthCheckInputs {
    pub target_type: TargetType,
    /// externalTrafficPolicy Local.
    pub local: bool,
    /// The Service's spec.healthCheckNodePort.
    pub health_check_node_port: Option<i32>,
    /// The node proxy's admin port, when it serves the NodePorts.
    pub node_proxy_port: Option<u16>,
}

/// An HTTP check of `path` on `port` (10 s / 6 s, 2/2), as kube-proxy's health servers get.
fn http_check(port: String, path: &str) -> HealthCheckSpec {
    HealthCheckSpec {
        protocol: HealthCheckProtocol::Http,
        port,
        path: Some(path.into()),
        interval_seconds: 10,
        timeout_seconds: 6,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        success_codes: Some("200-399".into()),
    }
}

/// The check without overrides: HTTP `/healthz` on the healthCheckNodePort for Local instance
/// targets (the node proxy answers it), HTTP `/readyz` on the node proxy's admin port when it
/// serves the NodePorts, else TCP on the traffic port (10 s / 10 s, 3/3).
fn default_check(i: &HealthCheckInputs) -> Result<HealthCheckSpec, ModelError> {
    if i.local && i.target_type == TargetType::Instance {
        let port = i
            .health_check_node_port
            .ok_or(ModelError::NoHealthCheckNodePort)?;
        return Ok(http_check(port.to_string(), "/healthz"));
    }
    if let (Some(port), TargetType::Instance) = (i.node_proxy_port, i.target_type) {
        return Ok(http_check(port.to_string(), "/readyz"));
    }
    Ok(HealthCheckSpec {
        protocol: HealthCheckProtocol::Tcp,
        port: "traffic-port".into(),
        path: None,
        interval_seconds: 10,
        timeout_seconds: 10,
        healthy_threshold: 3,
        unhealthy_threshold: 3,
        success_codes: None,
    })
}

/// Health check defaults of the AWS Load Balancer Controller, overridden by annotations.
pub fn health_check(
    inputs: &HealthCheckInputs,
    o: &HealthCheckOverrides,
) -> Result<HealthCheckSpec, ModelError> {
    let mut hc = default_check(inputs)?;
    if let Some(p) = o.protocol {
        hc.protocol = p;
        if p.is_http() {
            hc.path.get_or_insert_with(|| "/".into());
            hc.success_codes.get_or_insert_with(|| "200-399".into());
        } else {
            hc.path = None;
            hc.success_codes = None;
        }
    }
    match &o.port {
        Some(HealthCheckPort::TrafficPort) => hc.port = "traffic-port".into(),
        Some(HealthCheckPort::Port(n)) => hc.port = n.to_string(),
        Some(HealthCheckPort::Name(n)) => {
            return Err(ModelError::UnknownHealthCheckPort(n.clone()));
        }
        None => {}
    }
    if let Some(p) = &o.path {
        hc.path = Some(p.clone());
    }
    if let Some(v) = o.interval_seconds {
        hc.interval_seconds = v;
    }
    if let Some(v) = o.timeout_seconds {
        hc.timeout_seconds = v;
    }
    if let Some(v) = o.healthy_threshold {
        hc.healthy_threshold = v;
    }
    if let Some(v) = o.unhealthy_threshold {
        hc.unhealthy_threshold = v;
    }
    if let Some(c) = &o.success_codes {
        hc.success_codes = Some(c.clone());
    }
    Ok(hc)
}
