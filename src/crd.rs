//! Custom resources cloudlb serves, as Rust types (kube derive + schemars).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Every CRD cloudlb ships, in the order `cloudlb crdgen` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    Vec::new()
}
