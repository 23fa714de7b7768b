//! The cloud edge: what the controller needs from AWS, the plan that decides it, and the errors.

pub mod aws;
pub mod plan;
pub mod ratelimit;

/// A failed cloud call, classified by what the controller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Throttling, 5xx, timeouts, resets: retried with backoff, then the reconcile requeues.
    #[error("{operation}: transient AWS error (retried): {message}")]
    Transient {
        operation: &'static str,
        message: String,
    },
    /// Access denied, validation errors and the like: AWS's message goes into a Warning Event.
    #[error("{operation}: AWS rejected the request: {code}: {message}")]
    Rejected {
        operation: &'static str,
        code: String,
        message: String,
    },
    /// A resource with our deterministic name exists but is not tagged as ours: never touched.
    #[error(
        "{kind} {name:?} exists but is not owned by this cluster's cloudlb for this Service; it is left alone"
    )]
    NotOwned { kind: &'static str, name: String },
    /// No subnets to place the load balancer in.
    #[error("no subnets: {0}")]
    NoSubnets(String),
    /// A step of the plan referred to something that should exist by then.
    #[error("internal: {0}")]
    Internal(String),
}

impl CloudError {
    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, CloudError::Transient { .. })
    }
}
