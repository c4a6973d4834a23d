//! Authorization of the fixture: the Node authorizer and NodeRestriction admission rules for
//! `system:node:<name>` users, `system:masters` for administrators, and explicit allow rules
//! (a tiny RBAC) for everyone else. Pure over the stored objects.

use serde_json::Value;
use std::collections::BTreeMap;

use super::Key;

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// User name (`system:node:n1`, `system:serviceaccount:ns:sa`, `alice`).
    pub name: String,
    /// Groups (`system:nodes`, `system:masters`, `system:authenticated`).
    pub groups: Vec<String>,
    /// UID as TokenReview reports it ("" for none).
    pub uid: String,
    /// Extra attributes as TokenReview reports them.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// A node identity as a node client certificate would give it.
    pub fn node(node: &str) -> Self {
        User {
            name: format!("system:node:{node}"),
            groups: vec!["system:nodes".into(), "system:authenticated".into()],
            ..Default::default()
        }
    }
    /// A cluster administrator (`system:masters`).
    pub fn admin() -> Self {
        User {
            name: "admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            ..Default::default()
        }
    }
    /// An ordinary user with no groups beyond `system:authenticated`.
    pub fn plain(name: &str) -> Self {
        User {
            name: name.into(),
            groups: vec!["system:authenticated".into()],
            ..Default::default()
        }
    }
    /// The same user with a UID and one extra attribute (what a webhook token authenticator
    /// or a bound service-account token reports).
    pub fn with_identity(mut self, uid: &str, extra_key: &str, extra_value: &str) -> Self {
        self.uid = uid.into();
        self.extra
            .insert(extra_key.into(), vec![extra_value.to_string()]);
        self
    }
    /// The node name when this is a node identity.
    pub fn node_name(&self) -> Option<&str> {
        if self.groups.iter().any(|g| g == "system:nodes") {
            self.name.strip_prefix("system:node:")
        } else {
            None
        }
    }
    fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What a request asks for (the apiserver's authorizer attributes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    /// get, list, watch, create, update, patch, delete, or a non-resource verb.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Plural resource (`pods`).
    pub resource: String,
    /// Subresource (`status`, `token`, `proxy`, `log`, ...).
    pub subresource: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Object name ("" for collections), or the name pinned by a `metadata.name=` selector.
    pub name: String,
}

/// An allow rule: `*` matches anything in a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// User name the rule applies to.
    pub user: String,
    /// Verb or `*`.
    pub verb: String,
    /// Resource or `*`.
    pub resource: String,
    /// Subresource ("" for none) or `*`.
    pub subresource: String,
}

fn m(rule: &str, v: &str) -> bool {
    rule == "*" || rule == v
}

/// Whether an explicit rule allows the request.
pub fn rbac_allows(rules: &[Rule], user: &User, a: &Attrs) -> bool {
    rules.iter().any(|r| {
        r.user == user.name
            && m(&r.verb, &a.verb)
            && m(&r.resource, &a.resource)
            && m(&r.subresource, &a.subresource)
    })
}

/// Names of the objects of one kind a pod references (the Node authorizer's graph edges).
pub fn pod_references(pod: &Value, kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &pod["spec"];
    let s = |v: &Value| v.as_str().map(str::to_string);
    match kind {
        "secrets" => {
            for ips in spec["imagePullSecrets"].as_array().into_iter().flatten() {
                out.extend(s(&ips["name"]));
            }
        }
        "serviceaccounts" => {
            out.extend(s(&spec["serviceAccountName"]).or(Some("default".into())));
        }
        _ => {}
    }
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        match kind {
            "configmaps" => out.extend(s(&vol["configMap"]["name"])),
            "secrets" => out.extend(s(&vol["secret"]["secretName"])),
            "persistentvolumeclaims" => out.extend(s(&vol["persistentVolumeClaim"]["claimName"])),
            _ => {}
        }
        for src in vol["projected"]["sources"].as_array().into_iter().flatten() {
            match kind {
                "configmaps" => out.extend(s(&src["configMap"]["name"])),
                "secrets" => out.extend(s(&src["secret"]["name"])),
                _ => {}
            }
        }
    }
    let containers = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|f| spec[*f].as_array().into_iter().flatten());
    for c in containers {
        for e in c["env"].as_array().into_iter().flatten() {
            match kind {
                "configmaps" => out.extend(s(&e["valueFrom"]["configMapKeyRef"]["name"])),
                "secrets" => out.extend(s(&e["valueFrom"]["secretKeyRef"]["name"])),
                _ => {}
            }
        }
        for e in c["envFrom"].as_array().into_iter().flatten() {
            match kind {
                "configmaps" => out.extend(s(&e["configMapRef"]["name"])),
                "secrets" => out.extend(s(&e["secretRef"]["name"])),
                _ => {}
            }
        }
    }
    out
}

fn bound_pods<'a>(
    objects: &'a BTreeMap<Key, Value>,
    node: &'a str,
    ns: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    objects
        .iter()
        .filter(move |(k, v)| {
            k.group.is_empty()
                && k.resource == "pods"
                && k.namespace == ns
                && v["spec"]["nodeName"].as_str() == Some(node)
        })
        .map(|(_, v)| v)
}

/// Whether a pod bound to `node` references the object (namespace, name) of `kind`.
pub fn node_references(
    objects: &BTreeMap<Key, Value>,
    node: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> bool {
    bound_pods(objects, node, ns).any(|p| pod_references(p, kind).iter().any(|n| n == name))
}

/// Whether a pod bound to `node` names a claim whose `spec.volumeName` is `pv`.
pub fn node_references_volume(objects: &BTreeMap<Key, Value>, node: &str, pv: &str) -> bool {
    !pv.is_empty()
        && objects.iter().any(|(k, p)| {
            k.group.is_empty()
                && k.resource == "pods"
                && p["spec"]["nodeName"].as_str() == Some(node)
                && pod_references(p, "persistentvolumeclaims").iter().any(|c| {
                    objects
                        .get(&Key::new("", "persistentvolumeclaims", &k.namespace, c))
                        .is_some_and(|claim| claim["spec"]["volumeName"].as_str() == Some(pv))
                })
        })
}

fn pod_bound_to(objects: &BTreeMap<Key, Value>, node: &str, ns: &str, name: &str) -> bool {
    objects
        .get(&Key::new("", "pods", ns, name))
        .is_some_and(|p| p["spec"]["nodeName"].as_str() == Some(node))
}

/// The authorizer: `Ok(())` or the reason for a 403.
pub fn authorize(
    objects: &BTreeMap<Key, Value>,
    rules: &[Rule],
    user: &User,
    a: &Attrs,
) -> Result<(), String> {
    if user.is_admin() || rbac_allows(rules, user, a) {
        return Ok(());
    }
    let deny = || {
        Err(format!(
            "User \"{}\" cannot {} resource \"{}{}\" in API group \"{}\"{}",
            user.name,
            a.verb,
            a.resource,
            if a.subresource.is_empty() {
                String::new()
            } else {
                format!("/{}", a.subresource)
            },
            a.group,
            if a.namespace.is_empty() {
                " at the cluster scope".to_string()
            } else {
                format!(" in the namespace \"{}\"", a.namespace)
            }
        ))
    };
    let Some(node) = user.node_name() else {
        return deny();
    };
    let read = matches!(a.verb.as_str(), "get" | "list" | "watch");
    let ok = match (
        a.group.as_str(),
        a.resource.as_str(),
        a.subresource.as_str(),
    ) {
        ("", "nodes", "" | "status") => read || a.name == node,
        ("coordination.k8s.io", "leases", "") => {
            a.namespace == "kube-node-lease"
                && a.name == node
                && matches!(
                    a.verb.as_str(),
                    "get" | "create" | "update" | "patch" | "delete"
                )
        }
        ("", "pods", "") => {
            read || a.verb == "create"
                || (a.verb == "delete" && pod_bound_to(objects, node, &a.namespace, &a.name))
        }
        ("", "pods", "status") => {
            matches!(a.verb.as_str(), "update" | "patch" | "get")
                && pod_bound_to(objects, node, &a.namespace, &a.name)
        }
        ("", "pods", "eviction") => {
            a.verb == "create" && pod_bound_to(objects, node, &a.namespace, &a.name)
        }
        (
            "",
            kind @ ("configmaps" | "secrets" | "persistentvolumeclaims" | "serviceaccounts"),
            "",
        ) => {
            // get by name, or list/watch pinned to one name by metadata.name=; never all.
            read && !a.name.is_empty()
                && node_references(objects, node, kind, &a.namespace, &a.name)
        }
        // A PV only when a claim a pod bound to the node names is bound to it (get only,
        // as upstream's graph allows).
        ("", "persistentvolumes", "") => {
            a.verb == "get" && node_references_volume(objects, node, &a.name)
        }
        ("", "serviceaccounts", "token") => {
            a.verb == "create"
                && node_references(objects, node, "serviceaccounts", &a.namespace, &a.name)
        }
        ("" | "events.k8s.io", "events", "") => {
            matches!(a.verb.as_str(), "create" | "update" | "patch")
        }
        ("", "services" | "namespaces", "") => read,
        // The system:node rules give `get` on endpoints (glusterfs volumes) and nothing on
        // EndpointSlices: a node that proxies Services needs an RBAC grant for them (e.g.
        // the system:node-proxier ClusterRole bound to the node), as kube-proxy's own
        // identity has.
        ("", "endpoints", "") => a.verb == "get",
        ("authentication.k8s.io", "tokenreviews", "") => a.verb == "create",
        ("authorization.k8s.io", "subjectaccessreviews", "") => a.verb == "create",
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        deny()
    }
}

const RESTRICTED_LABEL_PREFIX: &str = "node-restriction.kubernetes.io/";

fn labels(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(|o| o.pointer("/metadata/labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// NodeRestriction admission for writes by a node: `old` is the stored object (None on create),
/// `new` the object to be stored. `Err` is a 403 reason.
pub fn admit_node_write(
    user: &User,
    a: &Attrs,
    old: Option<&Value>,
    new: &Value,
) -> Result<(), String> {
    let Some(node) = user.node_name() else {
        return Ok(());
    };
    match (a.group.as_str(), a.resource.as_str()) {
        ("", "nodes") => {
            let name = new.pointer("/metadata/name").and_then(Value::as_str);
            if name != Some(node) {
                return Err(format!(
                    "node \"{node}\" is not allowed to modify node \"{}\"",
                    name.unwrap_or("")
                ));
            }
            let (ol, nl) = (labels(old), labels(Some(new)));
            for (k, v) in &nl {
                if k.starts_with(RESTRICTED_LABEL_PREFIX) && ol.get(k) != Some(v) {
                    return Err(format!(
                        "is not allowed to modify labels: {k} (node-restriction.kubernetes.io/ is reserved)"
                    ));
                }
            }
            for k in ol.keys() {
                if k.starts_with(RESTRICTED_LABEL_PREFIX) && !nl.contains_key(k) {
                    return Err(format!("is not allowed to modify labels: {k}"));
                }
            }
            if let Some(old) = old {
                let taints = |v: &Value| v.pointer("/spec/taints").cloned().unwrap_or(Value::Null);
                let norm = |v: Value| match v {
                    Value::Array(a) if a.is_empty() => Value::Null,
                    other => other,
                };
                if norm(taints(old)) != norm(taints(new)) {
                    return Err(format!("node \"{node}\" is not allowed to modify taints"));
                }
            }
            Ok(())
        }
        ("", "pods") if a.subresource.is_empty() && a.verb == "create" => {
            let mirror = new
                .pointer("/metadata/annotations/kubernetes.io~1config.mirror")
                .is_some();
            if !mirror {
                return Err(format!(
                    "pod does not have \"kubernetes.io/config.mirror\" annotation, node \"{node}\" can only create mirror pods"
                ));
            }
            if new.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node) {
                return Err(format!(
                    "node \"{node}\" can only create pods with spec.nodeName set to itself"
                ));
            }
            for kind in ["secrets", "configmaps", "persistentvolumeclaims"] {
                if !pod_references(new, kind).is_empty() {
                    return Err(format!(
                        "node \"{node}\" can not create pods that reference {kind}"
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> BTreeMap<Key, Value> {
        let mut m = BTreeMap::new();
        m.insert(
            Key::new("", "pods", "ns", "p1"),
            json!({"metadata": {"name": "p1", "namespace": "ns"}, "spec": {"nodeName": "n1",
              "volumes": [{"name": "v", "configMap": {"name": "cm1"}},
                          {"name": "s", "projected": {"sources": [{"secret": {"name": "s2"}}]}}],
              "containers": [{"name": "c", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}]}]}}),
        );
        m.insert(
            Key::new("", "pods", "ns", "p2"),
            json!({"metadata": {"name": "p2", "namespace": "ns"}, "spec": {"nodeName": "n2",
              "volumes": [{"name": "v", "configMap": {"name": "cm2"}}], "containers": []}}),
        );
        m
    }

    fn attrs(verb: &str, group: &str, res: &str, sub: &str, ns: &str, name: &str) -> Attrs {
        Attrs {
            verb: verb.into(),
            group: group.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// Claims and volumes: a node reads a claim its pod names, and the PV bound to it.
    #[test]
    fn node_authorizer_claims_and_volumes() {
        let mut s = store();
        s.insert(
            Key::new("", "pods", "ns", "db"),
            json!({"metadata": {"name": "db", "namespace": "ns"}, "spec": {"nodeName": "n1",
              "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}], "containers": []}}),
        );
        s.insert(
            Key::new("", "persistentvolumeclaims", "ns", "data"),
            json!({"metadata": {"name": "data", "namespace": "ns"}, "spec": {"volumeName": "pv1"}}),
        );
        s.insert(
            Key::new("", "persistentvolumeclaims", "ns", "other"),
            json!({"metadata": {"name": "other", "namespace": "ns"}, "spec": {"volumeName": "pv2"}}),
        );
        for (user, a, want) in [
            (
                "n1",
                attrs("get", "", "persistentvolumeclaims", "", "ns", "data"),
                true,
            ),
            (
                "n1",
                attrs("get", "", "persistentvolumeclaims", "", "ns", "other"),
                false,
            ),
            (
                "n2",
                attrs("get", "", "persistentvolumeclaims", "", "ns", "data"),
                false,
            ),
            (
                "n1",
                attrs("get", "", "persistentvolumes", "", "", "pv1"),
                true,
            ),
            (
                "n1",
                attrs("get", "", "persistentvolumes", "", "", "pv2"),
                false,
            ),
            (
                "n1",
                attrs("list", "", "persistentvolumes", "", "", ""),
                false,
            ),
            (
                "n1",
                attrs("watch", "", "persistentvolumes", "", "", "pv1"),
                false,
            ),
            (
                "n2",
                attrs("get", "", "persistentvolumes", "", "", "pv1"),
                false,
            ),
        ] {
            assert_eq!(
                authorize(&s, &[], &User::node(user), &a).is_ok(),
                want,
                "{user} {} {} {}",
                a.verb,
                a.resource,
                a.name
            );
        }
    }

    #[test]
    fn node_authorizer_table() {
        let s = store();
        let n1 = User::node("n1");
        let cases = [
            (attrs("get", "", "nodes", "", "", "n2"), true),
            (attrs("patch", "", "nodes", "status", "", "n1"), true),
            (attrs("patch", "", "nodes", "status", "", "n2"), false),
            (
                attrs(
                    "update",
                    "coordination.k8s.io",
                    "leases",
                    "",
                    "kube-node-lease",
                    "n1",
                ),
                true,
            ),
            (
                attrs(
                    "update",
                    "coordination.k8s.io",
                    "leases",
                    "",
                    "kube-node-lease",
                    "n2",
                ),
                false,
            ),
            (
                attrs(
                    "list",
                    "coordination.k8s.io",
                    "leases",
                    "",
                    "kube-node-lease",
                    "",
                ),
                false,
            ),
            (attrs("patch", "", "pods", "status", "ns", "p1"), true),
            (attrs("patch", "", "pods", "status", "ns", "p2"), false),
            (attrs("patch", "", "pods", "", "ns", "p1"), false),
            (attrs("delete", "", "pods", "", "ns", "p1"), true),
            (attrs("delete", "", "pods", "", "ns", "p2"), false),
            (attrs("get", "", "configmaps", "", "ns", "cm1"), true),
            (attrs("get", "", "configmaps", "", "ns", "cm2"), false),
            (attrs("watch", "", "configmaps", "", "ns", "cm1"), true),
            (attrs("list", "", "configmaps", "", "ns", ""), false),
            (attrs("get", "", "secrets", "", "ns", "s1"), true),
            (attrs("get", "", "secrets", "", "ns", "s2"), true),
            (attrs("get", "", "secrets", "", "other", "s1"), false),
            (attrs("list", "", "secrets", "", "", ""), false),
            (
                attrs("create", "", "serviceaccounts", "token", "ns", "default"),
                true,
            ),
            (
                attrs("create", "", "serviceaccounts", "token", "ns", "admin"),
                false,
            ),
            (attrs("create", "", "events", "", "ns", ""), true),
            (
                attrs("list", "discovery.k8s.io", "endpointslices", "", "", ""),
                false,
            ),
            (attrs("list", "", "services", "", "", ""), true),
            (attrs("get", "", "endpoints", "", "ns", "e"), true),
            (attrs("list", "", "endpoints", "", "", ""), false),
            (attrs("create", "", "namespaces", "", "", "x"), false),
            (
                attrs(
                    "create",
                    "authorization.k8s.io",
                    "subjectaccessreviews",
                    "",
                    "",
                    "",
                ),
                true,
            ),
        ];
        for (a, want) in cases {
            assert_eq!(authorize(&s, &[], &n1, &a).is_ok(), want, "{a:?}");
        }
        assert!(authorize(
            &s,
            &[],
            &User::plain("bob"),
            &attrs("get", "", "pods", "", "ns", "p1")
        )
        .is_err());
        let rules = [Rule {
            user: "bob".into(),
            verb: "get".into(),
            resource: "nodes".into(),
            subresource: "log".into(),
        }];
        assert!(authorize(
            &s,
            &rules,
            &User::plain("bob"),
            &attrs("get", "", "nodes", "log", "", "n1")
        )
        .is_ok());
        assert!(authorize(
            &s,
            &rules,
            &User::plain("bob"),
            &attrs("get", "", "nodes", "proxy", "", "n1")
        )
        .is_err());
    }

    #[test]
    fn node_restriction() {
        let n1 = User::node("n1");
        let a = attrs("update", "", "nodes", "", "", "n1");
        let old = json!({"metadata": {"name": "n1", "labels": {"a": "b"}}, "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}});
        let mut new = old.clone();
        new["metadata"]["labels"]["c"] = json!("d");
        assert!(admit_node_write(&n1, &a, Some(&old), &new).is_ok());
        new["spec"]["taints"] = json!([]);
        assert!(admit_node_write(&n1, &a, Some(&old), &new).is_err());
        let mut new = old.clone();
        new["metadata"]["labels"]["node-restriction.kubernetes.io/x"] = json!("y");
        assert!(admit_node_write(&n1, &a, Some(&old), &new).is_err());
        let other = json!({"metadata": {"name": "n2"}});
        assert!(admit_node_write(
            &n1,
            &attrs("create", "", "nodes", "", "", "n2"),
            None,
            &other
        )
        .is_err());
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": []}});
        let ca = attrs("create", "", "pods", "", "ns", "p");
        assert!(admit_node_write(&n1, &ca, None, &pod).is_err());
        let mirror = json!({"metadata": {"name": "p", "annotations": {"kubernetes.io/config.mirror": "h"}}, "spec": {"nodeName": "n1", "containers": []}});
        assert!(admit_node_write(&n1, &ca, None, &mirror).is_ok());
    }
}
