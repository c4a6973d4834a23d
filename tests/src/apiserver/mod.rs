//! A kube-apiserver test fixture: an HTTP server on 127.0.0.1 speaking the Kubernetes wire
//! protocol for what a node agent uses (JSON objects with resourceVersion; get, list, watch with
//! bookmarks and 410 Gone; create, update with optimistic concurrency, merge / strategic-merge /
//! JSON / apply patches; the status subresource; graceful pod deletion with preconditions;
//! TokenRequest, TokenReview and SubjectAccessReview), enforcing the Node authorizer and
//! NodeRestriction rules for `system:node:<name>` callers.
//!
//! Callers are identified by bearer tokens the fixture maps to users (instead of client
//! certificates). The fixture serves plain HTTP. It can be stopped and restarted on the same
//! port with its state. It is a test fixture: the product never uses it.
//!
//! Effectful: owns a tokio runtime and a listening socket.

pub mod authz;
pub mod ephemeral;
mod http;
pub mod patch;
pub mod select;

pub use authz::{Attrs, Rule, User};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// Storage key of an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// API group ("" for core).
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// Builds a key.
    pub fn new(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Key {
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// A resource the fixture serves.
#[derive(Debug, Clone, Copy)]
pub struct ResourceInfo {
    /// API group.
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural name.
    pub resource: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a `status` subresource (writes to the main resource keep the stored status and
    /// status writes change only the status).
    pub status: bool,
}

impl ResourceInfo {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn ri(
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> ResourceInfo {
    ResourceInfo {
        group,
        version,
        resource,
        kind,
        namespaced,
        status,
    }
}

/// Every stored resource.
pub const RESOURCES: &[ResourceInfo] = &[
    ri("", "v1", "nodes", "Node", false, true),
    ri("", "v1", "pods", "Pod", true, true),
    ri("", "v1", "configmaps", "ConfigMap", true, false),
    ri("", "v1", "secrets", "Secret", true, false),
    ri("", "v1", "events", "Event", true, false),
    ri("", "v1", "services", "Service", true, true),
    ri("", "v1", "endpoints", "Endpoints", true, false),
    ri("", "v1", "serviceaccounts", "ServiceAccount", true, false),
    ri("", "v1", "namespaces", "Namespace", false, true),
    ri(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        true,
    ),
    ri(
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        false,
        true,
    ),
    ri("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    ri(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        false,
    ),
    ri("events.k8s.io", "v1", "events", "Event", true, false),
];

/// Looks a resource up by group and plural.
pub fn resource_info(group: &str, resource: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.resource == resource)
}

/// Looks a resource up by apiVersion and kind.
pub fn resource_for_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in the store.
#[derive(Debug, Clone)]
pub struct StoreEvent {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Which object.
    pub key: Key,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (the last state for a deletion).
    pub object: Value,
    /// The object before the change (for selector transitions).
    pub old: Option<Value>,
}

/// One request as the fixture saw it (for assertions on what a client did).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When it arrived.
    pub at: Instant,
    /// Authenticated user ("" when unauthenticated).
    pub user: String,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Authorizer attributes.
    pub attrs: Attrs,
    /// HTTP status of the answer.
    pub status: u16,
    /// Request content type (for patches).
    pub content_type: String,
    /// Request body (first 4 KiB, lossy UTF-8).
    pub body: String,
}

/// An API error answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP code.
    pub code: u16,
    /// Status reason (`NotFound`, `Conflict`, ...).
    pub reason: &'static str,
    /// Human message.
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", m)
    }
    fn not_found(info: &ResourceInfo, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(info)),
        )
    }
    fn conflict(info: &ResourceInfo, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                qualified(info)
            ),
        )
    }
    /// The `Status` JSON body.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}
impl std::error::Error for ApiError {}

fn qualified(info: &ResourceInfo) -> String {
    if info.group.is_empty() {
        info.resource.to_string()
    } else {
        format!("{}.{}", info.resource, info.group)
    }
}

/// A token issued by TokenRequest.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The service account user.
    pub user: User,
    /// Expiry.
    pub expires: k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Bound pod (namespace, name, uid).
    pub pod: Option<(String, String, String)>,
}

/// The fixture's cluster CA certificate (PEM): a fixed self-signed test CA, published as
/// `ca.crt` of the `kube-root-ca.crt` ConfigMap (the fixture itself serves plain HTTP).
pub const CLUSTER_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBoDCCAUWgAwIBAgIUJmT+3v1xGlUDDPKSopmEusxTpJowCgYIKoZIzj0EAwIw\nJDEiMCAGA1UEAwwZaGFrby1hcGlzZXJ2ZXItZml4dHVyZS1jYTAgFw0yNjExMjgx\nNzU1NDVaGA8yMTI2MTEwNDE3NTU0NVowJDEiMCAGA1UEAwwZaGFrby1hcGlzZXJ2\nZXItZml4dHVyZS1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABC0BghC0zmHU\n7uSkAEs+QEP96BiJe6mxRjGMEgSxYbyw4GZ3WY/p4F4Xr8MQWsgfAZSQnRQ9E5bW\nLWZNA8WJDzyjUzBRMB0GA1UdDgQWBBTNXGSpUOuk4zRF9hbB2bn9g2F8eTAfBgNV\nHSMEGDAWgBTNXGSpUOuk4zRF9hbB2bn9g2F8eTAPBgNVHRMBAf8EBTADAQH/MAoG\nCCqGSM49BAMCA0kAMEYCIQCV3M13Q/QCTdjteZatXPM2WzElO0itH0WV0LTDZl5l\nFgIhAPevExvNNZyTUg9SP2XagcRmSZ1jmZvViFLHPhxoJdQw\n-----END CERTIFICATE-----\n";

/// Name of the ConfigMap the root-CA publisher keeps in every namespace.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

/// Where the ServiceAccount admission mounts the token volume.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

pub(crate) struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Arc<StoreEvent>>,
    compacted_rv: u64,
    max_events: usize,
    tokens: HashMap<String, User>,
    issued: HashMap<String, IssuedToken>,
    rules: Vec<Rule>,
    requests: Vec<RequestRecord>,
    /// TokenReviews served.
    pub(crate) token_reviews: u64,
    /// The specs of the SubjectAccessReviews received, in order.
    pub(crate) access_reviews: Vec<Value>,
    bookmark_interval: Duration,
    /// Requests answered with 500 before they are served (error injection).
    fail_next: usize,
    /// The ServiceAccount admission plugin mutates new pods (token volume + mounts).
    pub(crate) sa_admission: bool,
    /// Longest token lifetime TokenRequest grants (`--service-account-max-token-expiration`).
    pub(crate) max_token_expiration: Option<i64>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<StoreEvent>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn rand_suffix() -> String {
    const A: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(A[rand::random::<usize>() % A.len()]))
        .collect()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// Semantic equality ignoring resourceVersion and managedFields.
fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    strip(a) == strip(b)
}

/// The ServiceAccount admission plugin's mutation of a new pod: unless the pod opts out
/// (`automountServiceAccountToken: false`), is a mirror pod, or already mounts something at
/// the service account path, a projected `kube-api-access-<suffix>` volume (a bound token of
/// 3607 s, `ca.crt` from `kube-root-ca.crt`, the namespace) mounted read-only into every
/// container. True when the volume was added.
fn service_account_admission(pod: &mut Value) -> bool {
    if pod["metadata"]["annotations"]
        .get("kubernetes.io/config.mirror")
        .is_some()
        || pod["spec"]["automountServiceAccountToken"] == json!(false)
        || !pod["spec"].is_object()
    {
        return false;
    }
    let name = format!("kube-api-access-{}", rand_suffix());
    let vol = json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}});
    let mut mounted = false;
    for f in ["initContainers", "containers"] {
        for c in pod["spec"][f].as_array_mut().into_iter().flatten() {
            let has = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPath"] == SERVICE_ACCOUNT_MOUNT);
            if has {
                continue;
            }
            if !c["volumeMounts"].is_array() {
                c["volumeMounts"] = json!([]);
            }
            if let Some(a) = c["volumeMounts"].as_array_mut() {
                a.push(json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT}));
                mounted = true;
            }
        }
    }
    if !mounted {
        return false;
    }
    if !pod["spec"]["volumes"].is_array() {
        pod["spec"]["volumes"] = json!([]);
    }
    if let Some(a) = pod["spec"]["volumes"].as_array_mut() {
        a.push(vol);
    }
    true
}

fn default_pod(obj: &mut Value) {
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        return;
    }
    let defaults = [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("serviceAccountName", json!("default")),
        ("enableServiceLinks", json!(true)),
        ("priority", json!(0)),
    ];
    for (k, v) in defaults {
        if spec.get(k).is_none_or(Value::is_null) {
            spec[k] = v;
        }
    }
    if spec.get("serviceAccount").is_none() {
        spec["serviceAccount"] = spec["serviceAccountName"].clone();
    }
    for f in ["containers", "initContainers"] {
        for c in spec[f].as_array_mut().into_iter().flatten() {
            if c.get("imagePullPolicy").is_none() {
                let img = c["image"].as_str().unwrap_or("");
                let last = img.rsplit('/').next().unwrap_or("");
                let pol = if !last.contains(':') || img.ends_with(":latest") {
                    "Always"
                } else {
                    "IfNotPresent"
                };
                c["imagePullPolicy"] = json!(pol);
            }
            if c.get("terminationMessagePath").is_none() {
                c["terminationMessagePath"] = json!("/dev/termination-log");
            }
            if c.get("terminationMessagePolicy").is_none() {
                c["terminationMessagePolicy"] = json!("File");
            }
        }
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(
        &mut self,
        tx: &broadcast::Sender<Arc<StoreEvent>>,
        key: Key,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) {
        let ev = Arc::new(StoreEvent {
            rv: self.rv,
            key,
            kind,
            object,
            old,
        });
        self.log.push_back(ev.clone());
        while self.log.len() > self.max_events {
            if let Some(e) = self.log.pop_front() {
                self.compacted_rv = e.rv;
            }
        }
        // No receivers is fine.
        let _ = tx.send(ev);
    }

    pub(crate) fn create(
        &mut self,
        tx: &broadcast::Sender<Arc<StoreEvent>>,
        info: &ResourceInfo,
        ns: &str,
        mut obj: Value,
        user: &User,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_type(info, &obj)?;
        obj["apiVersion"] = json!(info.api_version());
        obj["kind"] = json!(info.kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if info.namespaced {
            let body_ns = meta_str(&obj, "namespace");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let gen = meta_str(&obj, "generateName");
            if gen.is_empty() {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        info.kind
                    ),
                ));
            }
            name = format!("{gen}{}", rand_suffix());
            obj["metadata"]["name"] = json!(name);
        }
        let key = Key::new(
            info.group,
            info.resource,
            if info.namespaced { ns } else { "" },
            &name,
        );
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", qualified(info)),
            ));
        }
        let sa_admitted = info.resource == "pods"
            && info.group.is_empty()
            && self.sa_admission
            && service_account_admission(&mut obj);
        if info.resource == "pods" && info.group.is_empty() {
            ephemeral::validate_create(&obj).map_err(|m| ApiError::new(422, "Invalid", m))?;
            default_pod(&mut obj);
            obj["status"] = json!({"phase": "Pending"});
            obj["metadata"]["generation"] = json!(1);
        }
        let attrs = Attrs {
            verb: "create".into(),
            group: info.group.into(),
            resource: info.resource.into(),
            namespace: ns.into(),
            name: name.clone(),
            ..Default::default()
        };
        authz::admit_node_write(user, &attrs, None, &obj)
            .map_err(|m| ApiError::new(403, "Forbidden", m))?;
        let rv = self.bump();
        let m = &mut obj["metadata"];
        m["uid"] = json!(new_uid());
        m["creationTimestamp"] = json!(now_rfc3339());
        m["resourceVersion"] = json!(rv.to_string());
        if let Some(mm) = m.as_object_mut() {
            mm.remove("deletionTimestamp");
        }
        self.objects.insert(key.clone(), obj.clone());
        self.record(tx, key, EventType::Added, obj.clone(), None);
        if sa_admitted {
            self.publish_root_ca(tx, ns);
        }
        Ok(obj)
    }

    /// The root-CA publisher: `kube-root-ca.crt` with `ca.crt` in namespace `ns` (created
    /// when missing).
    pub(crate) fn publish_root_ca(&mut self, tx: &broadcast::Sender<Arc<StoreEvent>>, ns: &str) {
        let Some(info) = resource_info("", "configmaps") else {
            return;
        };
        if self
            .objects
            .contains_key(&Key::new("", "configmaps", ns, ROOT_CA_CONFIGMAP))
        {
            return;
        }
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": ns,
                         "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
            "data": {"ca.crt": CLUSTER_CA_PEM}});
        let _ = self.create(tx, info, ns, cm, &User::admin());
    }

    pub(crate) fn get(&self, info: &ResourceInfo, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Key::new(info.group, info.resource, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(info, name))
    }

    /// Stores `new` as the next version of an existing object (update or patch result).
    /// `precondition_rv` is the resourceVersion the client based its change on, if any.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn replace(
        &mut self,
        tx: &broadcast::Sender<Arc<StoreEvent>>,
        info: &ResourceInfo,
        ns: &str,
        name: &str,
        subresource: &str,
        mut new: Value,
        precondition_rv: Option<String>,
        user: &User,
        verb: &str,
    ) -> Result<Value, ApiError> {
        let key = Key::new(info.group, info.resource, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(info, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_type(info, &new)?;
        if let Some(rv) = precondition_rv.filter(|r| !r.is_empty()) {
            if rv != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(info, name));
            }
        }
        let body_name = meta_str(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let pod = info.resource == "pods" && info.group.is_empty();
        if subresource == "status" {
            let status = new.get("status").cloned().unwrap_or(Value::Null);
            new = old.clone();
            new["status"] = status;
        } else if pod && subresource == "ephemeralcontainers" {
            // Only spec.ephemeralContainers changes (dropNonEphemeralContainerUpdates).
            let ecs = new["spec"]["ephemeralContainers"].clone();
            new = old.clone();
            match ecs {
                Value::Null => {
                    if let Some(s) = new["spec"].as_object_mut() {
                        s.remove("ephemeralContainers");
                    }
                }
                v => new["spec"]["ephemeralContainers"] = v,
            }
            ephemeral::validate_update(&old, &new).map_err(|m| ApiError::new(422, "Invalid", m))?;
        } else if !subresource.is_empty() {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({subresource})"),
            ));
        } else if info.status {
            new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
            if pod {
                ephemeral::validate_pod_update(&old, &new)
                    .map_err(|m| ApiError::new(422, "Invalid", m))?;
            }
        }
        if let Some(m) = new["metadata"].as_object_mut() {
            for f in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old["metadata"].get(f) {
                    Some(v) => {
                        m.insert(f.to_string(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
        } else {
            new["metadata"] = old["metadata"].clone();
        }
        new["apiVersion"] = json!(info.api_version());
        new["kind"] = json!(info.kind);
        if new.get("status").is_some_and(Value::is_null) {
            if let Some(m) = new.as_object_mut() {
                m.remove("status");
            }
        }
        let attrs = Attrs {
            verb: verb.into(),
            group: info.group.into(),
            resource: info.resource.into(),
            subresource: subresource.into(),
            namespace: ns.into(),
            name: name.into(),
        };
        authz::admit_node_write(user, &attrs, Some(&old), &new)
            .map_err(|m| ApiError::new(403, "Forbidden", m))?;
        if info.resource == "nodes" && info.group.is_empty() && subresource == "status" {
            taint_nodes_by_condition(&mut new);
        }
        if same_object(&old, &new) {
            return Ok(old);
        }
        if pod {
            match old["metadata"].get("generation").cloned() {
                Some(g) => new["metadata"]["generation"] = g,
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove("generation");
                    }
                }
            }
        }
        if pod && old.get("spec") != new.get("spec") {
            // metadata.generation counts spec changes (1 on create).
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        let rv = self.bump();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let finalizers_done = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        let graceful_pod = info.resource == "pods"
            && new["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                > 0;
        if new["metadata"].get("deletionTimestamp").is_some() && finalizers_done && !graceful_pod {
            self.objects.remove(&key);
            self.record(tx, key, EventType::Deleted, new.clone(), Some(old));
            return Ok(new);
        }
        self.objects.insert(key.clone(), new.clone());
        self.record(tx, key, EventType::Modified, new.clone(), Some(old));
        Ok(new)
    }

    pub(crate) fn delete(
        &mut self,
        tx: &broadcast::Sender<Arc<StoreEvent>>,
        info: &ResourceInfo,
        ns: &str,
        name: &str,
        opts: &Value,
    ) -> Result<Value, ApiError> {
        let key = Key::new(info.group, info.resource, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(info, name))?;
        if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str) {
            let have = meta_str(&old, "uid");
            if uid != have {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {have}",
                        qualified(info)
                    ),
                ));
            }
        }
        if let Some(rv) = opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
        {
            let have = meta_str(&old, "resourceVersion");
            if rv != have {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}",
                        qualified(info)
                    ),
                ));
            }
        }
        let mut grace = opts.get("gracePeriodSeconds").and_then(Value::as_i64);
        if info.resource == "pods" && info.group.is_empty() {
            let bound = old["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let phase = old["status"]["phase"].as_str().unwrap_or("");
            let g = grace.unwrap_or_else(|| {
                old["spec"]["terminationGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(30)
            });
            grace = Some(if !bound || phase == "Failed" || phase == "Succeeded" {
                0
            } else {
                g.max(0)
            });
            if let Some(cur) = old["metadata"]["deletionGracePeriodSeconds"].as_i64() {
                // A graceful deletion in progress can only be shortened.
                grace = grace.map(|g| g.min(cur));
            }
        } else {
            grace = Some(0);
        }
        let finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let g = grace.unwrap_or(0);
        if g > 0 || finalizers {
            let already = old["metadata"].get("deletionTimestamp").is_some()
                && old["metadata"]["deletionGracePeriodSeconds"].as_i64() == Some(g);
            if already {
                return Ok(old);
            }
            let mut new = old.clone();
            let at = k8s_openapi::chrono::Utc::now() + k8s_openapi::chrono::Duration::seconds(g);
            if new["metadata"].get("deletionTimestamp").is_none() || g > 0 {
                new["metadata"]["deletionTimestamp"] =
                    json!(at.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true));
            }
            new["metadata"]["deletionGracePeriodSeconds"] = json!(g);
            let rv = self.bump();
            new["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.objects.insert(key.clone(), new.clone());
            self.record(tx, key, EventType::Modified, new.clone(), Some(old));
            return Ok(new);
        }
        let rv = self.bump();
        let mut gone = old.clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.remove(&key);
        self.record(tx, key, EventType::Deleted, gone.clone(), Some(old));
        Ok(gone)
    }
}

fn check_type(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    let kind = obj["kind"].as_str().unwrap_or("");
    let av = obj["apiVersion"].as_str().unwrap_or("");
    if (!kind.is_empty() && kind != info.kind) || (!av.is_empty() && av != info.api_version()) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({}) or kind ({kind}) does not match {}",
            info.api_version(),
            info.kind
        )));
    }
    Ok(())
}

/// The fixture server.
pub struct ApiServer {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    shutdown: Option<watch::Sender<bool>>,
    serve: Option<std::sync::mpsc::Receiver<()>>,
    admin: String,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1 with a free port. An administrator token is registered
    /// ([`ApiServer::admin_token`]).
    pub fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on the given address.
    pub fn start_on(addr: SocketAddr) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("apiserver-fixture")
            .enable_all()
            .build()
            .context("fixture runtime")?;
        let (tx, _) = broadcast::channel(8192);
        let admin = format!("admin-{}", rand_suffix());
        let mut tokens = HashMap::new();
        tokens.insert(admin.clone(), User::admin());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                compacted_rv: 0,
                max_events: 100_000,
                tokens,
                issued: HashMap::new(),
                rules: Vec::new(),
                requests: Vec::new(),
                token_reviews: 0,
                access_reviews: Vec::new(),
                bookmark_interval: Duration::from_secs(60),
                fail_next: 0,
                sa_admission: false,
                max_token_expiration: None,
            }),
            tx,
        });
        let mut s = ApiServer {
            shared,
            rt: Some(rt),
            addr,
            shutdown: None,
            serve: None,
            admin,
        };
        s.listen()?;
        Ok(s)
    }

    fn listen(&mut self) -> Result<()> {
        let rt = self.rt.as_ref().context("fixture runtime gone")?;
        // std sets SO_REUSEADDR on Unix, so the same port can be bound again after a stop.
        let std_listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("binding {}", self.addr))?;
        std_listener.set_nonblocking(true)?;
        self.addr = std_listener.local_addr()?;
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let (stx, srx) = watch::channel(false);
        let (dtx, drx) = std::sync::mpsc::channel();
        rt.spawn(http::serve(listener, self.shared.clone(), srx, dtx));
        self.shutdown = Some(stx);
        self.serve = Some(drx);
        Ok(())
    }

    /// Stops serving: closes the listener and every open connection (watches end abruptly).
    /// The state is kept.
    pub fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(true);
        }
        if let Some(done) = self.serve.take() {
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Serves again on the same port with the same state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.listen()
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The administrator's bearer token (`system:masters`).
    pub fn admin_token(&self) -> String {
        self.admin.clone()
    }

    /// Registers a bearer token for a user.
    pub fn add_token(&self, token: &str, user: User) {
        self.shared.lock().tokens.insert(token.into(), user);
    }

    /// How many TokenReviews were served.
    pub fn token_reviews(&self) -> u64 {
        self.shared.lock().token_reviews
    }

    /// The specs of the SubjectAccessReviews received (valid or not), in order.
    pub fn access_reviews(&self) -> Vec<Value> {
        self.shared.lock().access_reviews.clone()
    }

    /// Registers and returns a token for `system:node:<node>` (group `system:nodes`).
    pub fn node_token(&self, node: &str) -> String {
        let t = format!("node-{node}-{}", rand_suffix());
        self.add_token(&t, User::node(node));
        t
    }

    /// Adds an allow rule (verbs/resources/subresources, `*` wildcards).
    pub fn grant(&self, user: &str, verb: &str, resource: &str, subresource: &str) {
        self.shared.lock().rules.push(Rule {
            user: user.into(),
            verb: verb.into(),
            resource: resource.into(),
            subresource: subresource.into(),
        });
    }

    /// A kubeconfig (YAML) for this server authenticating with `token`.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\ncontexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: fixture\ncurrent-context: fixture\nusers:\n- name: fixture\n  user:\n    token: {token}\n",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path, token: &str) -> Result<()> {
        std::fs::write(path, self.kubeconfig(token))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Creates an object as the administrator (kind and apiVersion pick the resource).
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let info = resource_for_kind(
            obj["apiVersion"].as_str().unwrap_or(""),
            obj["kind"].as_str().unwrap_or(""),
        )
        .ok_or_else(|| ApiError::bad_request("unknown apiVersion/kind"))?;
        let ns = if info.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let mut st = self.shared.lock();
        st.create(&self.shared.tx, info, &ns, obj, &User::admin())
    }

    /// Gets an object (`group` "" for core).
    pub fn get(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&Key::new(group, resource, ns, name))
            .cloned()
    }

    /// Every stored object of a resource.
    pub fn list(&self, group: &str, resource: &str) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.group == group && k.resource == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Applies a JSON merge patch as the administrator (`subresource` "" or "status").
    pub fn merge_patch(
        &self,
        group: &str,
        resource: &str,
        ns: &str,
        name: &str,
        subresource: &str,
        p: &Value,
    ) -> Result<Value, ApiError> {
        let info = resource_info(group, resource)
            .ok_or_else(|| ApiError::bad_request("unknown resource"))?;
        let mut st = self.shared.lock();
        let mut obj = st.get(info, ns, name)?;
        patch::merge_patch(&mut obj, p);
        st.replace(
            &self.shared.tx,
            info,
            ns,
            name,
            subresource,
            obj,
            None,
            &User::admin(),
            "patch",
        )
    }

    /// Deletes as the administrator with DeleteOptions `opts` (`{}` for defaults).
    pub fn delete(
        &self,
        group: &str,
        resource: &str,
        ns: &str,
        name: &str,
        opts: &Value,
    ) -> Result<Value, ApiError> {
        let info = resource_info(group, resource)
            .ok_or_else(|| ApiError::bad_request("unknown resource"))?;
        self.shared
            .lock()
            .delete(&self.shared.tx, info, ns, name, opts)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Tokens issued through TokenRequest so far.
    pub fn issued_tokens(&self) -> Vec<(String, IssuedToken)> {
        self.shared
            .lock()
            .issued
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Forgets the event history: watches from any older resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.log.clear();
        st.compacted_rv = st.rv;
    }

    /// Keeps at most `n` events of history (older watch positions get 410 Gone).
    pub fn set_history(&self, n: usize) {
        self.shared.lock().max_events = n.max(1);
    }

    /// How often watches with `allowWatchBookmarks` get a BOOKMARK (default 60 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.lock().bookmark_interval = d;
    }

    /// Turns the ServiceAccount admission plugin on (off by default): new pods get the
    /// `kube-api-access-*` projected volume and mounts a real apiserver adds, and their
    /// namespace gets the `kube-root-ca.crt` ConfigMap ([`CLUSTER_CA_PEM`]).
    pub fn enable_service_account_admission(&self) {
        self.shared.lock().sa_admission = true;
    }

    /// Caps the lifetime of issued tokens like `--service-account-max-token-expiration`
    /// (any value, so that tests can see refreshes): longer requests are shortened and the
    /// answer's `spec.expirationSeconds` says so.
    pub fn set_max_token_expiration(&self, seconds: i64) {
        self.shared.lock().max_token_expiration = Some(seconds.max(1));
    }

    /// Answers the next `n` API requests with 500 InternalError.
    pub fn fail_next(&self, n: usize) {
        self.shared.lock().fail_next = n;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(true);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The node lifecycle controller's TaintNodesByCondition, applied on each Node status write
/// (the controller-manager is not part of this fixture): a pressure condition that is True
/// adds `node.kubernetes.io/{memory,disk,pid}-pressure:NoSchedule`, any other status removes it.
fn taint_nodes_by_condition(node: &mut Value) {
    const RULES: [(&str, &str); 3] = [
        ("MemoryPressure", "node.kubernetes.io/memory-pressure"),
        ("DiskPressure", "node.kubernetes.io/disk-pressure"),
        ("PIDPressure", "node.kubernetes.io/pid-pressure"),
    ];
    let conds = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is_true = |t: &str| {
        conds
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    let mut taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let before = taints.len();
    let mut changed = false;
    for (cond, key) in RULES {
        let has = taints
            .iter()
            .any(|t| t["key"] == key && t["effect"] == "NoSchedule");
        if is_true(cond) && !has {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            taints.push(json!({"key": key, "effect": "NoSchedule", "timeAdded": now}));
            changed = true;
        } else if !is_true(cond) && has {
            taints.retain(|t| !(t["key"] == key && t["effect"] == "NoSchedule"));
            changed = true;
        }
    }
    if !changed {
        return;
    }
    if !node["spec"].is_object() {
        node["spec"] = json!({});
    }
    if taints.is_empty() && before > 0 {
        if let Some(s) = node["spec"].as_object_mut() {
            s.remove("taints");
        }
    } else {
        node["spec"]["taints"] = Value::Array(taints);
    }
}
