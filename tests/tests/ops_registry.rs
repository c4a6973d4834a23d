#![cfg(feature = "root")]
//! Root tests of the registry host configuration (containerd's `certs.d/<host>/hosts.toml`):
//! the registry fixture served over TLS with a private CA made here, pulled through hosts.toml
//! with `ca`, refused without it (naming the host and the certificate problem), `skip_verify`,
//! plain HTTP for a named registry, mirrors tried in order then the upstream, a mirror standing
//! in for a registry name that does not resolve (through `hako-shim pull
//! --registry-config-path`), and client certificates refused with a clear error.

use hako_shim::image::hosts::RegistryHosts;
use hako_shim::image::{ImageError, ImageStore, PullPolicy};
use hako_tests::agent::target_bin;
use hako_tests::netns::require_root;
use hako_tests::registry::{push_standard, Registry, RegistryOptions, TlsFiles};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A registry holding the standard images twice over the same storage: once over plain HTTP,
/// once over HTTPS with a certificate of a CA made for this test.
struct Fixture {
    plain: Registry,
    tls: Registry,
    /// The CA's certificate (PEM) at `dir/ca.crt`.
    ca: PathBuf,
    dir: tempfile::TempDir,
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A CA and a serving certificate for 127.0.0.1 and localhost signed by it.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, TlsFiles) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("hako test CA {name}"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let ca_path = dir.join(format!("{name}-ca.crt"));
    write(&ca_path, &ca.pem());
    let files = TlsFiles {
        cert: dir.join(format!("{name}-server.crt")),
        key: dir.join(format!("{name}-server.key")),
    };
    write(&files.cert, &cert.pem());
    write(&files.key, &key.serialize_pem());
    (ca_path, files)
}

impl Fixture {
    fn start() -> Fixture {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("hako-ops-registry-")
            .tempdir()
            .unwrap();
        let storage = dir.path().join("registry");
        let plain = Registry::start_with(RegistryOptions {
            dir: Some(storage.clone()),
            ..Default::default()
        })
        .expect("plain registry");
        push_standard(&plain.client()).expect("push the standard images");
        let (ca, files) = make_ca(dir.path(), "main");
        // Same storage, its own config and log: a second process serving it over TLS.
        let tls_dir = dir.path().join("registry-tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        std::os::unix::fs::symlink(storage.join("storage"), tls_dir.join("storage")).unwrap();
        let tls = Registry::start_with(RegistryOptions {
            dir: Some(tls_dir),
            tls: Some(files),
            ..Default::default()
        })
        .expect("TLS registry");
        Fixture {
            plain,
            tls,
            ca,
            dir,
        }
    }

    /// A fresh certs.d dir and image store under the fixture's dir.
    fn store(&self, name: &str) -> (PathBuf, ImageStore, PathBuf) {
        let certs = self.dir.path().join(name).join("certs.d");
        std::fs::create_dir_all(&certs).unwrap();
        let root = self.dir.path().join(name).join("images");
        let store = ImageStore::open(&root)
            .unwrap()
            .with_registry_hosts(RegistryHosts::at(&certs));
        (certs, store, root)
    }
}

/// A port on 127.0.0.1 nobody listens on (connections are refused).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn nothing_recorded(store: &ImageStore, root: &Path) {
    assert!(store.list().unwrap().is_empty(), "an image was recorded");
    let tmp: Vec<_> = std::fs::read_dir(root.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "a failed pull left files behind");
}

#[test]
fn private_ca_from_hosts_toml_and_refusal_without_it() {
    let fx = Fixture::start();
    let (certs, store, root) = fx.store("ca");
    let host = fx.tls.addr().to_string();
    let image = format!("{host}/busybox:plain");
    let hosts = certs.join(&host).join("hosts.toml");

    // HTTPS without the CA: refused, naming the host and the certificate problem.
    write(&hosts, &format!("server = \"https://{host}\"\n"));
    let e = store
        .ensure_blocking(&image, PullPolicy::Always, None)
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("without the CA: {msg}");
    assert!(matches!(e, ImageError::Registry(..)), "{e:?}");
    assert!(msg.contains(&image), "{msg}");
    assert!(
        msg.to_lowercase().contains("certificate") || msg.contains("UnknownIssuer"),
        "the refusal does not say why: {msg}"
    );
    assert!(msg.contains(&hosts.display().to_string()), "{msg}");
    nothing_recorded(&store, &root);

    // A CA that did not sign the server's certificate: refused too.
    let (other_ca, _) = make_ca(fx.dir.path(), "other");
    write(
        &hosts,
        &format!(
            "server = \"https://{host}\"\nca = \"{}\"\n",
            other_ca.display()
        ),
    );
    let e = store
        .ensure_blocking(&image, PullPolicy::Always, None)
        .unwrap_err();
    assert!(matches!(e, ImageError::Registry(..)), "{e:?}");
    nothing_recorded(&store, &root);

    // The right CA, as a path relative to the host's directory: pulled.
    std::fs::copy(&fx.ca, certs.join(&host).join("ca.crt")).unwrap();
    write(
        &hosts,
        &format!("server = \"https://{host}\"\nca = \"ca.crt\"\n"),
    );
    let img = store
        .ensure_blocking(&image, PullPolicy::Always, None)
        .expect("pull with the private CA");
    assert_eq!(img.reference, image);
    assert!(!img.layers.is_empty());
    for d in store.layer_dirs(&img) {
        assert!(d.join("bin").exists() || d.is_dir(), "{}", d.display());
    }

    // A missing CA file is named.
    write(
        &hosts,
        &format!("server = \"https://{host}\"\nca = \"/nonexistent/hako-ca.crt\"\n"),
    );
    let e = store
        .ensure_blocking(&image, PullPolicy::Always, None)
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/hako-ca.crt"), "{e}");
}

#[test]
fn skip_verify_pulls_without_the_ca() {
    let fx = Fixture::start();
    let (certs, store, _root) = fx.store("skip");
    let host = fx.tls.addr().to_string();
    write(
        &certs.join(&host).join("hosts.toml"),
        &format!("server = \"https://{host}\"\nskip_verify = true\n"),
    );
    let img = store
        .ensure_blocking(&format!("{host}/busybox:oci"), PullPolicy::Always, None)
        .expect("pull with skip_verify");
    assert!(!img.layers.is_empty());
}

#[test]
fn mirrors_are_tried_in_order_then_the_upstream() {
    let fx = Fixture::start();
    let (certs, store, _root) = fx.store("order");
    let host = fx.tls.addr().to_string();
    let dead = dead_port();
    // A dead mirror, a mirror that may only pull (not resolve a tag), then the upstream.
    write(
        &certs.join(&host).join("hosts.toml"),
        &format!(
            "server = \"https://{host}\"\nca = \"{ca}\"\n\n\
             [host.\"https://127.0.0.1:{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{plain}\"]\n  capabilities = [\"pull\"]\n",
            ca = fx.ca.display(),
            plain = fx.plain.addr(),
        ),
    );
    let img = store
        .ensure_blocking(&format!("{host}/busybox:sleep"), PullPolicy::Always, None)
        .expect("the upstream after a dead mirror");
    assert!(!img.layers.is_empty());

    // Every host failing: one error naming each host tried, in order.
    let (certs2, store2, root2) = fx.store("allfail");
    let dead2 = dead_port();
    write(
        &certs2.join(&host).join("hosts.toml"),
        &format!("server = \"https://127.0.0.1:{dead2}\"\n\n[host.\"https://127.0.0.1:{dead}\"]\n"),
    );
    let e = store2
        .ensure_blocking(&format!("{host}/busybox:sleep"), PullPolicy::Always, None)
        .unwrap_err()
        .to_string();
    eprintln!("every host failing: {e}");
    let (a, b) = (
        e.find(&format!("https://127.0.0.1:{dead}:")),
        e.find(&format!("https://127.0.0.1:{dead2}:")),
    );
    assert!(
        e.contains("every registry host failed") && a.is_some() && b.is_some() && a < b,
        "{e}"
    );
    nothing_recorded(&store2, &root2);
}

#[test]
fn a_mirror_serves_a_registry_name_that_does_not_resolve() {
    let fx = Fixture::start();
    let (certs, store, root) = fx.store("mirror");
    let name = format!("hako-mirror-{}.invalid", std::process::id());
    let image = format!("{name}/busybox:plain");

    // No configuration: the name does not resolve.
    let e = store
        .ensure_blocking(&image, PullPolicy::Always, None)
        .unwrap_err();
    assert!(matches!(e, ImageError::Registry(..)), "{e:?}");
    nothing_recorded(&store, &root);

    // The TLS registry as its mirror, through the hako-shim binary's flag.
    write(
        &certs.join(&name).join("hosts.toml"),
        &format!(
            "server = \"https://{name}\"\n\n[host.\"https://{tls}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
            tls = fx.tls.addr(),
            ca = fx.ca.display()
        ),
    );
    let out = Command::new(target_bin("hako-shim", "HAKO_SHIM_BIN"))
        .args(["pull", "--policy", "Always", "--image-root"])
        .arg(&root)
        .arg("--registry-config-path")
        .arg(&certs)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hako-shim pull through the mirror: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["image"]["reference"], image.as_str(), "{v}");
    // The store names the image by the name asked for, not by the mirror.
    let got = store.get(&image).unwrap().expect("recorded under its name");
    assert!(!got.layers.is_empty());

    // Plain HTTP for a named registry: the same name served by the plain registry.
    let (certs, store, _root) = fx.store("plainhttp");
    write(
        &certs.join(&name).join("hosts.toml"),
        &format!("server = \"http://{}\"\n", fx.plain.addr()),
    );
    store
        .ensure_blocking(&format!("{name}/busybox:oci"), PullPolicy::Always, None)
        .expect("plain HTTP for a named registry");
}

#[test]
fn client_certificates_are_refused_clearly() {
    let fx = Fixture::start();
    let (certs, store, root) = fx.store("client");
    let host = fx.tls.addr().to_string();
    write(
        &certs.join(&host).join("hosts.toml"),
        &format!(
            "server = \"https://{host}\"\nca = \"{}\"\nclient = [[\"client.crt\", \"client.key\"]]\n",
            fx.ca.display()
        ),
    );
    let e = store
        .ensure_blocking(&format!("{host}/busybox:plain"), PullPolicy::Always, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("client certificates") && e.contains("client.crt"),
        "{e}"
    );
    nothing_recorded(&store, &root);
}

#[test]
fn the_agent_pulls_a_pod_image_through_registry_config_path() {
    use hako_tests::agent::AgentEnv;
    use std::time::Duration;
    let mut env = AgentEnv::new("oreg");
    // A registry name that does not resolve, served over plain HTTP by the fixture's registry
    // (inside the agent's namespace) as its hosts.toml says.
    let name = format!("hako-agent-mirror-{}.invalid", std::process::id());
    let certs = env.tmp.path().join("certs.d");
    write(
        &certs.join(&name).join("hosts.toml"),
        &format!(
            "server = \"https://{name}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            env.registry.addr()
        ),
    );
    let image = format!("{name}/busybox:sleep");
    env.write_manifest(
        "mirror.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: mirrored}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{image}\", imagePullPolicy: Always}}\n"
        ),
    );
    env.args = vec![
        "--registry-config-path".into(),
        certs.to_string_lossy().into_owned(),
    ];
    env.start();
    let r = env.wait_running("mirrored", Duration::from_secs(90));
    let st = &r["pod"]["status"]["containerStatuses"][0];
    assert_eq!(st["image"], image.as_str(), "{st}");
}
