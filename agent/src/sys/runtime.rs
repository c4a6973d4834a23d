//! Containers through `hako-shim` (effectful where noted): the container id and the agent's
//! per-container metadata file (`<root>/pods/<uid>/containers/<id>.json`, which maps a shim
//! container back to its pod, name, attempt and spec hash after an agent restart), the
//! ContainerSpec built from the pod (pure: image ENTRYPOINT/CMD rules, env, user and
//! securityContext, resources → cgroup, oom_score_adj, mounts), and observation of a
//! container's state from the shim.

use crate::model::observed::{ObservedContainer, ProbeView, RuntimeState};
use crate::model::qos;
use hako_shim::capabilities::DEFAULT_CAPS;
use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::image::{process_for, Image};
use hako_shim::seccomp::SeccompProfile;
use hako_shim::spec::{CgroupSpec, ContainerSpec, LogSpec, Mount, NamespacePaths, Rootfs, User};
use hako_shim::state::{State, Status};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a container's spec could not be built: the message of its CreateContainerConfigError
/// (the Display text is what events and the container's waiting message carry).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// runAsNonRoot with runAsUser 0 (kubelet `verifyRunAsNonRoot`).
    #[error("container's runAsUser breaks non-root policy")]
    RunAsUserRoot,
    /// runAsNonRoot and the image's user is root or unset.
    #[error("container has runAsNonRoot and image will run as root")]
    ImageRunsAsRoot,
    /// runAsNonRoot and the image names its user, which cannot be checked.
    #[error(
        "container has runAsNonRoot and image has non-numeric user ({0}), cannot verify user is non-root"
    )]
    NonNumericUser(String),
    /// Neither the container nor the image gives a command.
    #[error("no command specified")]
    NoCommand,
    /// `type: Localhost` without `localhostProfile`.
    #[error("seccompProfile type Localhost needs localhostProfile")]
    LocalhostWithoutProfile,
    /// A seccomp profile type other than Unconfined, RuntimeDefault or Localhost.
    #[error("unknown seccompProfile type {0:?}")]
    UnknownSeccompType(String),
    /// The Localhost profile could not be read or parsed.
    #[error(transparent)]
    LocalhostProfile(#[from] hako_shim::seccomp::localhost::LocalhostError),
    /// A capability name the shim does not know.
    #[error(transparent)]
    Capability(#[from] hako_shim::capabilities::UnknownCapability),
    /// The profile does not compile for the container's capabilities.
    #[error(transparent)]
    Seccomp(#[from] hako_shim::seccomp::SeccompError),
}

/// What the agent records of each container it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerMeta {
    /// Runtime id.
    pub id: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub name: String,
    /// Attempt (restart count).
    pub attempt: u32,
    /// `actions::container_hash` of the spec it was created from.
    pub spec_hash: String,
    /// Image reference as in the spec.
    pub image: String,
    /// Image id (config digest).
    pub image_id: String,
    /// Host path of its termination-log file.
    pub termination_log: PathBuf,
    /// Its CRI log file.
    pub log_path: PathBuf,
}

/// Container id: `<uid prefix>-<name>-<attempt>` (shim ids allow `[A-Za-z0-9_.-]`, ≤ 64).
pub fn container_id(pod_uid: &str, name: &str, attempt: u32) -> String {
    let uid: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    let name: String = name.chars().take(40).collect();
    format!("{uid}-{name}-{attempt}")
}

/// The directory of a pod's container metadata.
pub fn meta_dir(root: &Path, pod_uid: &str) -> PathBuf {
    root.join("pods").join(pod_uid).join("containers")
}

/// Writes a metadata file (effectful).
pub fn write_meta(root: &Path, m: &ContainerMeta) -> std::io::Result<()> {
    let d = meta_dir(root, &m.pod_uid);
    let data = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
    hako_shim::durable::write_file(&d.join(format!("{}.json", m.id)), &data, 0o644)
}

/// Every metadata file of a pod (effectful; unreadable ones are skipped).
pub fn read_metas(root: &Path, pod_uid: &str) -> Vec<ContainerMeta> {
    let Ok(rd) = std::fs::read_dir(meta_dir(root, pod_uid)) else {
        return vec![];
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// Removes a metadata file (effectful).
pub fn remove_meta(root: &Path, pod_uid: &str, id: &str) {
    let _ = std::fs::remove_file(meta_dir(root, pod_uid).join(format!("{id}.json")));
}

fn time(s: &Option<String>) -> Option<DateTime<Utc>> {
    s.as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The observed container from its metadata and shim state (pure).
pub fn observed_from(m: &ContainerMeta, st: Option<&State>, message: String) -> ObservedContainer {
    let (state, exit_code, oom, created, started, finished) = match st {
        Some(s) => (
            match s.status {
                Status::Created => RuntimeState::Created,
                Status::Running => RuntimeState::Running,
                Status::Stopped => RuntimeState::Exited,
            },
            s.exit_code.unwrap_or(0),
            s.reason.as_deref() == Some("OOMKilled"),
            time(&Some(s.created_at.clone())),
            time(&s.started_at),
            time(&s.finished_at),
        ),
        None => (RuntimeState::Unknown, 0, false, None, None, None),
    };
    ObservedContainer {
        name: m.name.clone(),
        id: m.id.clone(),
        attempt: m.attempt,
        spec_hash: m.spec_hash.clone(),
        image: m.image.clone(),
        image_id: m.image_id.clone(),
        state,
        created_at: created.unwrap_or_default(),
        started_at: started,
        finished_at: finished,
        exit_code,
        oom_killed: oom,
        message,
        probes: ProbeView::default(),
    }
}

/// The shim's view of a container (effectful, blocking): the live state from its shim; when
/// the shim is gone, the recorded state if it records the exit, else `None` (unknown: the
/// process may still run without its shim).
pub fn shim_state(shim: &ShimRuntime, id: &str) -> Option<State> {
    let c = shim.client(id);
    match c.state() {
        Ok(s) => Some(s),
        Err(_) => c
            .recorded_state()
            .ok()
            .filter(|r| r.status == Status::Stopped),
    }
}

/// Reads the termination message: the termination-log file, or with
/// `FallbackToLogsOnError` and a failed exit, the end of the log (effectful).
pub fn termination_message(m: &ContainerMeta, policy: Option<&str>, failed: bool) -> String {
    let mut msg = std::fs::read(&m.termination_log)
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned())
        .unwrap_or_default();
    if msg.is_empty() && failed && policy == Some("FallbackToLogsOnError") {
        let bytes = std::fs::read(&m.log_path).unwrap_or_default();
        msg = log_tail(&bytes, 80, 2048);
    }
    msg
}

/// The last `lines` lines (at most `max_bytes`, cut at a character boundary) of a CRI log, as
/// the kubelet's `FallbackToLogsOnError` takes them: `P` records joined with the rest of their
/// line as bytes, so an invalid byte or a character split across records does not lose the
/// message (pure).
pub fn log_tail(log: &[u8], lines: usize, max_bytes: usize) -> String {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut open = false;
    for r in log
        .split(|&b| b == b'\n')
        .filter_map(hako_shim::logs::parse_record_bytes)
    {
        match out.last_mut() {
            Some(l) if open => l.extend_from_slice(r.payload),
            _ => out.push(r.payload.to_vec()),
        }
        open = r.partial;
    }
    let start = out.len().saturating_sub(lines);
    let joined = out[start..].join(&b'\n');
    let text = String::from_utf8_lossy(&joined);
    let cut = text.len().saturating_sub(max_bytes);
    let cut = (cut..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[cut..].to_string()
}

/// Node-level inputs of a container spec.
#[derive(Debug, Clone)]
pub struct SpecInputs<'a> {
    /// Container id.
    pub id: &'a str,
    /// Resolved environment.
    pub env: &'a [(String, String)],
    /// Command and args after `$(VAR)` expansion.
    pub command: Vec<String>,
    /// Args after expansion.
    pub args: Vec<String>,
    /// The image.
    pub image: &'a Image,
    /// Its layer directories.
    pub layers: Vec<PathBuf>,
    /// Sandbox namespace files.
    pub sandbox: &'a crate::sys::sandbox::SandboxPaths,
    /// Extra bind mounts (hosts, resolv.conf, hostname, termination log, volumes).
    pub mounts: Vec<Mount>,
    /// oom_score_adj to request.
    pub oom_score_adj: i64,
    /// cgroup root (None: /sys/fs/cgroup) and parent path.
    pub cgroup_root: Option<PathBuf>,
    /// Parent of `kubepods` (e.g. "" or a test prefix).
    pub cgroup_parent: &'a str,
    /// CRI log path.
    pub log_path: PathBuf,
    /// CRI log rotation size in bytes (`--container-log-max-size`).
    pub log_max_size: u64,
    /// CRI log files kept, current included (`--container-log-max-files`).
    pub log_max_files: u32,
    /// Directory of Localhost seccomp profiles (`--seccomp-profile-root`).
    pub seccomp_profile_root: &'a Path,
}

/// The pod's cgroup path relative to the hierarchy root (kubelet cgroupfs layout).
pub fn pod_cgroup(cgroup_parent: &str, spec: &PodSpec, uid: &str) -> String {
    let q = match qos::pod_qos(spec) {
        qos::QosClass::Guaranteed => hako_shim::cgroup::QosClass::Guaranteed,
        qos::QosClass::Burstable => hako_shim::cgroup::QosClass::Burstable,
        qos::QosClass::BestEffort => hako_shim::cgroup::QosClass::BestEffort,
    };
    let p = hako_shim::cgroup::pod_cgroup_path(q, uid);
    if cgroup_parent.is_empty() {
        p
    } else {
        format!("{}/{p}", cgroup_parent.trim_matches('/'))
    }
}

/// The user the container runs as, and its check against runAsNonRoot (kubelet
/// `verifyRunAsNonRoot` messages).
fn user_for(pod: &Pod, c: &Container, image: &Image) -> Result<User, ConfigError> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let run_as_user = csc
        .and_then(|s| s.run_as_user)
        .or_else(|| psc.and_then(|s| s.run_as_user));
    let run_as_group = csc
        .and_then(|s| s.run_as_group)
        .or_else(|| psc.and_then(|s| s.run_as_group));
    let non_root = csc
        .and_then(|s| s.run_as_non_root)
        .or_else(|| psc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let image_user = image.config.user.clone().unwrap_or_default();
    if non_root {
        match run_as_user {
            Some(0) => return Err(ConfigError::RunAsUserRoot),
            Some(_) => {}
            None => {
                let u = image_user.split(':').next().unwrap_or("");
                match u.parse::<i64>() {
                    Ok(0) => return Err(ConfigError::ImageRunsAsRoot),
                    Ok(_) => {}
                    Err(_) if u.is_empty() => return Err(ConfigError::ImageRunsAsRoot),
                    Err(_) => return Err(ConfigError::NonNumericUser(u.to_string())),
                }
            }
        }
    }
    let spec = match (run_as_user, run_as_group) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u.to_string(),
        (None, Some(g)) => {
            let u = image_user.split(':').next().unwrap_or("");
            format!("{}:{g}", if u.is_empty() { "0" } else { u })
        }
        (None, None) => image_user,
    };
    let mut gids: Vec<u32> = psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| u32::try_from(g).ok())
        .collect();
    if let Some(fs) = psc
        .and_then(|s| s.fs_group)
        .and_then(|g| u32::try_from(g).ok())
    {
        gids.push(fs);
    }
    Ok(User {
        spec,
        additional_gids: gids,
    })
}

fn capabilities(c: &Container) -> Option<Vec<String>> {
    let caps = c.security_context.as_ref()?.capabilities.as_ref()?;
    let norm = |s: &String| {
        let u = s.to_ascii_uppercase();
        if u.starts_with("CAP_") || u == "ALL" {
            u
        } else {
            format!("CAP_{u}")
        }
    };
    let add: Vec<String> = caps.add.iter().flatten().map(norm).collect();
    let drop: Vec<String> = caps.drop.iter().flatten().map(norm).collect();
    let mut set: Vec<String> = if drop.iter().any(|d| d == "ALL") {
        vec![]
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|s| s.to_string())
            .filter(|s| !drop.contains(s))
            .collect()
    };
    for a in add {
        if a != "ALL" && !set.contains(&a) {
            set.push(a);
        }
    }
    Some(set)
}

/// Builds the shim spec; an error is a CreateContainerConfigError message. Pure, except that
/// a Localhost seccomp profile is read from `inp.seccomp_profile_root`.
pub fn build_spec(pod: &Pod, c: &Container, inp: SpecInputs) -> Result<ContainerSpec, ConfigError> {
    let mut process = process_for(&inp.image.config, &inp.command, &inp.args);
    if process.args.is_empty() {
        return Err(ConfigError::NoCommand);
    }
    // Image env first, container env overrides.
    let mut env: Vec<String> = process.env.clone();
    for (k, v) in inp.env {
        let prefix = format!("{k}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", crate::model::dns::pod_hostname(pod)));
    }
    process.env = env;
    if let Some(wd) = c.working_dir.clone().filter(|w| !w.is_empty()) {
        process.cwd = Some(wd);
    }
    process.user = user_for(pod, c, inp.image)?;
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    process.capabilities = capabilities(c);
    process.no_new_privileges = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    process.oom_score_adj = Some(i32::try_from(inp.oom_score_adj).unwrap_or(1000));
    // `stdin: true`: the shim keeps a stdin pipe for attach (`tty` is not supported).
    process.stdin = c.stdin.unwrap_or(false);
    let seccomp = if privileged {
        // Privileged containers run unconfined (the kubelet and containerd do the same).
        SeccompProfile::Unconfined
    } else {
        match seccomp_request(pod, c)? {
            SeccompRequest::Unconfined => SeccompProfile::Unconfined,
            SeccompRequest::RuntimeDefault => SeccompProfile::RuntimeDefault,
            SeccompRequest::Localhost(name) => {
                localhost_seccomp(inp.seccomp_profile_root, &name, &process)?
            }
        }
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let req = qos::effective_requests(c);
    let lim = qos::limits(c);
    let milli_cpu = req.get("cpu").map(|n| n.milli_value()).unwrap_or(0);
    let shares = if milli_cpu == 0 {
        2
    } else {
        (milli_cpu * 1024 / 1000).max(2)
    };
    let quota = lim
        .get("cpu")
        .map(|n| i64::try_from((n.milli_value() * 100_000 / 1000).max(1000)).unwrap_or(i64::MAX));
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    Ok(ContainerSpec {
        id: inp.id.to_string(),
        rootfs: Rootfs::Layers(inp.layers),
        process,
        hostname: None,
        namespaces: NamespacePaths {
            net: Some(inp.sandbox.net()),
            ipc: Some(inp.sandbox.ipc()),
            uts: Some(inp.sandbox.uts()),
            pid: None,
        },
        mounts: inp.mounts,
        readonly_rootfs: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        masked_paths: None,
        readonly_paths: None,
        privileged,
        cgroup: Some(CgroupSpec {
            root: inp.cgroup_root.clone(),
            path: format!("{}/{}", pod_cgroup(inp.cgroup_parent, &spec, uid), inp.id),
            cpu_shares: Some(u64::try_from(shares).unwrap_or(2)),
            cpu_quota: quota,
            cpu_period: quota.map(|_| 100_000),
            memory_limit: lim
                .get("memory")
                .map(|n| i64::try_from(n.value()).unwrap_or(i64::MAX)),
            pids_limit: None,
        }),
        log: Some(LogSpec {
            path: inp.log_path,
            max_size: inp.log_max_size,
            max_files: inp.log_max_files,
        }),
        seccomp,
    })
}

/// The seccomp profile a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeccompRequest {
    /// No filter (also when nothing is set: the kubelet's default without `seccompDefault`).
    Unconfined,
    /// The runtime's default profile.
    RuntimeDefault,
    /// `localhostProfile`, relative to the profile root.
    Localhost(String),
}

/// The container's `securityContext.seccompProfile`, else the pod's; an error is a
/// CreateContainerConfigError message. Pure.
pub fn seccomp_request(pod: &Pod, c: &Container) -> Result<SeccompRequest, ConfigError> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let Some(p) = c
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or_else(|| psc.and_then(|s| s.seccomp_profile.as_ref()))
    else {
        return Ok(SeccompRequest::Unconfined);
    };
    match p.type_.as_str() {
        "Unconfined" => Ok(SeccompRequest::Unconfined),
        "RuntimeDefault" => Ok(SeccompRequest::RuntimeDefault),
        "Localhost" => match p.localhost_profile.as_deref() {
            Some(name) if !name.is_empty() => Ok(SeccompRequest::Localhost(name.to_string())),
            _ => Err(ConfigError::LocalhostWithoutProfile),
        },
        t => Err(ConfigError::UnknownSeccompType(t.to_string())),
    }
}

/// Read a Localhost profile beneath `root` and check that it compiles for the container's
/// capabilities, so that a bad profile fails the container here, naming the file, instead of
/// in the shim (effectful: reads the file).
fn localhost_seccomp(
    root: &Path,
    name: &str,
    process: &hako_shim::spec::Process,
) -> Result<SeccompProfile, ConfigError> {
    let p = hako_shim::seccomp::localhost::read(root, name)?;
    let caps = match &process.capabilities {
        Some(names) => hako_shim::capabilities::parse_set(names)?,
        None => hako_shim::capabilities::default_set(),
    };
    let profile = SeccompProfile::Localhost(Box::new(p));
    hako_shim::seccomp::compile(&profile, &caps)?;
    Ok(profile)
}

/// A bind mount.
pub fn bind(src: &Path, dst: &str, ro: bool) -> Mount {
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if ro {
        options.push("ro".into());
    }
    Mount {
        destination: dst.to_string(),
        source: src.display().to_string(),
        kind: None,
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(user: &str) -> Image {
        Image {
            reference: "r".into(),
            digest: "d".into(),
            id: "i".into(),
            config: hako_shim::image::ImageConfig {
                entrypoint: vec!["/bin/httpd".into()],
                cmd: vec!["-f".into()],
                user: (!user.is_empty()).then(|| user.to_string()),
                ..Default::default()
            },
            layers: vec![],
            layer_sizes: vec![],
            pulled_at: 0,
            last_used: 0,
        }
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn run_as_non_root_table() {
        let base = "metadata: {name: p, uid: u}\nspec:\n  securityContext: {runAsNonRoot: true}\n  containers: [{name: c, image: x}]\n";
        let user_for =
            |p: &Pod, c: &Container, i: &Image| super::user_for(p, c, i).map_err(|e| e.to_string());
        let p = pod(base);
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(user_for(&p, c, &image(""))
            .unwrap_err()
            .contains("will run as root"));
        assert!(user_for(&p, c, &image("app"))
            .unwrap_err()
            .contains("non-numeric user (app)"));
        assert_eq!(user_for(&p, c, &image("1000")).unwrap().spec, "1000");
        let p2 = pod("metadata: {name: p, uid: u}\nspec:\n  securityContext: {runAsNonRoot: true, runAsUser: 0}\n  containers: [{name: c, image: x}]\n");
        let c2 = &p2.spec.as_ref().unwrap().containers[0];
        assert!(user_for(&p2, c2, &image("1000"))
            .unwrap_err()
            .contains("breaks non-root"));
        let p3 = pod("metadata: {name: p, uid: u}\nspec:\n  securityContext: {runAsUser: 1001, runAsGroup: 2000, fsGroup: 3000}\n  containers: [{name: c, image: x}]\n");
        let c3 = &p3.spec.as_ref().unwrap().containers[0];
        let u = user_for(&p3, c3, &image("app")).unwrap();
        assert_eq!(u.spec, "1001:2000");
        assert_eq!(u.additional_gids, vec![3000]);
    }

    #[test]
    fn seccomp_requests() {
        let req = |yaml: &str| {
            let p = pod(yaml);
            let c = p.spec.as_ref().unwrap().containers[0].clone();
            seccomp_request(&p, &c).map_err(|e| e.to_string())
        };
        let base = "metadata: {name: p, uid: u}\nspec:\n";
        assert_eq!(
            req(&format!("{base}  containers: [{{name: c, image: x}}]\n")),
            Ok(SeccompRequest::Unconfined)
        );
        let pod_level = format!("{base}  securityContext: {{seccompProfile: {{type: Localhost, localhostProfile: profiles/a.json}}}}\n");
        assert_eq!(
            req(&format!(
                "{pod_level}  containers: [{{name: c, image: x}}]\n"
            )),
            Ok(SeccompRequest::Localhost("profiles/a.json".into()))
        );
        assert_eq!(
            req(&format!("{pod_level}  containers: [{{name: c, image: x, securityContext: {{seccompProfile: {{type: RuntimeDefault}}}}}}]\n")),
            Ok(SeccompRequest::RuntimeDefault),
            "the container's profile overrides the pod's"
        );
        assert_eq!(
            req(&format!("{pod_level}  containers: [{{name: c, image: x, securityContext: {{seccompProfile: {{type: Unconfined}}}}}}]\n")),
            Ok(SeccompRequest::Unconfined)
        );
        assert!(req(&format!("{base}  containers: [{{name: c, image: x, securityContext: {{seccompProfile: {{type: Localhost}}}}}}]\n"))
            .unwrap_err()
            .contains("needs localhostProfile"));
        assert!(req(&format!("{base}  containers: [{{name: c, image: x, securityContext: {{seccompProfile: {{type: Strict}}}}}}]\n"))
            .unwrap_err()
            .contains("unknown seccompProfile type"));
    }

    #[test]
    fn localhost_profiles_are_read_and_checked() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("profiles")).unwrap();
        std::fs::write(
            t.path().join("profiles/ok.json"),
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        std::fs::write(
            t.path().join("profiles/notify.json"),
            r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#,
        )
        .unwrap();
        let process = hako_shim::spec::Process::default();
        match localhost_seccomp(t.path(), "profiles/ok.json", &process).unwrap() {
            SeccompProfile::Localhost(p) => assert!(p.path.ends_with("profiles/ok.json")),
            other => panic!("{other:?}"),
        }
        for (name, want) in [
            ("profiles/missing.json", "profiles/missing.json"),
            ("profiles/notify.json", "not supported"),
            ("/etc/passwd", "relative path"),
        ] {
            let e = localhost_seccomp(t.path(), name, &process)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
    }

    #[test]
    fn ids_and_caps() {
        assert_eq!(container_id("ab-cd-ef", "web", 3), "abcdef-web-3");
        let p = pod("metadata: {name: p, uid: u}\nspec:\n  containers: [{name: c, image: x, securityContext: {capabilities: {drop: [ALL], add: [NET_ADMIN]}}}]\n");
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(capabilities(c), Some(vec!["CAP_NET_ADMIN".to_string()]));
    }

    #[test]
    fn log_tail_is_byte_safe() {
        let log = b"2024-01-01T00:00:00.000000000Z stdout P ab\xf0\x9f\n\
2024-01-01T00:00:00.000000001Z stdout F \x98\x80cd\n\
not a record\n\
2024-01-01T00:00:00.000000002Z stderr F bad \xff byte\n\
2024-01-01T00:00:00.000000003Z stdout F last\n";
        assert_eq!(
            log_tail(log, 80, 2048),
            "ab\u{1F600}cd\nbad \u{FFFD} byte\nlast"
        );
        assert_eq!(log_tail(log, 1, 2048), "last");
        assert_eq!(log_tail(log, 80, 6), "e\nlast");
        assert_eq!(log_tail(b"", 80, 2048), "");
    }

    /// The Display of each variant is the message the kubelet (and this agent before the
    /// error became typed) puts in CreateContainerConfigError events.
    #[test]
    fn config_error_messages_are_unchanged() {
        for (e, want) in [
            (
                ConfigError::RunAsUserRoot,
                "container's runAsUser breaks non-root policy",
            ),
            (
                ConfigError::ImageRunsAsRoot,
                "container has runAsNonRoot and image will run as root",
            ),
            (
                ConfigError::NonNumericUser("app".into()),
                "container has runAsNonRoot and image has non-numeric user (app), cannot verify user is non-root",
            ),
            (ConfigError::NoCommand, "no command specified"),
            (
                ConfigError::LocalhostWithoutProfile,
                "seccompProfile type Localhost needs localhostProfile",
            ),
            (
                ConfigError::UnknownSeccompType("Strict".into()),
                "unknown seccompProfile type \"Strict\"",
            ),
            (
                ConfigError::Capability(hako_shim::capabilities::UnknownCapability(
                    "CAP_NOPE".into(),
                )),
                "unknown capability \"CAP_NOPE\"",
            ),
        ] {
            assert_eq!(e.to_string(), want);
        }
    }
}
