//! `--kubeconfig` mode: kube-rs watchers for Services and discovery/v1 EndpointSlices
//! feeding the proxier. The mapping of watch events to proxier calls is pure
//! ([`Mapper`]); the watchers run on their own thread with a tokio runtime, retry with
//! back-off on every error and never end on a transient failure.

use std::collections::BTreeMap;
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

/// A watch event of either kind (moved once through a channel; not boxed).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum WatchEvent {
    /// Services.
    Service(Event<Service>),
    /// EndpointSlices.
    Slice(Event<EndpointSlice>),
}

/// Where the mapped events go (the proxier, or a recorder in tests).
pub trait Sink {
    /// Object added or changed.
    fn service_update(&mut self, svc: Service);
    /// Object deleted.
    fn service_delete(&mut self, svc: &Service);
    /// Object added or changed.
    fn slice_update(&mut self, slice: EndpointSlice);
    /// Object deleted.
    fn slice_delete(&mut self, slice: &EndpointSlice);
    /// The complete set after a (re)list.
    fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>);
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
    fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        Proxier::replace_all(self, services, slices);
    }
}

type Key = (String, String);

fn key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// Maps watch events to proxier calls: updates and deletes pass through; a relist
/// (`Init` … `InitApply` … `InitDone`) is buffered and handed over as one `replace_all`
/// with the current objects of both kinds, so objects deleted while the watch was down
/// disappear.
#[derive(Debug, Default)]
pub struct Mapper {
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    svc_buf: Option<BTreeMap<Key, Service>>,
    slice_buf: Option<BTreeMap<Key, EndpointSlice>>,
    svc_listed: bool,
    slices_listed: bool,
}

impl Mapper {
    /// Whether both kinds have been listed once (before that a sync would program a
    /// partial picture: services without their endpoints).
    pub fn ready(&self) -> bool {
        self.svc_listed && self.slices_listed
    }

    fn replace(&self, sink: &mut dyn Sink) {
        sink.replace_all(
            self.services.values().cloned().collect(),
            self.slices.values().cloned().collect(),
        );
    }

    /// Handles one event.
    pub fn handle(&mut self, ev: WatchEvent, sink: &mut dyn Sink) {
        match ev {
            WatchEvent::Service(e) => match e {
                Event::Apply(o) => {
                    self.services.insert(key(&o.metadata), o.clone());
                    sink.service_update(o);
                }
                Event::Delete(o) => {
                    self.services.remove(&key(&o.metadata));
                    sink.service_delete(&o);
                }
                Event::Init => self.svc_buf = Some(BTreeMap::new()),
                Event::InitApply(o) => {
                    self.svc_buf
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&o.metadata), o);
                }
                Event::InitDone => {
                    self.services = self.svc_buf.take().unwrap_or_default();
                    self.svc_listed = true;
                    info!(services = self.services.len(), "Services listed");
                    self.replace(sink);
                }
            },
            WatchEvent::Slice(e) => match e {
                Event::Apply(o) => {
                    self.slices.insert(key(&o.metadata), o.clone());
                    sink.slice_update(o);
                }
                Event::Delete(o) => {
                    self.slices.remove(&key(&o.metadata));
                    sink.slice_delete(&o);
                }
                Event::Init => self.slice_buf = Some(BTreeMap::new()),
                Event::InitApply(o) => {
                    self.slice_buf
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&o.metadata), o);
                }
                Event::InitDone => {
                    self.slices = self.slice_buf.take().unwrap_or_default();
                    self.slices_listed = true;
                    info!(slices = self.slices.len(), "EndpointSlices listed");
                    self.replace(sink);
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
    let cfg = watcher::Config::default().labels(LABEL_SELECTOR);
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
        fn replace_all(&mut self, svcs: Vec<Service>, slices: Vec<EndpointSlice>) {
            let s: Vec<String> = svcs.iter().map(|s| name(&s.metadata)).collect();
            let l: Vec<String> = slices.iter().map(|s| name(&s.metadata)).collect();
            self.0
                .push(format!("replace [{}] [{}]", s.join(","), l.join(",")));
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
                "replace [a,b] []",
                "replace [a,b] [a-1]",
                "svc+ c",
                "slice+ c-1",
                "svc- a",
                "slice- a-1",
                "replace [c,d] [c-1]",
            ]
        );
        // Ready only once both kinds were listed.
        assert_eq!(ready.iter().position(|r| *r), Some(6));
    }

    #[test]
    fn a_bad_kubeconfig_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("hako-kc-{}", std::process::id()));
        let (tx, _rx) = std::sync::mpsc::channel();
        let e = spawn_watchers(&dir.join("missing"), tx).expect_err("missing file");
        assert!(e.to_string().contains("reading kubeconfig"), "{e}");
    }
}
