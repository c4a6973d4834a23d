//! Authentication and authorization of kubelet API requests (effectful at the edge, pure in
//! the middle): bearer tokens through TokenReview and permissions through SubjectAccessReview,
//! as the kubelet's webhook authenticator and authorizer do, with the bounds the kubelet
//! inherits from k8s.io/apiserver:
//! - caches are LRUs of fixed size keyed by a SHA-256 of the token (or of the whole
//!   authorization request), never the raw token; entries expire (authn success 2 m, failure
//!   10 s; authz allowed 5 m, denied 30 s; all flags);
//! - concurrent reviews of one key share one call; every call has a deadline;
//! - TokenReviews of tokens not in the cache draw from a token bucket (default 10/s, burst
//!   20) and a small limit of reviews in flight: when the bucket is empty the request is
//!   answered 429 with `Retry-After` (cached tokens and client certificates never wait on it).
//!
//! The effects (the two review calls) sit behind [`Reviewer`], with the apiserver one in
//! [`ApiReviewer`].

use futures::future::{BoxFuture, FutureExt, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An authenticated user, as TokenReview (or a client certificate) names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// UID ("" when the authenticator gave none).
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (scopes, credential ids...), passed on to SubjectAccessReview.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The bounds of the review caches and of the review calls.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// How long a successful TokenReview is trusted.
    pub authn_ttl: Duration,
    /// How long a failed TokenReview is remembered.
    pub authn_failure_ttl: Duration,
    /// How long an allowed SubjectAccessReview is trusted.
    pub authz_allowed_ttl: Duration,
    /// How long a denied SubjectAccessReview is remembered.
    pub authz_denied_ttl: Duration,
    /// Entries of each cache.
    pub cache_size: usize,
    /// Deadline of one review call.
    pub review_timeout: Duration,
    /// TokenReviews of uncached tokens per second (the bucket's refill rate).
    pub review_rate: f64,
    /// Bucket size.
    pub review_burst: u32,
    /// TokenReviews of uncached tokens in flight at once.
    pub max_inflight_reviews: usize,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            authn_ttl: Duration::from_secs(120),
            authn_failure_ttl: Duration::from_secs(10),
            authz_allowed_ttl: Duration::from_secs(300),
            authz_denied_ttl: Duration::from_secs(30),
            cache_size: 4096,
            review_timeout: Duration::from_secs(10),
            review_rate: 10.0,
            review_burst: 20,
            max_inflight_reviews: 8,
        }
    }
}

/// Why a request could not be authenticated or authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid (401).
    #[error("invalid bearer token")]
    Unauthenticated,
    /// Too many reviews of unknown tokens right now (429).
    #[error("too many token reviews, retry later")]
    Throttled,
    /// The review call failed or ran out of time (401 for authn, 500 for authz).
    #[error("review failed: {0}")]
    Review(ReviewError),
}

/// The review named in a [`ReviewError`].
pub const TOKEN_REVIEW: &str = "TokenReview";
/// The review named in a [`ReviewError`].
pub const ACCESS_REVIEW: &str = "SubjectAccessReview";

/// Why a TokenReview or SubjectAccessReview call gave no answer (the first field names the
/// review).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The request could not be built.
    #[error("{0}: building the request: {1}")]
    Request(&'static str, String),
    /// The apiserver call failed (kube's message).
    #[error("{0}: {1}")]
    Call(&'static str, String),
    /// No answer within the review deadline.
    #[error("{0} timed out")]
    TimedOut(&'static str),
    /// The review task ended without an answer (the runtime shut down, or a panic).
    #[error("{0}: review task: {1}")]
    Task(&'static str, String),
}

/// The two review calls (effect).
pub trait Reviewer: Send + Sync + 'static {
    /// TokenReview: the user of `token`, None when the token is not valid.
    fn token_review(
        &self,
        token: String,
    ) -> BoxFuture<'static, Result<Option<UserInfo>, ReviewError>>;
    /// SubjectAccessReview of `verb` on `nodes/<sub>` of `node`: allowed or not.
    fn access_review(
        &self,
        user: UserInfo,
        verb: String,
        sub: String,
        node: String,
    ) -> BoxFuture<'static, Result<bool, ReviewError>>;
}

/// The SubjectAccessReview the kubelet sends for a request on its API (pure).
pub fn access_review_object(
    u: &UserInfo,
    verb: &str,
    sub: &str,
    node: &str,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(u.name.clone()),
            uid: (!u.uid.is_empty()).then(|| u.uid.clone()),
            groups: Some(u.groups.clone()),
            extra: (!u.extra.is_empty()).then(|| u.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(String::new()),
                version: Some("v1".into()),
                resource: Some("nodes".into()),
                subresource: Some(sub.into()),
                name: Some(node.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Reviews through the apiserver.
#[derive(Clone)]
pub struct ApiReviewer(pub kube::Client);

fn post<T: serde::Serialize>(
    review: &'static str,
    path: &str,
    body: &T,
) -> Result<http::Request<Vec<u8>>, ReviewError> {
    let e = |x: String| ReviewError::Request(review, x);
    http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).map_err(|x| e(x.to_string()))?)
        .map_err(|x| e(x.to_string()))
}

impl Reviewer for ApiReviewer {
    fn token_review(
        &self,
        token: String,
    ) -> BoxFuture<'static, Result<Option<UserInfo>, ReviewError>> {
        let c = self.0.clone();
        async move {
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    ..Default::default()
                },
                ..Default::default()
            };
            let req = post(
                TOKEN_REVIEW,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &tr,
            )?;
            let r: TokenReview = c
                .request(req)
                .await
                .map_err(|e| ReviewError::Call(TOKEN_REVIEW, e.to_string()))?;
            let Some(st) = r.status.filter(|s| s.authenticated == Some(true)) else {
                return Ok(None);
            };
            let u = st.user.unwrap_or_default();
            Ok(Some(UserInfo {
                name: u.username.unwrap_or_default(),
                uid: u.uid.unwrap_or_default(),
                groups: u.groups.unwrap_or_default(),
                extra: u.extra.unwrap_or_default(),
            }))
        }
        .boxed()
    }

    fn access_review(
        &self,
        user: UserInfo,
        verb: String,
        sub: String,
        node: String,
    ) -> BoxFuture<'static, Result<bool, ReviewError>> {
        let c = self.0.clone();
        async move {
            let sar = access_review_object(&user, &verb, &sub, &node);
            let req = post(
                ACCESS_REVIEW,
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                &sar,
            )?;
            let r: SubjectAccessReview = c
                .request(req)
                .await
                .map_err(|e| ReviewError::Call(ACCESS_REVIEW, e.to_string()))?;
            Ok(r.status.is_some_and(|s| s.allowed))
        }
        .boxed()
    }
}

/// A token bucket (pure: the caller passes the time).
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Full at `now`.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Bucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

type Key = [u8; 32];
type AuthnResult = Result<Option<UserInfo>, AuthError>;
type AuthzResult = Result<bool, AuthError>;

/// A fixed-size LRU whose entries expire.
struct TtlCache<V>(LruCache<Key, (V, Instant)>);

impl<V: Clone> TtlCache<V> {
    fn new(n: usize) -> Self {
        TtlCache(LruCache::new(
            NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN),
        ))
    }
    fn get(&mut self, k: &Key, now: Instant) -> Option<V> {
        match self.0.get(k) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                self.0.pop(k);
                None
            }
            None => None,
        }
    }
    fn put(&mut self, k: Key, v: V, until: Instant) {
        self.0.put(k, (v, until));
    }
}

struct State {
    authn_ok: TtlCache<UserInfo>,
    authn_bad: TtlCache<()>,
    authz: TtlCache<bool>,
    bucket: Bucket,
    authn_inflight: HashMap<Key, Shared<BoxFuture<'static, AuthnResult>>>,
    authz_inflight: HashMap<Key, Shared<BoxFuture<'static, AuthzResult>>>,
}

/// The cached, bounded authenticator and authorizer of the kubelet API.
pub struct Auth {
    opts: AuthOptions,
    reviewer: Arc<dyn Reviewer>,
    state: Arc<Mutex<State>>,
    inflight: Arc<tokio::sync::Semaphore>,
}

/// SHA-256 of the parts, each length-prefixed (so no two part lists hash alike by accident).
fn key(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn authz_key(u: &UserInfo, verb: &str, sub: &str) -> Key {
    let mut parts: Vec<&[u8]> = vec![
        u.name.as_bytes(),
        u.uid.as_bytes(),
        verb.as_bytes(),
        sub.as_bytes(),
    ];
    parts.push(b"groups");
    parts.extend(u.groups.iter().map(|g| g.as_bytes()));
    parts.push(b"extra");
    for (k, vs) in &u.extra {
        parts.push(k.as_bytes());
        parts.extend(vs.iter().map(|v| v.as_bytes()));
        parts.push(b"");
    }
    key(&parts)
}

impl Auth {
    /// A new authenticator/authorizer over `reviewer`.
    pub fn new(opts: AuthOptions, reviewer: Arc<dyn Reviewer>) -> Self {
        let n = opts.cache_size;
        let state = State {
            authn_ok: TtlCache::new(n),
            authn_bad: TtlCache::new(n),
            authz: TtlCache::new(n),
            bucket: Bucket::new(opts.review_rate, opts.review_burst, Instant::now()),
            authn_inflight: HashMap::new(),
            authz_inflight: HashMap::new(),
        };
        Auth {
            inflight: Arc::new(tokio::sync::Semaphore::new(
                opts.max_inflight_reviews.max(1),
            )),
            opts,
            reviewer,
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The user of a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<UserInfo, AuthError> {
        let k = key(&[b"token", token.as_bytes()]);
        let fut = {
            let mut st = self.state();
            let now = Instant::now();
            if let Some(u) = st.authn_ok.get(&k, now) {
                return Ok(u);
            }
            if st.authn_bad.get(&k, now).is_some() {
                return Err(AuthError::Unauthenticated);
            }
            if let Some(f) = st.authn_inflight.get(&k) {
                f.clone()
            } else {
                if !st.bucket.take(now) {
                    return Err(AuthError::Throttled);
                }
                let (r, sem, state, o) = (
                    self.reviewer.clone(),
                    self.inflight.clone(),
                    self.state.clone(),
                    self.opts.clone(),
                );
                let token = token.to_string();
                // The review runs in its own task: it finishes (and leaves the in-flight map)
                // even when every request waiting on it has gone away.
                let task = tokio::spawn(async move {
                    let call = async {
                        let _permit = sem
                            .acquire_owned()
                            .await
                            .map_err(|e| ReviewError::Task(TOKEN_REVIEW, e.to_string()))?;
                        r.token_review(token).await
                    };
                    let res = match tokio::time::timeout(o.review_timeout, call).await {
                        Ok(Ok(u)) => Ok(u),
                        Ok(Err(e)) => Err(AuthError::Review(e)),
                        Err(_) => Err(AuthError::Review(ReviewError::TimedOut(TOKEN_REVIEW))),
                    };
                    let mut st = lock(&state);
                    st.authn_inflight.remove(&k);
                    let now = Instant::now();
                    match &res {
                        Ok(Some(u)) => st.authn_ok.put(k, u.clone(), now + o.authn_ttl),
                        Ok(None) => st.authn_bad.put(k, (), now + o.authn_failure_ttl),
                        Err(_) => {}
                    }
                    res
                });
                let f = task
                    .map(|j| {
                        j.unwrap_or_else(|e| {
                            Err(AuthError::Review(ReviewError::Task(
                                TOKEN_REVIEW,
                                e.to_string(),
                            )))
                        })
                    })
                    .boxed()
                    .shared();
                st.authn_inflight.insert(k, f.clone());
                f
            }
        };
        match fut.await {
            Ok(Some(u)) => Ok(u),
            Ok(None) => Err(AuthError::Unauthenticated),
            Err(e) => Err(e),
        }
    }

    /// Whether `user` may `verb` `nodes/<sub>` of `node`.
    pub async fn authorize(
        &self,
        user: &UserInfo,
        verb: &str,
        sub: &str,
        node: &str,
    ) -> Result<bool, AuthError> {
        let k = authz_key(user, verb, sub);
        let fut = {
            let mut st = self.state();
            if let Some(a) = st.authz.get(&k, Instant::now()) {
                return Ok(a);
            }
            if let Some(f) = st.authz_inflight.get(&k) {
                f.clone()
            } else {
                let call =
                    self.reviewer
                        .access_review(user.clone(), verb.into(), sub.into(), node.into());
                let (state, o) = (self.state.clone(), self.opts.clone());
                let task = tokio::spawn(async move {
                    let res = match tokio::time::timeout(o.review_timeout, call).await {
                        Ok(Ok(a)) => Ok(a),
                        Ok(Err(e)) => Err(AuthError::Review(e)),
                        Err(_) => Err(AuthError::Review(ReviewError::TimedOut(ACCESS_REVIEW))),
                    };
                    let mut st = lock(&state);
                    st.authz_inflight.remove(&k);
                    if let Ok(a) = res {
                        let ttl = if a {
                            o.authz_allowed_ttl
                        } else {
                            o.authz_denied_ttl
                        };
                        st.authz.put(k, a, Instant::now() + ttl);
                    }
                    res
                });
                let f = task
                    .map(|j| {
                        j.unwrap_or_else(|e| {
                            Err(AuthError::Review(ReviewError::Task(
                                ACCESS_REVIEW,
                                e.to_string(),
                            )))
                        })
                    })
                    .boxed()
                    .shared();
                st.authz_inflight.insert(k, f.clone());
                f
            }
        };
        fut.await
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A poisoned lock only means a panic elsewhere; the caches stay usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The verb a kubelet API request is authorized with: the HTTP method's, except that the
/// streaming endpoints (exec, attach, portForward, run) are always `create`: their WebSocket
/// form is a GET, and authorizing it as `get` would let a read-only `nodes/proxy` grant run
/// commands in containers.
pub fn verb_for(method: &http::Method, path: &str) -> &'static str {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if matches!(first, "exec" | "attach" | "portForward" | "run") {
        return "create";
    }
    match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        tr: AtomicUsize,
        sar: AtomicUsize,
        delay: Duration,
    }

    impl Reviewer for Arc<Fake> {
        fn token_review(
            &self,
            token: String,
        ) -> BoxFuture<'static, Result<Option<UserInfo>, ReviewError>> {
            self.tr.fetch_add(1, Ordering::SeqCst);
            let d = self.delay;
            async move {
                tokio::time::sleep(d).await;
                Ok((token == "good").then(|| UserInfo {
                    name: "alice".into(),
                    uid: "u-1".into(),
                    groups: vec!["g".into()],
                    extra: [("scopes".to_string(), vec!["a".to_string()])].into(),
                }))
            }
            .boxed()
        }
        fn access_review(
            &self,
            user: UserInfo,
            verb: String,
            _sub: String,
            _node: String,
        ) -> BoxFuture<'static, Result<bool, ReviewError>> {
            self.sar.fetch_add(1, Ordering::SeqCst);
            async move { Ok(user.name == "alice" && verb == "get") }.boxed()
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
    }

    #[test]
    fn tokens_are_cached_by_hash_and_failures_briefly() {
        let f = Arc::new(Fake::default());
        let a = Auth::new(AuthOptions::default(), Arc::new(f.clone()));
        rt().block_on(async {
            for _ in 0..5 {
                assert_eq!(
                    a.authenticate("good").await.map(|u| u.uid),
                    Ok("u-1".into())
                );
                assert_eq!(a.authenticate("bad").await, Err(AuthError::Unauthenticated));
            }
        });
        assert_eq!(f.tr.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unknown_tokens_are_rate_bounded() {
        let f = Arc::new(Fake::default());
        let a = Auth::new(AuthOptions::default(), Arc::new(f.clone()));
        let (mut ok, mut throttled) = (0, 0);
        rt().block_on(async {
            for i in 0..1000 {
                match a.authenticate(&format!("t{i}")).await {
                    Err(AuthError::Throttled) => throttled += 1,
                    _ => ok += 1,
                }
            }
        });
        assert!(ok <= 25, "{ok}");
        assert!(throttled >= 975, "{throttled}");
        assert_eq!(f.tr.load(Ordering::SeqCst), ok);
    }

    #[test]
    fn concurrent_reviews_of_one_token_share_a_call() {
        let f = Arc::new(Fake {
            delay: Duration::from_millis(50),
            ..Default::default()
        });
        let a = Arc::new(Auth::new(AuthOptions::default(), Arc::new(f.clone())));
        rt().block_on(async {
            let futs: Vec<_> = (0..20).map(|_| a.authenticate("good")).collect();
            let r = futures::future::join_all(futs).await;
            assert!(r.iter().all(Result::is_ok));
        });
        assert_eq!(f.tr.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn review_calls_have_a_deadline() {
        let f = Arc::new(Fake {
            delay: Duration::from_secs(5),
            ..Default::default()
        });
        let o = AuthOptions {
            review_timeout: Duration::from_millis(20),
            ..Default::default()
        };
        let a = Auth::new(o, Arc::new(f));
        let r = rt().block_on(a.authenticate("good"));
        assert!(matches!(r, Err(AuthError::Review(_))), "{r:?}");
    }

    #[test]
    fn decisions_are_cached_per_user_and_verb() {
        let f = Arc::new(Fake::default());
        let a = Auth::new(AuthOptions::default(), Arc::new(f.clone()));
        let u = UserInfo {
            name: "alice".into(),
            ..Default::default()
        };
        let other = UserInfo {
            name: "alice".into(),
            uid: "x".into(),
            ..Default::default()
        };
        rt().block_on(async {
            for _ in 0..3 {
                assert_eq!(a.authorize(&u, "get", "proxy", "n1").await, Ok(true));
                assert_eq!(a.authorize(&u, "create", "proxy", "n1").await, Ok(false));
                assert_eq!(a.authorize(&other, "get", "proxy", "n1").await, Ok(true));
            }
        });
        assert_eq!(f.sar.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn access_reviews_carry_the_whole_identity() {
        let u = UserInfo {
            name: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["g".into()],
            extra: [("k".to_string(), vec!["v".to_string()])].into(),
        };
        let v =
            serde_json::to_value(access_review_object(&u, "create", "proxy", "n1")).expect("json");
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["kind"], "SubjectAccessReview");
        assert_eq!(v["spec"]["uid"], "u-1");
        assert_eq!(v["spec"]["extra"]["k"][0], "v");
        assert_eq!(v["spec"]["groups"][0], "g");
        assert_eq!(v["spec"]["resourceAttributes"]["subresource"], "proxy");
        assert_eq!(v["spec"]["resourceAttributes"]["name"], "n1");
    }

    #[test]
    fn streaming_endpoints_are_create() {
        use http::Method;
        assert_eq!(verb_for(&Method::GET, "/exec/ns/p/c"), "create");
        assert_eq!(verb_for(&Method::GET, "/attach/ns/p/c"), "create");
        assert_eq!(verb_for(&Method::GET, "/portForward/ns/p"), "create");
        assert_eq!(verb_for(&Method::POST, "/exec/ns/p/c"), "create");
        assert_eq!(verb_for(&Method::GET, "/pods"), "get");
        assert_eq!(verb_for(&Method::HEAD, "/healthz"), "get");
        assert_eq!(verb_for(&Method::DELETE, "/pods"), "delete");
    }

    #[test]
    fn bucket_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 2, t0);
        assert!(b.take(t0) && b.take(t0) && !b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(110)));
        assert!(!b.take(t0 + Duration::from_millis(110)));
    }
}
