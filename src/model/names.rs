//! Deterministic AWS names: readable, at most 32 characters, and changing exactly when an
//! immutable property of the resource changes.

use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of the parts joined by `/`, cut to `len` characters.
pub(super) fn short_hash(parts: &[&str], len: usize) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"/");
        }
        h.update(p.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..len].to_string()
}

/// `k8s-<ns:8>-<name:8>-<hash:10>`: readable, unique per hash input, ≤ 32 characters.
pub(super) fn aws_name(namespace: &str, name: &str, hash: &str) -> String {
    let part = |s: &str| {
        let cut: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(8)
            .collect();
        cut.trim_matches('-').to_string()
    };
    format!("k8s-{}-{}-{}", part(namespace), part(name), hash)
}

/// The readable start of every name [`aws_name`] gives a Service's resources.
pub fn name_prefix(namespace: &str, name: &str) -> String {
    let full = aws_name(namespace, name, "");
    full.trim_end_matches('-').to_string() + "-"
}

/// The load balancer name a Service gets when the name annotation does not set one.
pub fn load_balancer_name(cluster: &str, namespace: &str, name: &str) -> String {
    aws_name(
        namespace,
        name,
        &short_hash(&[cluster, namespace, name], 10),
    )
}
