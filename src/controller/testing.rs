//! Unit-test kit for the controllers: a [`Context`] over the in-memory cloud and fake
//! Kubernetes writes that journal every call and remember what they wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::events::Note;
use super::writes::ServiceWrites;
use super::{ClusterArgs, Context, status};
use crate::cloud::fake::{FakeCloud, Journal};
use crate::metrics::ControllerMetrics;

/// Fake writes: journaled, and kept per Service so a test can hand the reconcile the Service
/// as the API server would now return it ([`FakeWrites::current`]).
#[derive(Default)]
pub struct FakeWrites {
    pub journal: Journal,
    state: Mutex<BTreeMap<String, Written>>,
}

#[derive(Clone, Debug, Default)]
struct Written {
    finalizers: BTreeSet<String>,
    hostname: Option<String>,
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

impl FakeWrites {
    /// `svc` with the finalizers and hostname written so far.
    pub fn current(&self, svc: &Service) -> Service {
        let mut out = svc.clone();
        let w = self
            .state
            .lock()
            .expect("fake lock")
            .get(&key(svc))
            .cloned()
            .unwrap_or_default();
        out.metadata.finalizers = Some(w.finalizers.into_iter().collect());
        out.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": w.hostname.map(|h| vec![json!({"hostname": h})]).unwrap_or_default()}}))
                .expect("status"),
        );
        out
    }

    fn with(&self, svc: &Service, f: impl FnOnce(&mut Written)) {
        f(self
            .state
            .lock()
            .expect("fake lock")
            .entry(key(svc))
            .or_default());
    }
}

impl ServiceWrites for FakeWrites {
    fn add_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        if !status::has_finalizer(svc, finalizer) {
            self.journal.push("kube:add-finalizer");
        }
        self.with(svc, |w| {
            w.finalizers.insert(finalizer.to_string());
        });
        Box::pin(async { Ok(()) })
    }

    fn remove_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        if status::has_finalizer(svc, finalizer) {
            self.journal.push("kube:remove-finalizer");
        }
        self.with(svc, |w| {
            w.finalizers.remove(finalizer);
        });
        Box::pin(async { Ok(()) })
    }

    fn update_status<'a>(
        &'a self,
        svc: &'a Service,
        u: status::Update<'a>,
    ) -> BoxFuture<'a, Result<bool, kube::Error>> {
        self.journal.push(format!(
            "kube:status {} {}",
            u.reason,
            u.hostname.unwrap_or("-")
        ));
        self.with(svc, |w| w.hostname = u.hostname.map(str::to_string));
        Box::pin(async { Ok(true) })
    }

    fn clear_status<'a>(&'a self, svc: &'a Service) -> BoxFuture<'a, Result<(), kube::Error>> {
        self.journal.push("kube:clear-status");
        self.with(svc, |w| w.hostname = None);
        Box::pin(async { Ok(()) })
    }

    fn event<'a>(&'a self, _svc: &'a Service, note: Note) -> BoxFuture<'a, ()> {
        let t = match note.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        self.journal
            .push(format!("kube:event {t} {} {}", note.reason, note.note));
        Box::pin(async {})
    }
}

/// A test world: the context plus handles on its fakes and caches.
pub struct World {
    pub ctx: Arc<Context>,
    pub cloud: Arc<FakeCloud>,
    pub writes: Arc<FakeWrites>,
    pub journal: Journal,
    nodes: Writer<Node>,
    services: Writer<Service>,
}

impl World {
    /// A synced, leading context with `nodes` ready nodes (`i-0`, `i-1`, …).
    pub fn new(nodes: usize) -> World {
        World::build(nodes, true, cluster())
    }

    /// Like [`World::new`], with these controller settings.
    pub fn with_cluster(nodes: usize, cluster: ClusterArgs) -> World {
        World::build(nodes, true, cluster)
    }

    /// Like [`World::new`], but a standby replica (it does not hold the lease).
    pub fn standby(nodes: usize) -> World {
        World::build(nodes, false, cluster())
    }

    fn build(nodes: usize, leading: bool, cluster: ClusterArgs) -> World {
        let journal = Journal::default();
        let cloud = Arc::new(FakeCloud::new(journal.clone()));
        let writes = Arc::new(FakeWrites {
            journal: journal.clone(),
            ..FakeWrites::default()
        });
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        let (node_store, node_writer) = reflector::store::<Node>();
        let (slices, _) = reflector::store();
        let (services, service_writer) = reflector::store();
        let synced = CancellationToken::new();
        synced.cancel();
        let ctx = Context {
            client: client.clone(),
            synced,
            finalizer: super::FINALIZER.into(),
            cloud: cloud.clone(),
            writes: writes.clone(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: super::MANAGER.into(),
                    instance: None,
                },
            ),
            metrics: ControllerMetrics::new(),
            cluster,
            nodes: node_store,
            slices,
            services,
            resync: Duration::from_secs(600),
            leading: if leading {
                synced_token()
            } else {
                CancellationToken::new()
            },
            services_memory: Default::default(),
            bindings: Default::default(),
            gated: Default::default(),
        };
        let mut w = World {
            ctx: Arc::new(ctx),
            cloud,
            writes,
            journal,
            nodes: node_writer,
            services: service_writer,
        };
        for i in 0..nodes {
            w.add_node(&format!("n{i}"), &format!("i-{i}"));
        }
        w
    }

    /// Puts `svc` into the Service cache.
    pub fn add_service(&mut self, svc: &Service) {
        self.services
            .apply_watcher_event(&watcher::Event::Apply(svc.clone()));
    }

    /// Adds a Ready node backed by EC2 instance `instance`.
    pub fn add_node(&mut self, name: &str, instance: &str) {
        self.set_node(name, instance, true);
    }

    /// Adds or replaces a node backed by EC2 instance `instance`, Ready or not.
    pub fn set_node(&mut self, name: &str, instance: &str, ready: bool) {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .expect("node");
        self.nodes.apply_watcher_event(&watcher::Event::Apply(node));
    }

    /// Removes a node from the cache.
    pub fn remove_node(&mut self, name: &str) {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).expect("node");
        self.nodes
            .apply_watcher_event(&watcher::Event::Delete(node));
    }
}

fn synced_token() -> CancellationToken {
    let t = CancellationToken::new();
    t.cancel();
    t
}

/// The controller settings of the tests: cluster `c`, the default class.
pub fn cluster() -> ClusterArgs {
    ClusterArgs {
        policy: Default::default(),
        cluster_name: "c".into(),
        load_balancer_class: super::DEFAULT_CLASS.into(),
        default_class: false,
        default_class_all: false,
        region: None,
        keep_not_ready_nodes: false,
        not_ready_guard_percent: 50,
        node_proxy_health_port: None,
        node_selector: BTreeMap::new(),
    }
}

/// A LoadBalancer Service of our class with one TCP port 80 on nodePort `node_port`.
pub fn lb_service(namespace: &str, name: &str, node_port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "resourceVersion": "1"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": super::DEFAULT_CLASS,
            "ports": [{"name": "http", "port": 80, "nodePort": node_port, "protocol": "TCP"}]
        }
    }))
    .expect("service")
}

/// `svc` marked for deletion (its finalizers keep it).
pub fn deleting(svc: &Service) -> Service {
    let mut s = svc.clone();
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    s
}
