//! ServiceAccount tokens of the pods' projected volumes through the TokenRequest API
//! (`serviceaccounts/<name>/token`), bound to the pod (boundObjectRef kind Pod, name, uid),
//! with the projection's audience and expirationSeconds, and refreshed before they expire with
//! the kubelet's rule: once 80 % of the lifetime has passed or the token is older than 24 h
//! (minus a small per-pod jitter). A failed refresh keeps the old token while it is valid and
//! is retried with back-off. Effectful (kube client); the refresh rule is pure.

use crate::node::Ctx;
use crate::sys::volumes::projection::{token_specs, PodTokens, TokenSpec};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::chrono::{DateTime, Duration as ChronoDuration, Utc};
use kube::api::PostParams;
use kube::Api;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Tokens older than this are refreshed whatever their lifetime (the kubelet's maxTTL).
const MAX_TTL: ChronoDuration = ChronoDuration::hours(24);
/// Upper bound of the refresh jitter (the kubelet's maxJitter).
const MAX_JITTER_SECS: i64 = 10;
/// Retry back-off of failed requests.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A token as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The token.
    pub token: String,
    /// `status.expirationTimestamp`.
    pub expires: DateTime<Utc>,
    /// Lifetime granted (`spec.expirationSeconds` of the answer; the apiserver may shorten
    /// the requested one).
    pub ttl_seconds: i64,
}

impl Issued {
    /// When it was issued (expiry − lifetime).
    pub fn issued_at(&self) -> DateTime<Utc> {
        self.expires - ChronoDuration::seconds(self.ttl_seconds)
    }
}

/// Jitter for one pod: a stable fraction (from the pod UID) of min(10 s, 10 % of the
/// lifetime), so that many pods' refreshes spread and short test lifetimes stay usable.
pub fn jitter(uid: &str, ttl_seconds: i64) -> ChronoDuration {
    let span_ms = (MAX_JITTER_SECS * 1000).min(ttl_seconds.max(0) * 100);
    let h = uid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let frac = i64::try_from(h % 1000).unwrap_or(0);
    ChronoDuration::milliseconds(span_ms * frac / 1000)
}

/// The kubelet's refresh rule: refresh when older than 24 h, or when less than 20 % of the
/// lifetime is left (both minus `jitter`), or when expired.
pub fn requires_refresh(t: &Issued, now: DateTime<Utc>, jitter: ChronoDuration) -> bool {
    let ttl = ChronoDuration::seconds(t.ttl_seconds.max(0));
    now >= t.expires || now > t.issued_at() + MAX_TTL - jitter || now > t.expires - ttl / 5 - jitter
}

struct Entry {
    issued: Option<Issued>,
    error: Option<String>,
    retry_at: Option<std::time::Instant>,
    retry_delay: Duration,
}

/// The node's tokens, by (pod UID, token spec).
#[derive(Default)]
pub(crate) struct TokenManager {
    entries: HashMap<(String, TokenSpec), Entry>,
}

fn service_account(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| s.service_account.clone().filter(|n| !n.is_empty()))
        })
        .unwrap_or_else(|| "default".into())
}

/// Why a token could not be issued (kept as the volume's error text until the next retry).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// The request body could not be encoded.
    #[error("encoding the TokenRequest: {0}")]
    Encode(#[from] serde_json::Error),
    /// The apiserver refused the request.
    #[error("{code} {reason}: {message}")]
    Refused {
        /// HTTP status.
        code: u16,
        /// Status reason.
        reason: String,
        /// Status message.
        message: String,
    },
    /// The request did not reach the apiserver or its answer could not be read.
    #[error(transparent)]
    Client(kube::Error),
    /// The answer carries no token.
    #[error("the TokenRequest answer has {0}")]
    NoToken(&'static str),
}

async fn request(ctx: &Ctx, pod: &Pod, spec: &TokenSpec) -> Result<Issued, TokenError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = service_account(pod);
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: if spec.audience.is_empty() {
                Vec::new()
            } else {
                vec![spec.audience.clone()]
            },
            expiration_seconds: Some(spec.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let body = serde_json::to_vec(&tr)?;
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let out: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), body)
        .await
        .map_err(|e| match e {
            kube::Error::Api(r) => TokenError::Refused {
                code: r.code,
                reason: r.reason,
                message: r.message,
            },
            e => TokenError::Client(e),
        })?;
    let st = out.status.ok_or(TokenError::NoToken("no status"))?;
    if st.token.is_empty() {
        return Err(TokenError::NoToken("an empty token"));
    }
    Ok(Issued {
        token: st.token,
        expires: st.expiration_timestamp.0,
        ttl_seconds: out
            .spec
            .expiration_seconds
            .unwrap_or(spec.expiration_seconds),
    })
}

impl TokenManager {
    /// Whether the token (uid, spec) must be requested now: missing, or due for refresh
    /// (with the pod's jitter on the granted lifetime), and not waiting for a retry.
    fn is_due(&self, uid: &str, spec: &TokenSpec, now: DateTime<Utc>) -> bool {
        match self.entries.get(&(uid.to_string(), spec.clone())) {
            None => true,
            Some(e) => {
                e.retry_at.is_none_or(|r| r <= std::time::Instant::now())
                    && e.issued
                        .as_ref()
                        .is_none_or(|t| requires_refresh(t, now, jitter(uid, t.ttl_seconds)))
            }
        }
    }

    /// True when some token of `pods` is missing, due for refresh or due for a retry (cheap;
    /// no requests).
    pub(crate) fn due(&self, pods: &[&Pod]) -> bool {
        let now = Utc::now();
        pods.iter().any(|p| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            token_specs(p)
                .into_iter()
                .any(|s| self.is_due(&uid, &s, now))
        })
    }

    /// Requests the missing and due tokens of `pods` (concurrently) and forgets the tokens of
    /// pods not listed. True when what [`TokenManager::tokens`] returns changed.
    pub(crate) async fn sync(&mut self, ctx: &Ctx, pods: &[&Pod]) -> bool {
        let now = Utc::now();
        let mut changed = false;
        let mut wanted: Vec<(String, TokenSpec)> = Vec::new();
        let mut todo: Vec<(&Pod, String, TokenSpec)> = Vec::new();
        for p in pods {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if uid.is_empty() {
                continue;
            }
            for s in token_specs(p) {
                wanted.push((uid.clone(), s.clone()));
                let due = self.is_due(&uid, &s, now);
                if due {
                    todo.push((p, uid.clone(), s));
                }
            }
        }
        let before = self.entries.len();
        self.entries.retain(|k, _| wanted.contains(k));
        changed |= self.entries.len() != before;
        let results =
            futures::future::join_all(todo.iter().map(|(p, _, s)| request(ctx, p, s))).await;
        for ((p, uid, s), r) in todo.into_iter().zip(results) {
            let name = p.metadata.name.as_deref().unwrap_or("");
            let e = self
                .entries
                .entry((uid.clone(), s.clone()))
                .or_insert(Entry {
                    issued: None,
                    error: None,
                    retry_at: None,
                    retry_delay: RETRY_MIN,
                });
            match r {
                Ok(t) => {
                    tracing::info!(pod = %name, audience = %s.audience, expires = %t.expires,
                        "service account token issued");
                    e.issued = Some(t);
                    e.error = None;
                    e.retry_at = None;
                    e.retry_delay = RETRY_MIN;
                    changed = true;
                }
                Err(err) => {
                    let err = err.to_string();
                    tracing::warn!(pod = %name, "token request: {err} (retry in {:?})", e.retry_delay);
                    e.retry_at = Some(std::time::Instant::now() + e.retry_delay);
                    e.retry_delay = (e.retry_delay * 2).min(RETRY_MAX);
                    if e.error.as_deref() != Some(err.as_str()) {
                        e.error = Some(err);
                        changed = true;
                    }
                }
            }
        }
        // An expired token is no longer offered.
        for e in self.entries.values_mut() {
            if e.issued.as_ref().is_some_and(|t| t.expires <= now) {
                e.issued = None;
                changed = true;
            }
        }
        changed
    }

    /// The tokens by pod UID (a valid token, else the last error), for
    /// [`crate::worker::PodManager::set_tokens`].
    pub(crate) fn tokens(&self) -> BTreeMap<String, PodTokens> {
        let mut out: BTreeMap<String, PodTokens> = BTreeMap::new();
        for ((uid, s), e) in &self.entries {
            let v = match (&e.issued, &e.error) {
                (Some(t), _) => Ok(t.token.clone()),
                (None, Some(err)) => Err(err.clone()),
                (None, None) => continue,
            };
            out.entry(uid.clone()).or_default().insert(s.clone(), v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn refresh_at_80_percent_or_24h() {
        let t = Issued {
            token: "t".into(),
            expires: at(3607),
            ttl_seconds: 3607,
        };
        assert_eq!(t.issued_at(), at(0));
        let none = ChronoDuration::zero();
        // 80 % of 3607 s = 2885.6 s.
        assert!(!requires_refresh(&t, at(2885), none));
        assert!(requires_refresh(&t, at(2886), none));
        assert!(requires_refresh(&t, at(2880), ChronoDuration::seconds(10)));
        assert!(requires_refresh(&t, at(4000), none));
        // A one-year token (extended expiration) is refreshed after 24 h.
        let y = Issued {
            token: "t".into(),
            expires: at(365 * 86400),
            ttl_seconds: 365 * 86400,
        };
        assert!(!requires_refresh(&y, at(86399), none));
        assert!(requires_refresh(&y, at(86401), none));
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        for uid in ["a", "b-c", "0c5a9f0e-1111-4222-a333-444455556666"] {
            let j = jitter(uid, 3607);
            assert!(
                j >= ChronoDuration::zero() && j < ChronoDuration::seconds(10),
                "{j}"
            );
            assert_eq!(j, jitter(uid, 3607));
            let short = jitter(uid, 20);
            assert!(short < ChronoDuration::seconds(2), "{short}");
        }
        assert_eq!(jitter("x", 0), ChronoDuration::zero());
    }
}
