//! Synthetic Services, EndpointSlices and the peak-RSS reading shared by the proxier benches.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The render options of every bench (pod traffic from 10.128.0.0/9 is not masqueraded).
#[allow(dead_code)]
pub fn render_opts() -> hako_proxier::RenderOpts {
    hako_proxier::RenderOpts {
        cluster_cidr: Some("10.128.0.0/9".into()),
        ..hako_proxier::RenderOpts::default()
    }
}

/// A proxier over `backend` holding N services (`svc`) with E endpoints each (`slice`).
#[allow(dead_code)]
pub fn loaded_proxier(
    backend: Box<dyn hako_proxier::Backend>,
    n: usize,
    eps: usize,
) -> hako_proxier::Proxier {
    let mut p = hako_proxier::Proxier::new(
        backend,
        hako_proxier::ProxierOpts {
            hostname: "n".into(),
            render: render_opts(),
        },
    );
    for i in 0..n {
        p.on_service_add(svc(i));
        p.on_endpointslice_add(slice(i, eps));
    }
    p
}

/// N and E from the first two arguments (default 1,000 × 5).
#[allow(dead_code)]
pub fn size_args() -> (usize, usize) {
    let args: Vec<String> = std::env::args().collect();
    let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let eps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    (n, eps)
}

#[allow(dead_code)]
pub fn svc(i: usize) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: s{i}, namespace: bench}}\nspec: {{clusterIP: 10.{}.{}.{}, ports: [{{name: p, port: 80}}]}}",
        96 + i / 65536,
        (i / 256) % 256,
        i % 256
    ))
    .expect("svc")
}

#[allow(dead_code)]
pub fn slice(i: usize, eps: usize) -> EndpointSlice {
    let list: Vec<String> = (0..eps)
        .map(|e| {
            let n = i * eps + e;
            format!(
                "{{addresses: [10.{}.{}.{}], nodeName: n}}",
                128 + n / 65536,
                (n / 256) % 256,
                n % 256
            )
        })
        .collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]",
        list.join(",")
    ))
    .expect("slice")
}

/// Peak RSS (VmHWM), MiB.
#[allow(dead_code)]
pub fn rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Current RSS (VmRSS), MiB: what a daemon holds between syncs.
#[allow(dead_code)]
pub fn rss_now_mib() -> f64 {
    status_mib("VmRSS:")
}

fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}
