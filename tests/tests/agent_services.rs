//! Root test of the agent's standalone Services: the runner turns a Service and local pod
//! status into real iptables rules (in a fresh node namespace) that route the ClusterIP to a
//! server in a "pod" namespace, and a readiness flip takes the pod out of the rules.
#![cfg(feature = "root")]

use hako_agent::proxy::standalone::ServiceRunner;
use hako_tests::Topology;
use k8s_openapi::api::core::v1::{Pod, Service};

const SVC: &str = r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.77.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

fn pod(ip: &str, ready: bool) -> Pod {
    serde_yaml::from_str(&format!(
        r#"
metadata: {{name: web-1, namespace: default, uid: u-web-1, labels: {{app: web}}}}
spec:
  nodeName: node-a
  containers: [{{name: httpd, image: busybox, ports: [{{name: http, containerPort: 8080}}]}}]
status:
  phase: Running
  podIP: "{ip}"
  podIPs: [{{ip: "{ip}"}}]
  conditions: [{{type: Ready, status: "{}"}}]
"#,
        if ready { "True" } else { "False" }
    ))
    .expect("pod")
}

#[test]
fn cluster_ip_reaches_the_ready_pod_and_not_the_unready_one() {
    hako_tests::require_root();
    let topo = Topology::new(1, 1500).expect("topology");
    let node = &topo.nodes[0];
    node.add_bridge("cbr0", "10.244.7.1/24").expect("bridge");
    let podns = node
        .add_pod("cbr0", "10.244.7.2/24", "10.244.7.1")
        .expect("pod ns");
    node.ns
        .ip(&["route", "add", "default", "dev", "cbr0"])
        .expect("default route");
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), "hello from the pod\n").expect("page");
    let mut httpd = podns
        .command("busybox")
        .args(["httpd", "-f", "-p", "8080", "-h"])
        .arg(www.path())
        .spawn()
        .expect("httpd");
    // Wait for the server inside the pod.
    let mut up = false;
    for _ in 0..50 {
        if podns
            .sh("wget -q -T 1 -O - http://127.0.0.1:8080/ >/dev/null")
            .is_ok()
        {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(up, "httpd in the pod namespace did not come up");

    let svc: Service = serde_yaml::from_str(SVC).expect("service");
    let fetch = || {
        node.ns
            .sh_output("curl -s --max-time 2 http://10.96.77.10/")
            .expect("curl")
    };
    let result = node.ns.run(|| -> Result<(), String> {
        let mut runner = ServiceRunner::iptables("node-a", "", None);
        // No rules yet: nothing answers on the ClusterIP.
        let before = std::process::Command::new("curl")
            .args(["-s", "--max-time", "1", "http://10.96.77.10/"])
            .output()
            .map_err(|e| e.to_string())?;
        if before.status.success() {
            return Err("ClusterIP answered before any rule".into());
        }
        let o = runner
            .update(vec![svc.clone()], &[pod("10.244.7.2", true)])
            .map_err(|e| e.to_string())?;
        if !o.synced || o.slices != 1 {
            return Err(format!("unexpected outcome {o:?}"));
        }
        Ok(())
    });
    result
        .expect("runner in the node namespace")
        .expect("first sync");
    let out = fetch();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the pod\n",
        "ClusterIP through the rules; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = node.ns.sh("iptables-save -t nat").expect("save");
    assert!(rules.contains("10.244.7.2:8080"), "{rules}");

    // Readiness flips: the endpoint leaves, the Service has none and rejects.
    node.ns
        .run(|| {
            let mut runner = ServiceRunner::iptables("node-a", "", None);
            runner
                .update(vec![svc.clone()], &[pod("10.244.7.2", false)])
                .map(|o| o.synced)
                .map_err(|e| e.to_string())
        })
        .expect("run")
        .expect("sync not ready");
    let out = fetch();
    assert!(!out.status.success(), "unready pod still served");
    let rules = node.ns.sh("iptables-save").expect("save");
    assert!(!rules.contains("10.244.7.2:8080"), "{rules}");
    assert!(
        rules.contains("has no endpoints"),
        "REJECT rule for the empty Service: {rules}"
    );

    let _ = httpd.kill();
    let _ = httpd.wait();
}
