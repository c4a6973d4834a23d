//! Synthetic Services, EndpointSlices and the peak-RSS reading shared by the proxier benches.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

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
