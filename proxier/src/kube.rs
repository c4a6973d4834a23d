//! `--kubeconfig` mode: kube-rs watchers for Services and discovery/v1 EndpointSlices
//! feeding the proxier. The mapping of watch events to proxier calls is pure
//! ([`Mapper`]); the watchers run on their own thread with a tokio runtime, retry with
//! back-off on every error and never end on a transient failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::{Api, Client};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{info, warn};

use crate::proxier::Proxier;

/// Objects kube-proxy leaves to another proxy or skips (headless), as a label selector.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Objects per page of the initial list (kube-proxy's informers use 500 as well): the
/// watcher holds at most one page of k8s objects at a time.
pub const PAGE_SIZE: u32 = 500;

/// A watch event of either kind (moved once through a channel; not boxed).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum WatchEvent {
    /// Services.
    Service(Event<Service>),
    /// EndpointSlices.
    Slice(Event<EndpointSlice>),
}

/// Where the mapped events go (the proxier, or a recorder in tests). Every object is handed
/// over as it arrives and not kept here: the sink converts it to its compact form.
pub trait Sink {
    /// Object added or changed.
    fn service_update(&mut self, svc: Service);
    /// Object deleted.
    fn service_delete(&mut self, svc: &Service);
    /// Object added or changed.
    fn slice_update(&mut self, slice: EndpointSlice);
    /// Object deleted.
    fn slice_delete(&mut self, slice: &EndpointSlice);
    /// End of a (re)list of Services: forget every Service whose namespace/name is not in
    /// `listed` (deleted while the watch was down).
    fn retain_services(&mut self, listed: &BTreeSet<Key>);
    /// End of a (re)list of EndpointSlices: the same for slices.
    fn retain_slices(&mut self, listed: &BTreeSet<Key>);
}

impl Sink for Proxier {
    fn service_update(&mut self, svc: Service) {
        self.on_service_update(svc);
    }
    fn service_delete(&mut self, svc: &Service) {
        self.on_service_delete(svc);
    }
    fn slice_update(&mut self, slice: EndpointSlice) {
        self.on_endpointslice_update(slice);
    }
    fn slice_delete(&mut self, slice: &EndpointSlice) {
        self.on_endpointslice_delete(slice);
    }
    fn retain_services(&mut self, listed: &BTreeSet<Key>) {
        Proxier::retain_services(self, |ns, name| {
            listed.contains(&(ns.to_string(), name.to_string()))
        });
    }
    fn retain_slices(&mut self, listed: &BTreeSet<Key>) {
        Proxier::retain_slices(self, |ns, name| {
            listed.contains(&(ns.to_string(), name.to_string()))
        });
    }
}

/// Namespace and name of an object (the namespace defaults as the model's keys do).
pub type Key = (String, String);

fn key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// Maps watch events to sink calls. Every object goes to the sink as it arrives (a listed
/// one as an update) and is dropped: no copy of the k8s objects is kept here, only, while a
/// (re)list (`Init` … `InitApply` … `InitDone`) runs, the namespace/name of what it listed,
/// so that at its end the sink forgets what is gone (deleted while the watch was down).
/// The list itself comes in pages (`limit`/`continue`, [`PAGE_SIZE`]) from the watcher.
#[derive(Debug, Default)]
pub struct Mapper {
    svc_seen: Option<BTreeSet<Key>>,
    slice_seen: Option<BTreeSet<Key>>,
    svc_listed: bool,
    slices_listed: bool,
}

impl Mapper {
    /// Whether both kinds have been listed once (before that a sync would program a
    /// partial picture: services without their endpoints).
    pub fn ready(&self) -> bool {
        self.svc_listed && self.slices_listed
    }

    /// Handles one event.
    pub fn handle(&mut self, ev: WatchEvent, sink: &mut dyn Sink) {
        match ev {
            WatchEvent::Service(e) => match e {
                Event::Apply(o) => sink.service_update(o),
                Event::Delete(o) => sink.service_delete(&o),
                Event::Init => self.svc_seen = Some(BTreeSet::new()),
                Event::InitApply(o) => {
                    self.svc_seen
                        .get_or_insert_with(BTreeSet::new)
                        .insert(key(&o.metadata));
                    sink.service_update(o);
                }
                Event::InitDone => {
                    let seen = self.svc_seen.take().unwrap_or_default();
                    self.svc_listed = true;
                    info!(services = seen.len(), "Services listed");
                    sink.retain_services(&seen);
                }
            },
            WatchEvent::Slice(e) => match e {
                Event::Apply(o) => sink.slice_update(o),
                Event::Delete(o) => sink.slice_delete(&o),
                Event::Init => self.slice_seen = Some(BTreeSet::new()),
                Event::InitApply(o) => {
                    self.slice_seen
                        .get_or_insert_with(BTreeSet::new)
                        .insert(key(&o.metadata));
                    sink.slice_update(o);
                }
                Event::InitDone => {
                    let seen = self.slice_seen.take().unwrap_or_default();
                    self.slices_listed = true;
                    info!(slices = seen.len(), "EndpointSlices listed");
                    sink.retain_slices(&seen);
                }
            },
        }
    }
}

/// Why the watchers did not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The kubeconfig file could not be read or parsed.
    #[error("reading kubeconfig {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong (in the message; not a `source`, so it is printed once).
        error: ::kube::config::KubeconfigError,
    },
    /// The kubeconfig does not make a client configuration.
    #[error("kubeconfig {}: {error}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: ::kube::config::KubeconfigError,
    },
    /// The client could not be built.
    #[error("{0}")]
    Client(::kube::Error),
    /// The watchers' runtime or thread could not start.
    #[error("{0}")]
    Io(std::io::Error),
}

/// Reads `kubeconfig` (errors are reported at once) and starts the watchers on a thread of
/// their own; events arrive on `tx`. The watchers retry with back-off forever; the thread
/// ends only when `tx`'s receiver is gone.
pub fn spawn_watchers(
    kubeconfig: &Path,
    tx: Sender<WatchEvent>,
) -> Result<std::thread::JoinHandle<()>, WatchError> {
    let kc =
        ::kube::config::Kubeconfig::read_from(kubeconfig).map_err(|error| WatchError::Read {
            path: kubeconfig.to_path_buf(),
            error,
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WatchError::Io)?;
    let config = rt
        .block_on(::kube::Config::from_custom_kubeconfig(
            kc,
            &::kube::config::KubeConfigOptions::default(),
        ))
        .map_err(|error| WatchError::Config {
            path: kubeconfig.to_path_buf(),
            error,
        })?;
    // The client spawns its request buffer on the runtime.
    let client = {
        let _rt = rt.enter();
        Client::try_from(config).map_err(WatchError::Client)?
    };
    std::thread::Builder::new()
        .name("kube-watch".into())
        .spawn(move || rt.block_on(run(client, tx)))
        .map_err(WatchError::Io)
}

async fn run(client: Client, tx: Sender<WatchEvent>) {
    // A paginated list (`limit`/`continue`), then a watch from its resourceVersion; a 410
    // Gone (history compacted) makes the watcher list again.
    let cfg = watcher::Config::default()
        .labels(LABEL_SELECTOR)
        .page_size(PAGE_SIZE);
    let mut svcs = watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone())
        .default_backoff()
        .boxed();
    let mut slices = watcher::watcher(Api::<EndpointSlice>::all(client), cfg)
        .default_backoff()
        .boxed();
    loop {
        let ev = tokio::select! {
            Some(r) = svcs.next() => r.map(WatchEvent::Service),
            Some(r) = slices.next() => r.map(WatchEvent::Slice),
            else => return,
        };
        match ev {
            Ok(ev) => {
                if tx.send(ev).is_err() {
                    return;
                }
            }
            Err(e) => warn!(error = %e, "watch failed; retrying with back-off"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<String>);

    fn name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
        m.name.clone().unwrap_or_default()
    }

    impl Sink for Rec {
        fn service_update(&mut self, s: Service) {
            self.0.push(format!("svc+ {}", name(&s.metadata)));
        }
        fn service_delete(&mut self, s: &Service) {
            self.0.push(format!("svc- {}", name(&s.metadata)));
        }
        fn slice_update(&mut self, s: EndpointSlice) {
            self.0.push(format!("slice+ {}", name(&s.metadata)));
        }
        fn slice_delete(&mut self, s: &EndpointSlice) {
            self.0.push(format!("slice- {}", name(&s.metadata)));
        }
        fn retain_services(&mut self, listed: &BTreeSet<Key>) {
            let n: Vec<&str> = listed.iter().map(|k| k.1.as_str()).collect();
            self.0.push(format!("svc= [{}]", n.join(",")));
        }
        fn retain_slices(&mut self, listed: &BTreeSet<Key>) {
            let n: Vec<&str> = listed.iter().map(|k| k.1.as_str()).collect();
            self.0.push(format!("slice= [{}]", n.join(",")));
        }
    }

    fn svc(n: &str) -> Service {
        serde_yaml::from_str(&format!("metadata: {{name: {n}, namespace: ns}}")).expect("svc")
    }
    fn sl(n: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {n}, namespace: ns}}\naddressType: IPv4\nendpoints: []"
        ))
        .expect("slice")
    }

    #[test]
    fn events_map_to_proxier_calls() {
        use WatchEvent::{Service as S, Slice as L};
        let mut m = Mapper::default();
        let mut r = Rec::default();
        let evs = vec![
            S(Event::Init),
            S(Event::InitApply(svc("a"))),
            S(Event::InitApply(svc("b"))),
            S(Event::InitDone),
            L(Event::Init),
            L(Event::InitApply(sl("a-1"))),
            L(Event::InitDone),
            S(Event::Apply(svc("c"))),
            L(Event::Apply(sl("c-1"))),
            S(Event::Delete(svc("a"))),
            L(Event::Delete(sl("a-1"))),
            // A relist after a watch failure: b is gone, d is new; slices unchanged.
            S(Event::Init),
            S(Event::InitApply(svc("c"))),
            S(Event::InitApply(svc("d"))),
            S(Event::InitDone),
        ];
        let mut ready = Vec::new();
        for e in evs {
            m.handle(e, &mut r);
            ready.push(m.ready());
        }
        assert_eq!(
            r.0,
            [
                // Listed objects go through at once; the end of the list names them all.
                "svc+ a",
                "svc+ b",
                "svc= [a,b]",
                "slice+ a-1",
                "slice= [a-1]",
                "svc+ c",
                "slice+ c-1",
                "svc- a",
                "slice- a-1",
                "svc+ c",
                "svc+ d",
                "svc= [c,d]",
            ]
        );
        // Ready only once both kinds were listed.
        assert_eq!(ready.iter().position(|r| *r), Some(6));
        // Nothing of the objects stays in the mapper between lists.
        assert!(m.svc_seen.is_none() && m.slice_seen.is_none());
    }

    fn full_svc(n: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {n}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}"
        ))
        .expect("svc")
    }
    fn full_slice(svc: &str, ip: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {svc}-1, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [{ip}], nodeName: n1}}]"
        ))
        .expect("slice")
    }

    fn list_both(m: &mut Mapper, p: &mut Proxier, svcs: &[(&str, &str)], eps: &[(&str, &str)]) {
        use WatchEvent::{Service as S, Slice as L};
        m.handle(S(Event::Init), p);
        for (n, ip) in svcs {
            m.handle(S(Event::InitApply(full_svc(n, ip))), p);
        }
        m.handle(S(Event::InitDone), p);
        m.handle(L(Event::Init), p);
        for (n, ip) in eps {
            m.handle(L(Event::InitApply(full_slice(n, ip))), p);
        }
        m.handle(L(Event::InitDone), p);
    }

    #[test]
    fn a_relist_into_the_proxier_forgets_what_it_did_not_name() {
        let fake = crate::FakeIptables::default();
        let mut p = Proxier::new(
            Box::new(crate::IptablesBackend::new(fake, Default::default())),
            crate::ProxierOpts {
                hostname: "n1".into(),
                ..Default::default()
            },
        );
        let mut m = Mapper::default();
        list_both(
            &mut m,
            &mut p,
            &[("a", "10.96.0.1"), ("b", "10.96.0.2")],
            &[("a", "10.244.0.1"), ("b", "10.244.0.2")],
        );
        p.sync().expect("first sync");
        let names =
            |p: &Proxier| -> Vec<String> { p.model().keys().map(|k| k.name.clone()).collect() };
        assert_eq!(names(&p), ["a", "b"]);
        let eps = |p: &Proxier, n: &str| -> Vec<String> {
            p.model()
                .iter()
                .filter(|(k, _)| k.name == n)
                .flat_map(|(_, v)| {
                    v.iter()
                        .flat_map(|sp| sp.endpoints.iter().map(|e| e.addr()))
                })
                .collect()
        };
        assert_eq!(eps(&p, "a"), ["10.244.0.1:8080"]);
        // Locality is decided at conversion, from the node name.
        assert!(p
            .model()
            .values()
            .all(|v| v.iter().all(|sp| sp.endpoints.iter().all(|e| e.local))));
        // The same list again: nothing changed, so the sync writes nothing.
        list_both(
            &mut m,
            &mut p,
            &[("a", "10.96.0.1"), ("b", "10.96.0.2")],
            &[("a", "10.244.0.1"), ("b", "10.244.0.2")],
        );
        let st = p.sync().expect("no-op sync");
        assert!(st.is_idle(), "{st:?}");
        // b and its slice were deleted while the watch was down; a's endpoint moved.
        list_both(
            &mut m,
            &mut p,
            &[("a", "10.96.0.1")],
            &[("a", "10.244.0.9")],
        );
        p.sync().expect("sync after relist");
        assert_eq!(names(&p), ["a"]);
        assert_eq!(eps(&p, "a"), ["10.244.0.9:8080"]);
    }

    #[test]
    fn a_bad_kubeconfig_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("hako-kc-{}", std::process::id()));
        let (tx, _rx) = std::sync::mpsc::channel();
        let e = spawn_watchers(&dir.join("missing"), tx).expect_err("missing file");
        assert!(e.to_string().contains("reading kubeconfig"), "{e}");
    }
}
