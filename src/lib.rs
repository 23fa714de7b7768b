//! cloudlb: a Kubernetes LoadBalancer controller for AWS Network Load Balancers, with an embedded
//! node proxy for the NodePort-to-pod leg. The binary in `main.rs` only wires these modules.

pub mod annotations;
pub mod cloud;
pub mod controller;
pub mod crd;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod runtime;
pub mod telemetry;
