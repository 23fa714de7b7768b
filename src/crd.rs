//! Custom resources cloudlb serves, as Rust types (kube derive + schemars).
//!
//! `TargetGroupBinding` follows the AWS Load Balancer Controller's `elbv2.k8s.aws` resource of the
//! same name, so users who bring their own target group (made by Terraform, shared by several
//! clusters) can move over without relearning it: cloudlb keeps the group's targets in step with a
//! Service's nodes. The apiserver enforces as much as it can (pattern, enum, CEL rules), so the
//! controller never sees an object it would have to reject.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Every CRD cloudlb ships, in the order `cloudlb crdgen` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![TargetGroupBinding::crd()]
}

/// Binds an existing ELBv2 target group to a Service: cloudlb registers the Service's nodes (on its
/// NodePort) or pod IPs as the group's targets and keeps them current.
// Each `printcolumn(...)` has its own `description`; clippy reads them as one repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "cloudlb.io",
    version = "v1beta1",
    kind = "TargetGroupBinding",
    namespaced,
    status = "TargetGroupBindingStatus",
    shortname = "tgb",
    category = "cloudlb",
    selectable = ".spec.serviceRef.name",
    doc = "Binds an existing ELBv2 target group to a Service's nodes or pods.",
    printcolumn(
        name = "Service",
        type_ = "string",
        json_path = ".spec.serviceRef.name",
        description = "The Service whose endpoints are registered"
    ),
    printcolumn(
        name = "Port",
        type_ = "string",
        json_path = ".spec.serviceRef.port",
        description = "The Service port (number or name)"
    ),
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.targetType",
        description = "instance (nodes on the NodePort) or ip (pod IPs)"
    ),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.registeredTargets",
        description = "Targets registered in the target group"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the target group matches the Service"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "ARN",
        type_ = "string",
        json_path = ".spec.targetGroupARN",
        description = "The bound target group",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.nodeSelector) || self.targetType == 'instance'",
        "message": "nodeSelector applies only to targetType instance",
    },
]))]
pub struct TargetGroupBindingSpec {
    /// ARN of the target group to keep in step with the Service. It cannot change: point a new
    /// binding at another group instead, so targets are never left behind in the old one.
    #[serde(rename = "targetGroupARN")]
    #[schemars(
        regex(pattern = r"^arn:[^:]+:elasticloadbalancing:[^:]*:[^:]*:targetgroup/[^/]+/[^/]+$"),
        extend("x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "targetGroupARN is immutable"},
        ])
    )]
    pub target_group_arn: String,

    /// What gets registered: `instance` registers the eligible nodes on the Service's NodePort,
    /// `ip` registers ready pod IPs on the target port. It must match the target group's own
    /// target type, which AWS fixes at creation, hence immutable here too.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "targetType is immutable"},
    ]))]
    pub target_type: TargetType,

    /// The Service (in this namespace) and port whose endpoints become targets.
    pub service_ref: ServiceReference,

    /// Registers only nodes with these labels (targetType `instance`); all eligible nodes when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
}

/// How targets are addressed in the target group: the model's type, shared with Services.
pub use crate::model::TargetType;

/// A Service port in the binding's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// Name of the Service.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The Service port, by number (`spec.ports[].port`) or by name (`spec.ports[].name`).
    pub port: ServicePort,
}

/// A Service port by number or by name: Kubernetes' `IntOrString`, written out here because
/// k8s-openapi's schemars support is not enabled in this crate.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ServicePort {
    /// `spec.ports[].port`.
    Number(i32),
    /// `spec.ports[].name`.
    Name(String),
}

impl JsonSchema for ServicePort {
    fn schema_name() -> Cow<'static, str> {
        "ServicePort".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The Service port, by number (spec.ports[].port) or by name (spec.ports[].name).",
            "x-kubernetes-int-or-string": true,
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? (self >= 1 && self <= 65535) : self.size() > 0",
                "message": "port must be a number from 1 to 65535 or a port name",
            }],
        })
    }
}

/// Selects nodes by labels. Only `matchLabels`: it covers the "these node groups" use case and
/// keeps matching trivial for the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// Every one of these labels must be present on a node with the given value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl NodeSelector {
    /// Whether a node with `labels` is selected (an empty selector selects every node).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What the controller last did with a binding.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetGroupBindingStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many targets are registered in the target group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_targets: Option<i32>,
    /// The targets this binding registered itself, written before it registers them. Only these
    /// are ever deregistered (when the Service stops wanting them, or when the binding goes), so
    /// a target group shared with other clusters keeps their targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<RegisteredTarget>>,
    /// `Ready` says whether the target group's targets match the Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One target in a binding's status: an instance id or IP, at a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
pub struct RegisteredTarget {
    /// EC2 instance id (`instance`) or IP address (`ip`).
    pub id: String,
    /// The port it was registered at.
    pub port: i32,
}

/// A condition in the shape of `metav1.Condition`, so generic tooling (`kubectl wait
/// --for=condition=Ready`) understands it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase word for machines, e.g. `TargetsRegistered`, `ServiceNotFound`.
    pub reason: String,
    /// A sentence for people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub last_transition_time: Option<Time>,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The value of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// `metav1.Time` as the apiserver expects it in a schema (k8s-openapi's own schemars support is off).
fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time", "nullable": true})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn node_selector_matches_when_every_label_is_present() {
        let sel = NodeSelector {
            match_labels: labels(&[("pool", "edge"), ("zone", "a")]),
        };
        let cases = [
            (labels(&[("pool", "edge"), ("zone", "a")]), true),
            (labels(&[("pool", "edge"), ("zone", "a"), ("x", "y")]), true),
            (labels(&[("pool", "edge")]), false),
            (labels(&[("pool", "core"), ("zone", "a")]), false),
            (labels(&[]), false),
        ];
        for (node, want) in cases {
            assert_eq!(sel.matches(&node), want, "{node:?}");
        }
        assert!(NodeSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn spec_round_trips_with_number_and_name_ports_and_default_type() {
        let spec: TargetGroupBindingSpec = serde_json::from_value(serde_json::json!({
            "targetGroupARN": "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/a/b",
            "serviceRef": {"name": "web", "port": 80},
        }))
        .unwrap();
        assert_eq!(spec.target_type, TargetType::Instance);
        assert_eq!(spec.service_ref.port, ServicePort::Number(80));
        let named: ServiceReference =
            serde_json::from_value(serde_json::json!({"name": "web", "port": "http"})).unwrap();
        assert_eq!(named.port, ServicePort::Name("http".into()));
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["targetType"], "instance");
        assert_eq!(back["serviceRef"]["port"], 80);
    }

    #[test]
    fn crd_has_status_subresource_shortname_and_columns() {
        let crd = TargetGroupBinding::crd();
        assert_eq!(crd.spec.group, "cloudlb.io");
        assert_eq!(crd.spec.names.short_names, Some(vec!["tgb".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1beta1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Service", "Port", "Type", "Targets", "Ready", "Age", "ARN"]
        );
    }
}
