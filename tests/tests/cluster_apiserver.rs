//! The apiserver fixture itself, driven by kube-rs through a generated kubeconfig: it must
//! speak the wire protocol correctly to be a fair judge of the agent. No root needed.

use futures::{StreamExt, TryStreamExt};
use hako_tests::apiserver::ApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;
use std::time::Duration;

async fn client(srv: &ApiServer, token: &str) -> Client {
    let kc: kube::config::Kubeconfig =
        serde_yaml::from_str(&srv.kubeconfig(token)).expect("kubeconfig parses");
    let cfg = Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1.36"}],
                    "volumes": [{"name": "cfg", "configMap": {"name": "cm-a"}}]}})
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(r) => r.code,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn crud_conflicts_and_status_subresource() {
    let srv = ApiServer::start().expect("fixture");
    let admin = client(&srv, &srv.admin_token()).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let created: Pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("a", "n1")).expect("pod"),
        )
        .await
        .expect("create");
    assert!(created.metadata.uid.is_some());
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    assert_eq!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref()),
        Some("Always"),
        "API defaults applied"
    );
    let again = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("a", "n1")).expect("pod"),
        )
        .await;
    assert_eq!(code(again.expect_err("duplicate")), 409);

    // Optimistic concurrency: a stale resourceVersion is a 409 Conflict.
    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.metadata.labels = Some([("x".to_string(), "1".to_string())].into());
    pods.replace("a", &PostParams::default(), &fresh)
        .await
        .expect("update");
    stale.metadata.labels = Some([("x".to_string(), "2".to_string())].into());
    let e = pods.replace("a", &PostParams::default(), &stale).await;
    assert_eq!(code(e.expect_err("stale update")), 409);

    // Status subresource: status writes change only status; main writes keep status.
    let p = pods
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"ignored": "yes"}},
                                 "status": {"phase": "Running", "podIP": "10.0.0.5"}})),
        )
        .await
        .expect("status patch");
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    assert!(
        !p.labels().contains_key("ignored"),
        "status writes ignore metadata"
    );
    let p = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Failed"}, "metadata": {"labels": {"y": "1"}}}),
            ),
        )
        .await
        .expect("main patch");
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    assert_eq!(p.labels().get("y").map(String::as_str), Some("1"));

    // Strategic merge on conditions merges by type.
    pods.patch_status(
        "a",
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await
    .expect("sm 1");
    let p = pods
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Initialized", "status": "True"}]}}),
            ),
        )
        .await
        .expect("sm 2");
    let conds = p.status.and_then(|s| s.conditions).unwrap_or_default();
    assert_eq!(conds.len(), 2, "{conds:?}");

    // Field and label selectors.
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod("b", "n2")).expect("pod"),
    )
    .await
    .expect("create b");
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .expect("list");
    assert_eq!(on_n1.items.len(), 1);
    // "a" lost its app label in the update above.
    let by_label = pods
        .list(&ListParams::default().labels("app in (a,b)"))
        .await
        .expect("l");
    assert_eq!(by_label.items.len(), 1);
    let by_label = pods
        .list(&ListParams::default().labels("x,!app"))
        .await
        .expect("l");
    assert_eq!(by_label.items.len(), 1);
    let bad = pods
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await;
    assert_eq!(code(bad.expect_err("unsupported field")), 400);

    // Graceful deletion: bound pod gets a deletionTimestamp; UID precondition; grace 0 removes.
    let dp = DeleteParams {
        grace_period_seconds: Some(30),
        ..Default::default()
    };
    let r = pods.delete("a", &dp).await.expect("graceful delete");
    let p = r.left().expect("object returned while terminating");
    assert!(p.metadata.deletion_timestamp.is_some());
    let wrong = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(pods.delete("a", &wrong).await.expect_err("precondition")),
        409
    );
    let right = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: p.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    pods.delete("a", &right).await.expect("final delete");
    assert_eq!(code(pods.get("a").await.expect_err("gone")), 404);
}

#[tokio::test]
async fn node_restrictions() {
    let srv = ApiServer::start().expect("fixture");
    srv.create(pod("mine", "n1")).expect("pod");
    srv.create(pod("theirs", "n2")).expect("pod");
    for (name, data) in [("cm-a", "1"), ("cm-b", "2")] {
        srv.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": name, "namespace": "default"}, "data": {"k": data}}))
            .expect("cm");
    }
    let n1 = client(&srv, &srv.node_token("n1")).await;
    let nodes: Api<Node> = Api::all(n1.clone());
    let me: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1"}, "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}))
    .expect("node");
    nodes
        .create(&PostParams::default(), &me)
        .await
        .expect("own node");
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("node");
    assert_eq!(
        code(
            nodes
                .create(&PostParams::default(), &other)
                .await
                .expect_err("n2")
        ),
        403
    );
    let untaint = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await;
    assert_eq!(code(untaint.expect_err("taints")), 403);
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .await
        .expect("own status");

    let leases: Api<Lease> = Api::namespaced(n1.clone(), "kube-node-lease");
    let l: Lease = serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("lease");
    leases
        .create(&PostParams::default(), &l)
        .await
        .expect("own lease");
    let l2: Lease = serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("lease");
    assert_eq!(
        code(
            leases
                .create(&PostParams::default(), &l2)
                .await
                .expect_err("n2")
        ),
        403
    );

    let pods: Api<Pod> = Api::namespaced(n1.clone(), "default");
    pods.patch_status(
        "mine",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .expect("bound pod status");
    let e = pods
        .patch_status(
            "theirs",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await;
    assert_eq!(code(e.expect_err("other node's pod")), 403);

    let cms: Api<ConfigMap> = Api::namespaced(n1.clone(), "default");
    cms.get("cm-a").await.expect("referenced configmap");
    assert_eq!(code(cms.get("cm-b").await.expect_err("unreferenced")), 403);
    assert_eq!(
        code(
            cms.list(&ListParams::default())
                .await
                .expect_err("list all")
        ),
        403
    );
    let one = cms
        .list(&ListParams::default().fields("metadata.name=cm-a"))
        .await
        .expect("list pinned to a referenced name");
    assert_eq!(one.items.len(), 1);
    let secrets: Api<Secret> = Api::all(n1.clone());
    assert_eq!(
        code(
            secrets
                .list(&ListParams::default())
                .await
                .expect_err("secrets")
        ),
        403
    );

    let anon = client(&srv, "no-such-token").await;
    let e = Api::<Node>::all(anon).list(&ListParams::default()).await;
    assert_eq!(code(e.expect_err("anonymous")), 401);
    assert!(srv
        .requests()
        .iter()
        .any(|r| r.status == 403 && r.attrs.resource == "secrets"));
}

#[tokio::test]
async fn watch_bookmarks_gone_and_restart() {
    let mut srv = ApiServer::start().expect("fixture");
    srv.set_bookmark_interval(Duration::from_millis(200));
    let admin = client(&srv, &srv.admin_token()).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let first = srv.create(pod("w1", "n1")).expect("pod");
    let rv0 = first["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();

    let wp = WatchParams::default()
        .fields("spec.nodeName=n1")
        .timeout(20);
    let mut stream = pods.watch(&wp, "0").await.expect("watch").boxed();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    srv.create(pod("w2", "n1")).expect("pod");
    srv.create(pod("other", "n9")).expect("pod");
    while !(saw_added && saw_bookmark) {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .expect("event in time")
            .expect("stream ok")
            .expect("not ended");
        match ev {
            WatchEvent::Added(p) => {
                assert_ne!(p.metadata.name.as_deref(), Some("other"), "field selector");
                if p.metadata.name.as_deref() == Some("w2") {
                    saw_added = true;
                }
            }
            WatchEvent::Bookmark(_) => saw_bookmark = true,
            _ => {}
        }
    }
    // Selector transition: a pod moved away is DELETED for this watch.
    srv.merge_patch(
        "",
        "pods",
        "default",
        "w2",
        "",
        &json!({"metadata": {"labels": {"z": "1"}}}),
    )
    .expect("patch");
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .expect("event in time")
            .expect("ok")
            .expect("open");
        if let WatchEvent::Modified(p) = ev {
            assert_eq!(p.labels().get("z").map(String::as_str), Some("1"));
            break;
        }
    }

    // Restart mid-watch: the stream ends; a new watch from the last RV resumes without loss.
    let rv_before = srv.resource_version().to_string();
    srv.restart().expect("restart");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "watch ends when the server stops");
    srv.create(pod("w3", "n1")).expect("pod");
    let mut s2 = pods.watch(&wp, &rv_before).await.expect("rewatch").boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), s2.try_next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    match ev {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("w3")),
        other => panic!("expected w3 ADDED, got {other:?}"),
    }

    // Too old a resourceVersion after compaction: 410 Gone.
    srv.compact();
    let mut s3 = pods.watch(&wp, &rv0).await.expect("watch").boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), s3.try_next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    match ev {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn token_request_review_and_access_review() {
    let srv = ApiServer::start().expect("fixture");
    let mut p = pod("tp", "n1");
    p["spec"]["serviceAccountName"] = json!("app");
    let created = srv.create(p).expect("pod");
    let n1 = client(&srv, &srv.node_token("n1")).await;
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["api"], "expirationSeconds": 600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "tp",
                                    "uid": created["metadata"]["uid"]}}});
    let http = |method: &str, path: &str, body: &serde_json::Value| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("json"))
            .expect("request")
    };
    let tr: serde_json::Value = n1
        .request(http(
            "POST",
            "/api/v1/namespaces/default/serviceaccounts/app/token",
            &req,
        ))
        .await
        .expect("token request");
    let token = tr["status"]["token"].as_str().expect("token").to_string();
    assert!(tr["status"]["expirationTimestamp"].is_string());
    let e = n1
        .request::<serde_json::Value>(http(
            "POST",
            "/api/v1/namespaces/default/serviceaccounts/other/token",
            &req,
        ))
        .await;
    assert_eq!(code(e.expect_err("not the pod's SA")), 403);
    // The Node authorizer: another node may not get a token bound to n1's pod.
    let n2 = client(&srv, &srv.node_token("n2")).await;
    let e = n2
        .request::<serde_json::Value>(http(
            "POST",
            "/api/v1/namespaces/default/serviceaccounts/app/token",
            &req,
        ))
        .await;
    assert_eq!(code(e.expect_err("pod bound to another node")), 403);
    let denied = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:n2" && r.attrs.subresource == "token")
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert_eq!(denied, [403]);
    // Lifetimes: at least 10 minutes; a configured maximum shortens longer requests and the
    // answer's spec says so.
    let mut short = req.clone();
    short["spec"]["expirationSeconds"] = json!(60);
    let e = n1
        .request::<serde_json::Value>(http(
            "POST",
            "/api/v1/namespaces/default/serviceaccounts/app/token",
            &short,
        ))
        .await;
    assert_eq!(code(e.expect_err("too short")), 422);
    srv.set_max_token_expiration(30);
    let tr2: serde_json::Value = n1
        .request(http(
            "POST",
            "/api/v1/namespaces/default/serviceaccounts/app/token",
            &req,
        ))
        .await
        .expect("token request");
    assert_eq!(tr2["spec"]["expirationSeconds"], json!(30));
    let exp = tr2["status"]["expirationTimestamp"]
        .as_str()
        .and_then(|t| k8s_openapi::chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("expirationTimestamp");
    let left = exp.timestamp() - k8s_openapi::chrono::Utc::now().timestamp();
    assert!((25..=31).contains(&left), "{left}");

    let rev: serde_json::Value = n1
        .request(http(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}),
        ))
        .await
        .expect("review");
    assert_eq!(rev["status"]["authenticated"], json!(true));
    assert_eq!(
        rev["status"]["user"]["username"],
        json!("system:serviceaccount:default:app")
    );
    srv.grant("alice", "get", "nodes", "log");
    let sar = |user: &str, sub: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
               "spec": {"user": user, "resourceAttributes": {"verb": "get", "resource": "nodes", "subresource": sub, "name": "n1"}}})
    };
    for (user, sub, want) in [
        ("alice", "log", true),
        ("alice", "proxy", false),
        ("bob", "log", false),
    ] {
        let r: serde_json::Value = n1
            .request(http(
                "POST",
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                &sar(user, sub),
            ))
            .await
            .expect("sar");
        assert_eq!(r["status"]["allowed"], json!(want), "{user} {sub}");
    }
}

#[tokio::test]
async fn service_account_admission_and_root_ca() {
    let srv = ApiServer::start().expect("fixture");
    // Off by default.
    let plain = srv.create(pod("plain", "n1")).expect("pod");
    assert_eq!(plain["spec"]["volumes"].as_array().map(Vec::len), Some(1));
    assert!(srv
        .get("", "configmaps", "default", "kube-root-ca.crt")
        .is_none());
    srv.enable_service_account_admission();
    let mut p = pod("sa", "n1");
    p["metadata"]["namespace"] = json!("team");
    p["spec"]["initContainers"] = json!([{"name": "i", "image": "busybox:1.36"}]);
    let created = srv.create(p).expect("pod");
    let vols = created["spec"]["volumes"].as_array().expect("volumes");
    let v = vols
        .iter()
        .find(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"))
        })
        .expect("token volume");
    let src = &v["projected"]["sources"];
    assert_eq!(src[0]["serviceAccountToken"]["expirationSeconds"], 3607);
    assert_eq!(src[0]["serviceAccountToken"]["path"], "token");
    assert_eq!(src[1]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        src[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    for f in ["containers", "initContainers"] {
        let m = &created["spec"][f][0]["volumeMounts"];
        assert!(
            m.as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == v["name"]
                    && m["mountPath"] == hako_tests::apiserver::SERVICE_ACCOUNT_MOUNT
                    && m["readOnly"] == true),
            "{f}: {m}"
        );
    }
    let ca = srv
        .get("", "configmaps", "team", "kube-root-ca.crt")
        .expect("root CA published in the pod's namespace");
    assert_eq!(ca["data"]["ca.crt"], hako_tests::apiserver::CLUSTER_CA_PEM);
    // The node of the pod may read it (a reference of its pod), another node may not.
    let n1: Api<ConfigMap> = Api::namespaced(client(&srv, &srv.node_token("n1")).await, "team");
    assert!(n1.get("kube-root-ca.crt").await.is_ok());
    let n2: Api<ConfigMap> = Api::namespaced(client(&srv, &srv.node_token("n2")).await, "team");
    assert_eq!(code(n2.get("kube-root-ca.crt").await.expect_err("n2")), 403);
    // Opting out.
    let mut p = pod("no-token", "n1");
    p["spec"]["automountServiceAccountToken"] = json!(false);
    let created = srv.create(p).expect("pod");
    assert_eq!(created["spec"]["volumes"].as_array().map(Vec::len), Some(1));
}
