//! HTTP layer of the fixture: routing, authentication, authorization, the verbs, and the
//! chunked watch stream. Effectful (hyper server).

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

use super::authz::{self, Attrs, User};
use super::select::{FieldSelector, LabelSelector};
use super::{
    patch, resource_info, ApiError, EventType, IssuedToken, Key, RequestRecord, ResourceInfo,
    Shared, StoreEvent,
};

type Body = BoxBody<Bytes, Infallible>;

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    done: std::sync::mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let shared = shared.clone();
                let mut sd = shutdown.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = sd.changed() => {}
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = done.send(());
}

fn full(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn err(e: &ApiError) -> Response<Body> {
    full(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_map(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A parsed resource path.
#[derive(Debug, Default)]
struct Route {
    group: String,
    version: String,
    resource: String,
    namespace: String,
    name: String,
    sub: String,
}

fn parse_path(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let mut r = Route {
        group: group.into(),
        version: version.into(),
        ..Default::default()
    };
    let tail = match rest {
        ["namespaces", ns, res, tail @ ..] => {
            r.namespace = (*ns).into();
            r.resource = (*res).into();
            tail
        }
        [res, tail @ ..] => {
            r.resource = (*res).into();
            tail
        }
        [] => return Some(r),
    };
    match tail {
        [] => {}
        [name] => r.name = (*name).into(),
        [name, sub] => {
            r.name = (*name).into();
            r.sub = (*sub).into();
        }
        _ => return None,
    }
    Some(r)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let at = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return err(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let user = {
        let st = shared.lock();
        auth.and_then(|t| {
            st.tokens.get(&t).cloned().or_else(|| {
                st.issued
                    .get(&t)
                    .filter(|i| i.expires > k8s_openapi::chrono::Utc::now())
                    .map(|i| i.user.clone())
            })
        })
    };
    let mut attrs = Attrs::default();
    let resp = match &user {
        None => err(&ApiError::new(401, "Unauthorized", "Unauthorized")),
        Some(user) => {
            let injected = {
                let mut st = shared.lock();
                if st.fail_next > 0 && path.starts_with("/api") {
                    st.fail_next -= 1;
                    true
                } else {
                    false
                }
            };
            if injected {
                err(&ApiError::new(500, "InternalError", "injected failure"))
            } else {
                route(
                    &shared,
                    user,
                    &method,
                    &path,
                    &query,
                    &content_type,
                    &body,
                    &mut attrs,
                )
            }
        }
    };
    let rec = RequestRecord {
        at,
        user: user.map(|u| u.name).unwrap_or_default(),
        method: method.to_string(),
        path,
        query,
        attrs,
        status: resp.status().as_u16(),
        content_type,
        body: String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned(),
    };
    shared.lock().requests.push(rec);
    resp
}

#[allow(clippy::too_many_arguments)]
fn route(
    shared: &Arc<Shared>,
    user: &User,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &str,
    body: &Bytes,
    attrs: &mut Attrs,
) -> Response<Body> {
    match path {
        "/version" => {
            return full(
                200,
                &json!({"major": "1", "minor": "28", "gitVersion": "v1.28.0-hako-fixture",
                        "platform": "linux/amd64"}),
            )
        }
        "/healthz" | "/readyz" | "/livez" => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            *r.status_mut() = StatusCode::OK;
            return r;
        }
        _ => {}
    }
    let Some(r) = parse_path(path) else {
        return err(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let q = query_map(query);
    let qget = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    // Virtual (create-only) resources.
    let virt = matches!(
        (r.group.as_str(), r.resource.as_str()),
        ("authentication.k8s.io", "tokenreviews")
            | ("authorization.k8s.io", "subjectaccessreviews")
    );
    if r.resource.is_empty() {
        return full(
            200,
            &json!({"kind": "APIResourceList", "groupVersion": if r.group.is_empty() { r.version.clone() } else { format!("{}/{}", r.group, r.version) }, "resources": []}),
        );
    }
    // /api/v1/namespaces/<ns> addresses the namespace itself.
    let (resource, namespace, name, sub) =
        if r.group.is_empty() && r.resource == "namespaces" && r.namespace.is_empty() {
            (
                r.resource.clone(),
                String::new(),
                r.name.clone(),
                r.sub.clone(),
            )
        } else {
            (
                r.resource.clone(),
                r.namespace.clone(),
                r.name.clone(),
                r.sub.clone(),
            )
        };
    let info = if virt {
        None
    } else {
        match resource_info(&r.group, &resource) {
            Some(i) if i.version == r.version => Some(i),
            _ => {
                return err(&ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({path})"),
                ))
            }
        }
    };
    let is_watch = matches!(qget("watch"), Some("1" | "true"));
    let verb = match (method, name.is_empty()) {
        (&Method::GET, false) => "get",
        (&Method::GET, true) if is_watch => "watch",
        (&Method::GET, true) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, false) => "update",
        (&Method::PATCH, false) => "patch",
        (&Method::DELETE, false) => "delete",
        (&Method::DELETE, true) => "deletecollection",
        _ => {
            return err(&ApiError::new(
                405,
                "MethodNotAllowed",
                "method not allowed",
            ))
        }
    };
    let field = match qget("fieldSelector") {
        Some(s) if !s.is_empty() => match FieldSelector::parse(s, &resource) {
            Ok(f) => Some(f),
            Err(m) => return err(&ApiError::bad_request(m)),
        },
        _ => None,
    };
    let label = match qget("labelSelector") {
        Some(s) if !s.is_empty() => match LabelSelector::parse(s) {
            Ok(l) => Some(l),
            Err(m) => return err(&ApiError::bad_request(m)),
        },
        _ => None,
    };
    let body_json: Value = if body.is_empty() {
        Value::Null
    } else if verb == "patch" && content_type.starts_with("application/apply-patch+yaml") {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return err(&ApiError::bad_request(format!(
                    "the fixture accepts apply patches as JSON only: {e}"
                )))
            }
        }
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return err(&ApiError::bad_request(format!("invalid JSON body: {e}"))),
        }
    };
    let attr_name = if verb == "create" && sub.is_empty() {
        body_json["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string()
    } else if name.is_empty() {
        field
            .as_ref()
            .and_then(|f| f.pinned_name())
            .unwrap_or("")
            .to_string()
    } else {
        name.clone()
    };
    *attrs = Attrs {
        verb: verb.into(),
        group: r.group.clone(),
        resource: resource.clone(),
        subresource: sub.clone(),
        namespace: namespace.clone(),
        name: attr_name,
    };
    {
        let st = shared.lock();
        if let Err(m) = authz::authorize(&st.objects, &st.rules, user, attrs) {
            return err(&ApiError::new(403, "Forbidden", m));
        }
    }
    if virt {
        return match verb {
            "create" => review(shared, &r.resource, &body_json),
            _ => err(&ApiError::new(
                405,
                "MethodNotAllowed",
                "only create is supported",
            )),
        };
    }
    let Some(info) = info else {
        return err(&ApiError::bad_request("unknown resource"));
    };
    if info.namespaced && namespace.is_empty() && !matches!(verb, "list" | "watch") {
        return err(&ApiError::bad_request("the namespace is required"));
    }
    let tx = &shared.tx;
    let ephemeral = info.resource == "pods" && sub == "ephemeralcontainers";
    let result = match verb {
        "get" if sub.is_empty() || (sub == "status" && info.status) || ephemeral => {
            shared.lock().get(info, &namespace, &name)
        }
        "list" => list(
            shared,
            info,
            &namespace,
            label.as_ref(),
            field.as_ref(),
            Page::from_query(qget("limit"), qget("continue")),
        ),
        "watch" => {
            let rv = qget("resourceVersion").unwrap_or("");
            let bookmarks = matches!(qget("allowWatchBookmarks"), Some("true" | "1"));
            let timeout = qget("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs);
            return watch_stream(
                shared, info, &namespace, label, field, rv, bookmarks, timeout,
            );
        }
        "create" if sub.is_empty() => shared.lock().create(tx, info, &namespace, body_json, user),
        "create" if info.resource == "serviceaccounts" && sub == "token" => {
            token_request(shared, user, &namespace, &name, body_json)
        }
        "update" if sub.is_empty() || (sub == "status" && info.status) || ephemeral => {
            let prv = body_json["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_string);
            shared.lock().replace(
                tx, info, &namespace, &name, &sub, body_json, prv, user, "update",
            )
        }
        "patch" if sub.is_empty() || (sub == "status" && info.status) || ephemeral => do_patch(
            shared,
            info,
            &namespace,
            &name,
            &sub,
            content_type,
            body_json,
            user,
            qget("fieldManager"),
        ),
        "delete" if sub.is_empty() => {
            let mut opts = if body_json.is_object() {
                body_json
            } else {
                json!({})
            };
            if let Some(g) = qget("gracePeriodSeconds").and_then(|g| g.parse::<i64>().ok()) {
                opts["gracePeriodSeconds"] = json!(g);
            }
            shared.lock().delete(tx, info, &namespace, &name, &opts)
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported on {}/{sub}", info.resource),
        )),
    };
    match result {
        Ok(v) => full(if verb == "create" { 201 } else { 200 }, &v),
        Err(e) => err(&e),
    }
}

#[allow(clippy::too_many_arguments)]
fn do_patch(
    shared: &Arc<Shared>,
    info: &ResourceInfo,
    ns: &str,
    name: &str,
    sub: &str,
    content_type: &str,
    p: Value,
    user: &User,
    field_manager: Option<&str>,
) -> Result<Value, ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let mut st = shared.lock();
    let current = st.get(info, ns, name);
    let mut obj = match (&current, ct) {
        (Ok(o), _) => o.clone(),
        (Err(_), "application/apply-patch+yaml") if sub.is_empty() => {
            if field_manager.is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let mut o = p.clone();
            o["metadata"]["name"] = json!(name);
            return st.create(&shared.tx, info, ns, o, user);
        }
        (Err(e), _) => return Err(e.clone()),
    };
    let prv = p["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    match ct {
        "application/merge-patch+json" => patch::merge_patch(&mut obj, &p),
        "application/strategic-merge-patch+json" => {
            patch::strategic_merge_patch(&mut obj, &p).map_err(|m| ApiError::new(422, "Invalid", m))?
        }
        "application/json-patch+json" => {
            patch::json_patch(&mut obj, &p).map_err(|m| ApiError::new(422, "Invalid", m))?
        }
        "application/apply-patch+yaml" => {
            if field_manager.is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(
                    "fieldManager: Required value: is required for apply patch",
                ));
            }
            patch::merge_patch(&mut obj, &p)
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"),
            ))
        }
    }
    st.replace(&shared.tx, info, ns, name, sub, obj, prv, user, "patch")
}

/// The `limit` and `continue` of a list request (pagination, as the real apiserver).
struct Page<'a> {
    limit: Option<usize>,
    cont: Option<&'a str>,
}

impl<'a> Page<'a> {
    fn from_query(limit: Option<&str>, cont: Option<&'a str>) -> Self {
        Page {
            // limit=0 or an unparsable limit means no limit, as upstream.
            limit: limit
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0),
            cont: cont.filter(|c| !c.is_empty()),
        }
    }
}

/// The opaque continue token: the list's resourceVersion and the last key returned, hex.
fn continue_token(rv: u64, last: &Key) -> String {
    hex::encode(format!("{rv}\0{}\0{}", last.namespace, last.name))
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut parts = raw.split('\0');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    parts.next().is_none().then_some((rv, ns, name))
}

fn list(
    shared: &Arc<Shared>,
    info: &ResourceInfo,
    ns: &str,
    label: Option<&LabelSelector>,
    field: Option<&FieldSelector>,
    page: Page<'_>,
) -> Result<Value, ApiError> {
    let st = shared.lock();
    // A continued list keeps the resourceVersion of its first page (a watch from it sees
    // every change made while the pages were read) and resumes after the last key.
    let (rv, after) = match page.cont {
        Some(t) => {
            let (rv, ans, aname) = parse_continue(t).ok_or_else(|| {
                ApiError::bad_request(format!("continue key is not valid: {t:?}"))
            })?;
            if rv < st.compacted_rv {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(Key::new(info.group, info.resource, &ans, &aname)))
        }
        None => (st.rv, None),
    };
    let mut matching = st.objects.iter().filter(|(k, v)| {
        k.group == info.group
            && k.resource == info.resource
            && (ns.is_empty() || k.namespace == ns)
            && after.as_ref().is_none_or(|a| *k > a)
            && label.is_none_or(|l| l.matches(v))
            && field.is_none_or(|f| f.matches(v))
    });
    let limit = page.limit.unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut last = None;
    for (k, v) in matching.by_ref() {
        items.push(v.clone());
        last = Some(k);
        if items.len() == limit {
            break;
        }
    }
    let remaining = matching.count();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let (true, Some(last)) = (remaining > 0, last) {
        meta["continue"] = json!(continue_token(rv, last));
        // Upstream counts what is left only for lists without selectors.
        if label.is_none() && field.is_none() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(
        json!({"kind": format!("{}List", info.kind), "apiVersion": info.api_version(),
           "metadata": meta, "items": items}),
    )
}

fn review(shared: &Arc<Shared>, resource: &str, body: &Value) -> Response<Body> {
    let mut st = shared.lock();
    let mut out = body.clone();
    if resource == "tokenreviews" {
        st.token_reviews += 1;
        let tok = body["spec"]["token"].as_str().unwrap_or("");
        let user = st.tokens.get(tok).cloned().or_else(|| {
            st.issued
                .get(tok)
                .filter(|i| i.expires > k8s_openapi::chrono::Utc::now())
                .map(|i| i.user.clone())
        });
        out["status"] = match user {
            Some(u) => {
                let mut user = json!({"username": u.name, "groups": u.groups});
                if !u.uid.is_empty() {
                    user["uid"] = json!(u.uid);
                }
                if !u.extra.is_empty() {
                    user["extra"] = json!(u.extra);
                }
                json!({"authenticated": true, "user": user, "audiences": body["spec"]["audiences"]})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
    } else {
        let spec = &body["spec"];
        st.access_reviews.push(spec.clone());
        // Validation as the apiserver does it (422), then the fixture's own check that a
        // reviewer passes on the whole identity TokenReview gave it (400).
        let ra = &spec["resourceAttributes"];
        let nra = &spec["nonResourceAttributes"];
        let no_user = spec["user"].as_str().unwrap_or("").is_empty()
            && spec["groups"].as_array().is_none_or(|g| g.is_empty());
        if no_user {
            return err(&ApiError::new(
                422,
                "Invalid",
                "spec.user: Invalid value: \"\": at least one of user or group must be specified",
            ));
        }
        if ra.is_object() == nra.is_object() {
            return err(&ApiError::new(
                422,
                "Invalid",
                "spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
            ));
        }
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let user = User {
            name: spec["user"].as_str().unwrap_or("").into(),
            groups: strs(&spec["groups"]),
            uid: spec["uid"].as_str().unwrap_or("").into(),
            extra: spec["extra"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), strs(v))).collect())
                .unwrap_or_default(),
        };
        let known = st
            .tokens
            .values()
            .find(|u| u.name == user.name && !u.uid.is_empty())
            .cloned();
        if let Some(k) = known {
            if k.uid != user.uid || k.groups != user.groups || k.extra != user.extra {
                return err(&ApiError::bad_request(format!(
                    "SubjectAccessReview for {} does not carry the identity TokenReview gave (uid/groups/extra)",
                    user.name
                )));
            }
        }
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let a = Attrs {
            verb: s(&ra["verb"]),
            group: s(&ra["group"]),
            resource: s(&ra["resource"]),
            subresource: s(&ra["subresource"]),
            namespace: s(&ra["namespace"]),
            name: s(&ra["name"]),
        };
        out["status"] = match authz::authorize(&st.objects, &st.rules, &user, &a) {
            Ok(()) => json!({"allowed": true, "reason": "allowed by fixture rules"}),
            Err(m) => json!({"allowed": false, "reason": m}),
        };
    }
    full(201, &out)
}

fn token_request(
    shared: &Arc<Shared>,
    user: &User,
    ns: &str,
    sa: &str,
    body: Value,
) -> Result<Value, ApiError> {
    let mut st = shared.lock();
    let spec = &body["spec"];
    let pod = match spec["boundObjectRef"]["kind"].as_str() {
        Some("Pod") => {
            let pname = spec["boundObjectRef"]["name"].as_str().unwrap_or("");
            let info = resource_info("", "pods").ok_or_else(|| ApiError::bad_request("pods"))?;
            let p = st.get(info, ns, pname)?;
            let uid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if let Some(want) = spec["boundObjectRef"]["uid"].as_str() {
                if want != uid {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!("the UID in the bound object reference ({want}) does not match the UID in record ({uid})"),
                    ));
                }
            }
            if p["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                != sa
            {
                return Err(ApiError::bad_request(format!(
                    "pod {pname} is not using service account {sa}"
                )));
            }
            if let Some(node) = user.node_name() {
                if p["spec"]["nodeName"].as_str() != Some(node) {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        "node requested token bound to a pod scheduled on a different node",
                    ));
                }
            }
            Some((ns.to_string(), pname.to_string(), uid))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "cannot bind token to object of kind {other}"
            )))
        }
        None if user.node_name().is_some() => {
            return Err(ApiError::new(
                403,
                "Forbidden",
                "node requested token not bound to a pod",
            ))
        }
        None => None,
    };
    let mut secs = spec["expirationSeconds"].as_i64().unwrap_or(3600);
    if secs < 600 {
        return Err(ApiError::new(
            422,
            "Invalid",
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    if let Some(max) = st.max_token_expiration {
        secs = secs.min(max);
    }
    let expires = k8s_openapi::chrono::Utc::now() + k8s_openapi::chrono::Duration::seconds(secs);
    let token = format!("sa-{}-{}", sa, super::new_uid());
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    st.issued.insert(
        token.clone(),
        IssuedToken {
            user: User {
                name: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ],
                ..Default::default()
            },
            expires,
            audiences,
            pod,
        },
    );
    let mut out = body.clone();
    out["spec"]["expirationSeconds"] = json!(secs);
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenRequest");
    out["metadata"]["name"] = json!(sa);
    out["metadata"]["namespace"] = json!(ns);
    out["status"] = json!({"token": token,
        "expirationTimestamp": expires.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)});
    Ok(out)
}

/// Whether a stored event is visible through a watch (resource + namespace) and how the
/// selectors translate it (ADDED/MODIFIED/DELETED transitions).
fn translate(
    ev: &StoreEvent,
    info: &ResourceInfo,
    ns: &str,
    label: Option<&LabelSelector>,
    field: Option<&FieldSelector>,
) -> Option<(&'static str, Value)> {
    if ev.key.group != info.group || ev.key.resource != info.resource {
        return None;
    }
    if !ns.is_empty() && ev.key.namespace != ns {
        return None;
    }
    let sel = |v: &Value| label.is_none_or(|l| l.matches(v)) && field.is_none_or(|f| f.matches(v));
    let now = sel(&ev.object);
    let before = ev.old.as_ref().is_some_and(sel);
    match ev.kind {
        EventType::Added if now => Some(("ADDED", ev.object.clone())),
        EventType::Deleted if before || now => Some(("DELETED", ev.object.clone())),
        EventType::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", ev.object.clone())),
            (false, true) => Some(("ADDED", ev.object.clone())),
            (true, false) => Some(("DELETED", ev.object.clone())),
            (false, false) => None,
        },
        _ => None,
    }
}

fn line(t: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": t, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

struct WatchCtx {
    pending: VecDeque<Bytes>,
    rx: Option<broadcast::Receiver<Arc<StoreEvent>>>,
    info: &'static ResourceInfo,
    ns: String,
    label: Option<LabelSelector>,
    field: Option<FieldSelector>,
    last_rv: u64,
    bookmarks: bool,
    bookmark_every: Duration,
    next_bookmark: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
}

#[allow(clippy::too_many_arguments)]
fn watch_stream(
    shared: &Arc<Shared>,
    info: &'static ResourceInfo,
    ns: &str,
    label: Option<LabelSelector>,
    field: Option<FieldSelector>,
    rv: &str,
    bookmarks: bool,
    timeout: Option<Duration>,
) -> Response<Body> {
    let st = shared.lock();
    let mut pending = VecDeque::new();
    let start: u64;
    let mut rx = None;
    match rv.parse::<u64>() {
        Err(_) if !rv.is_empty() => {
            return err(&ApiError::bad_request(format!(
                "invalid resource version {rv:?}"
            )))
        }
        Ok(r) if r != 0 && r < st.compacted_rv => {
            let status = ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {r} ({})", st.compacted_rv + 1),
            )
            .status();
            pending.push_back(line("ERROR", &status));
            start = r;
        }
        Ok(r) if r != 0 => {
            for ev in st.log.iter().filter(|e| e.rv > r) {
                if let Some((t, o)) = translate(ev, info, ns, label.as_ref(), field.as_ref()) {
                    pending.push_back(line(t, &o));
                }
            }
            start = r.max(st.rv);
            rx = Some(shared.tx.subscribe());
        }
        _ => {
            // No or "0" resourceVersion: the current state as ADDED events, then changes.
            for (k, v) in st.objects.iter() {
                if k.group == info.group
                    && k.resource == info.resource
                    && (ns.is_empty() || k.namespace == ns)
                    && label.as_ref().is_none_or(|l| l.matches(v))
                    && field.as_ref().is_none_or(|f| f.matches(v))
                {
                    pending.push_back(line("ADDED", v));
                }
            }
            start = st.rv;
            rx = Some(shared.tx.subscribe());
        }
    }
    let every = st.bookmark_interval;
    drop(st);
    let now = tokio::time::Instant::now();
    let ctx = WatchCtx {
        pending,
        rx,
        info,
        ns: ns.to_string(),
        label,
        field,
        last_rv: start,
        bookmarks,
        bookmark_every: every,
        next_bookmark: now + every,
        deadline: timeout.map(|t| now + t),
    };
    let stream = futures::stream::unfold(ctx, |mut c| async move {
        loop {
            if let Some(b) = c.pending.pop_front() {
                return Some((b, c));
            }
            let rx = c.rx.as_mut()?;
            let far = tokio::time::Instant::now() + Duration::from_secs(86400);
            let deadline = c.deadline.unwrap_or(far);
            let bm = if c.bookmarks { c.next_bookmark } else { far };
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) => {
                        c.last_rv = c.last_rv.max(ev.rv);
                        if let Some((t, o)) = translate(&ev, c.info, &c.ns, c.label.as_ref(), c.field.as_ref()) {
                            c.pending.push_back(line(t, &o));
                        }
                    }
                    // Lagging or closed: end the stream; the client re-watches.
                    Err(_) => return None,
                },
                _ = tokio::time::sleep_until(bm) => {
                    c.next_bookmark = tokio::time::Instant::now() + c.bookmark_every;
                    let o = json!({"kind": c.info.kind, "apiVersion": c.info.api_version(),
                                   "metadata": {"resourceVersion": c.last_rv.to_string()}});
                    c.pending.push_back(line("BOOKMARK", &o));
                }
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    })
    .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
