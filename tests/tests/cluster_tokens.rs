//! Root test of ServiceAccount tokens in cluster mode: the apiserver fixture's ServiceAccount
//! admission adds the `kube-api-access-*` projected volume to a pod bound to the node; the
//! agent requests the token through the TokenRequest API bound to the pod, and the running
//! container sees `token`, `ca.crt` (from `kube-root-ca.crt`) and `namespace` under
//! /var/run/secrets/kubernetes.io/serviceaccount. The fixture grants short lifetimes
//! (`set_max_token_expiration`), so the refresh at 80 % of the lifetime happens within the
//! test and the running container sees the new token.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::{ApiServer, CLUSTER_CA_PEM, SERVICE_ACCOUNT_MOUNT};
use hako_tests::cluster::{container_pid, wait_for};
use serde_json::{json, Value};

type Expiry = k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>;

/// Tokens the fixture issued for the pod with this UID with their expiry, oldest first.
fn issued_for(srv: &ApiServer, uid: &str) -> Vec<(String, Expiry)> {
    let mut v: Vec<_> = srv
        .issued_tokens()
        .into_iter()
        .filter(|(_, t)| t.pod.as_ref().is_some_and(|p| p.2 == uid))
        .map(|(tok, t)| (tok, t.expires))
        .collect();
    v.sort_by_key(|(_, e)| *e);
    v
}

#[test]
fn service_account_token_projected_and_refreshed() {
    const TTL: i64 = 15;
    let mut env = AgentEnv::new("cltok");
    let (srv, kc) = hako_tests::cluster::start_fixture(&env);
    srv.enable_service_account_admission();
    srv.set_max_token_expiration(TTL);
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-port",
            "0",
            "--node-status-update-frequency",
            "1",
        ]
        .map(String::from),
    );
    env.start();
    let created = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-client", "namespace": "default"},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": env.image("sleep"),
                    "command": ["sleep", "3600"]}]}}))
        .expect("pod");
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let vol = created["spec"]["volumes"][0]["name"]
        .as_str()
        .expect("admission added the token volume")
        .to_string();
    assert!(vol.starts_with("kube-api-access-"), "{vol}");
    let running = wait_for("Running", 60, &env, || {
        srv.get("", "pods", "default", "api-client")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    let pid = container_pid(&env, &running);
    let dir = format!("/proc/{pid}/root{SERVICE_ACCOUNT_MOUNT}");
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}"));
    let first = read("token").expect("token file");
    let issued = issued_for(&srv, &uid);
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].0, first, "the token the fixture issued");
    let first_expires = issued[0].1;
    assert_eq!(read("ca.crt").expect("ca.crt"), CLUSTER_CA_PEM);
    assert_eq!(read("namespace").expect("namespace"), "default");
    assert!(running["status"]["podIP"].is_string());

    // The request: bound to the pod, the projection's lifetime, the default audience.
    let req = srv
        .requests()
        .into_iter()
        .find(|r| r.user == "system:node:node1" && r.attrs.subresource == "token")
        .expect("the agent's TokenRequest");
    assert_eq!(
        req.path,
        "/api/v1/namespaces/default/serviceaccounts/default/token"
    );
    assert_eq!(req.status, 201);
    let body: Value = serde_json::from_str(&req.body).expect("body");
    assert_eq!(body["spec"]["boundObjectRef"]["kind"], "Pod");
    assert_eq!(body["spec"]["boundObjectRef"]["name"], "api-client");
    assert_eq!(
        body["spec"]["boundObjectRef"]["uid"],
        Value::from(uid.clone())
    );
    assert_eq!(body["spec"]["expirationSeconds"], 3607);
    assert!(
        body["spec"]["audiences"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{body}"
    );

    // Refresh before expiry: a new token is issued and reaches the running container.
    let second = wait_for("token refresh in the volume", 2 * TTL as u64, &env, || {
        let t = read("token").ok()?;
        (t != first).then_some(t)
    });
    let seen = k8s_openapi::chrono::Utc::now();
    let issued = issued_for(&srv, &uid);
    assert!(issued.len() >= 2, "{issued:?}");
    assert!(issued.iter().any(|(t, _)| *t == second), "{issued:?}");
    // The old token was still valid when the container got the new one.
    let left = (first_expires - seen).num_milliseconds();
    assert!(
        left > 0,
        "refreshed {}ms after the first token expired",
        -left
    );
    // ... and not much earlier than the kubelet's rule says (80 % of the lifetime minus a
    // jitter of at most 10 % of it).
    assert!(
        left < TTL * 1000 / 2,
        "refreshed {left}ms before expiry: too early for a {TTL}s lifetime"
    );
    eprintln!(
        "token lifetime {TTL}s: the running container saw the refreshed token {:.1}s before the first one expired",
        left as f64 / 1000.0
    );
    let forbidden: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:node1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");

    srv.delete("", "pods", "default", "api-client", &json!({}))
        .expect("delete");
    wait_for("pod removed", 30, &env, || {
        srv.get("", "pods", "default", "api-client")
            .is_none()
            .then_some(())
    });
    env.stop();
}
