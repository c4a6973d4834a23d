//! Pod `/etc/resolv.conf` and `/etc/hosts` contents, after the kubelet's dns configurer and
//! managed hosts file (pure).

use k8s_openapi::api::core::v1::Pod;

/// Node-level DNS settings (kubelet `--cluster-dns`, `--cluster-domain`, `--resolv-conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// Cluster DNS server IPs.
    pub cluster_dns: Vec<String>,
    /// Cluster domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// The host's resolv.conf (used by dnsPolicy Default and as extra search paths).
    pub host: ResolvConf,
}

/// A parsed or generated resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// nameserver lines.
    pub nameservers: Vec<String>,
    /// search domains.
    pub searches: Vec<String>,
    /// options (`ndots:5`, `edns0`).
    pub options: Vec<String>,
}

const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;

impl ResolvConf {
    /// Parses resolv.conf text (nameserver/search/domain/options lines).
    pub fn parse(text: &str) -> Self {
        let mut r = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut f = line.split_whitespace();
            match f.next() {
                Some("nameserver") => r.nameservers.extend(f.next().map(str::to_string)),
                Some("search") | Some("domain") => r.searches = f.map(str::to_string).collect(),
                Some("options") => r.options.extend(f.map(str::to_string)),
                _ => {}
            }
        }
        r
    }

    /// Renders the file (search, nameservers, options — containerd's order).
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.searches.is_empty() {
            s.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for n in &self.nameservers {
            s.push_str(&format!("nameserver {n}\n"));
        }
        if !self.options.is_empty() {
            s.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        s
    }
}

fn push_unique(v: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !v.contains(&i) {
            v.push(i);
        }
    }
}

fn merge_options(base: &mut Vec<String>, extra: &[(String, Option<String>)]) {
    for (name, value) in extra {
        base.retain(|o| o.split(':').next() != Some(name.as_str()));
        base.push(match value {
            Some(v) => format!("{name}:{v}"),
            None => name.clone(),
        });
    }
}

/// The pod's resolv.conf for its dnsPolicy (ClusterFirst, ClusterFirstWithHostNet, Default,
/// None) merged with `spec.dnsConfig`.
pub fn pod_resolv_conf(pod: &Pod, dns: &DnsSettings) -> ResolvConf {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref();
    let host_net = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    if (policy == "ClusterFirst" && host_net)
        || (policy.starts_with("ClusterFirst") && dns.cluster_dns.is_empty())
    {
        policy = "Default";
    }
    let mut r = match policy {
        "None" => ResolvConf::default(),
        "Default" => dns.host.clone(),
        _ => {
            let d = &dns.cluster_domain;
            let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
            push_unique(&mut searches, dns.host.searches.iter().cloned());
            ResolvConf {
                nameservers: dns.cluster_dns.clone(),
                searches,
                options: vec!["ndots:5".into()],
            }
        }
    };
    if let Some(cfg) = spec.and_then(|s| s.dns_config.as_ref()) {
        push_unique(
            &mut r.nameservers,
            cfg.nameservers.iter().flatten().cloned(),
        );
        push_unique(&mut r.searches, cfg.searches.iter().flatten().cloned());
        let opts: Vec<(String, Option<String>)> = cfg
            .options
            .iter()
            .flatten()
            .map(|o| (o.name.clone().unwrap_or_default(), o.value.clone()))
            .collect();
        merge_options(&mut r.options, &opts);
    }
    r.nameservers.truncate(MAX_NAMESERVERS);
    r.searches.truncate(MAX_SEARCHES);
    r
}

/// The pod's hostname: `spec.hostname` or the pod name, at most 63 characters.
pub fn pod_hostname(pod: &Pod) -> String {
    let h = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    let mut h: String = h.chars().take(63).collect();
    while h.ends_with(['-', '.']) {
        h.pop();
    }
    h
}

/// The `/etc/hosts` of a `hostNetwork` pod, as the kubelet writes it: the node's own
/// `/etc/hosts` under a "(host network)" header (which is not the header of a pod-network file,
/// so tools and the upstream KubeletManagedEtcHosts spec tell them apart), then hostAliases.
pub fn host_network_hosts_file(pod: &Pod, node_hosts: &str) -> String {
    let mut s = String::from("# Kubernetes-managed hosts file (host network).\n");
    s.push_str(node_hosts);
    if !node_hosts.is_empty() && !node_hosts.ends_with('\n') {
        s.push('\n');
    }
    push_host_aliases(&mut s, pod);
    s
}

fn push_host_aliases(s: &mut String, pod: &Pod) {
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        s.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            s.push_str(&format!(
                "{}\t{}\n",
                a.ip,
                a.hostnames
                    .iter()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\t")
            ));
        }
    }
}

/// The kubelet-managed `/etc/hosts`: localhost entries, the pod's IPs with hostname (FQDN when
/// `subdomain` is set), then hostAliases.
pub fn pod_hosts_file(pod: &Pod, pod_ips: &[String], cluster_domain: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let host = pod_hostname(pod);
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sub = pod
        .spec
        .as_ref()
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty());
    for ip in pod_ips {
        match sub {
            Some(sub) => s.push_str(&format!(
                "{ip}\t{host}.{sub}.{ns}.svc.{cluster_domain}\t{host}\n"
            )),
            None => s.push_str(&format!("{ip}\t{host}\n")),
        }
    }
    push_host_aliases(&mut s, pod);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn settings() -> DnsSettings {
        DnsSettings {
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: "cluster.local".into(),
            host: ResolvConf::parse("nameserver 192.0.2.53\nsearch corp.example\noptions edns0\n"),
        }
    }

    #[test]
    fn resolv_conf_table() {
        let base = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: prod}\nspec:\n  containers: [{name: c, image: i}]\n";
        let table: Vec<(&str, String, &str)> = vec![
            ("cluster first", base.to_string(),
             "search prod.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n"),
            ("default", format!("{base}  dnsPolicy: Default\n"),
             "search corp.example\nnameserver 192.0.2.53\noptions edns0\n"),
            ("host network falls back to Default", format!("{base}  hostNetwork: true\n"),
             "search corp.example\nnameserver 192.0.2.53\noptions edns0\n"),
            ("none with dnsConfig", format!("{base}  dnsPolicy: None\n  dnsConfig:\n    nameservers: [1.1.1.1]\n    searches: [a.example]\n    options: [{{name: ndots, value: \"2\"}}, {{name: edns0}}]\n"),
             "search a.example\nnameserver 1.1.1.1\noptions ndots:2 edns0\n"),
            ("cluster first with dnsConfig override", format!("{base}  dnsConfig:\n    nameservers: [1.1.1.1]\n    options: [{{name: ndots, value: \"1\"}}]\n"),
             "search prod.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\nnameserver 1.1.1.1\noptions ndots:1\n"),
        ];
        for (name, y, want) in table {
            assert_eq!(
                pod_resolv_conf(&pod(&y), &settings()).render(),
                want,
                "{name}"
            );
        }
        let mut no_dns = settings();
        no_dns.cluster_dns.clear();
        assert_eq!(
            pod_resolv_conf(&pod(base), &no_dns).render(),
            "search corp.example\nnameserver 192.0.2.53\noptions edns0\n"
        );
    }

    #[test]
    fn host_network_hosts_keep_the_node_file() {
        let p = pod("spec:\n  hostNetwork: true\n  hostAliases:\n  - ip: 1.2.3.4\n    hostnames: [a, b]\n  containers: []\n");
        let got = host_network_hosts_file(&p, "127.0.0.1 localhost\n10.1.1.1 node-a");
        assert_eq!(
            got,
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n10.1.1.1 node-a\n\n# Entries added by HostAliases.\n1.2.3.4\ta\tb\n"
        );
        // The pod-network header is not a prefix of this one (the upstream spec checks that).
        assert!(!got.contains("# Kubernetes-managed hosts file.\n"));
    }

    #[test]
    fn hosts_table() {
        let head = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n";
        let table = vec![
            ("plain", "metadata: {name: web, namespace: ns}\nspec: {containers: []}", "10.0.0.5\tweb\n"),
            ("hostname+subdomain", "metadata: {name: web-0, namespace: ns}\nspec: {hostname: web-0, subdomain: nginx, containers: []}", "10.0.0.5\tweb-0.nginx.ns.svc.cluster.local\tweb-0\n"),
            ("aliases", "metadata: {name: web, namespace: ns}\nspec: {containers: [], hostAliases: [{ip: 192.0.2.1, hostnames: [a, b]}]}", "10.0.0.5\tweb\n\n# Entries added by HostAliases.\n192.0.2.1\ta\tb\n"),
        ];
        for (name, y, tail) in table {
            assert_eq!(
                pod_hosts_file(&pod(y), &["10.0.0.5".into()], "cluster.local"),
                format!("{head}{tail}"),
                "{name}"
            );
        }
    }
}
