//! Text output of `hako-agent get pods` and `describe pod`, in kubectl's layout (pure).

use crate::model::record::PodRecord;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod};
use k8s_openapi::chrono::{DateTime, Utc};

/// kubectl's `HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = s / 3600;
    if h < 8 {
        return if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        return if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    format!("{}y", h / 24 / 365)
}

fn age(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map(|t| human_duration((now - t).num_seconds()))
        .unwrap_or_else(|| "<unknown>".into())
}

/// Pads columns like Go's tabwriter with padding 3; the last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}", w = widths[i] + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn state_of(s: &ContainerStatus) -> ContainerState {
    s.state.clone().unwrap_or_default()
}

/// READY, STATUS, RESTARTS cells of a pod (kubectl `printPod`).
pub fn pod_summary(pod: &Pod, now: DateTime<Utc>) -> (String, String, String) {
    let st = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut reason = st
        .reason
        .clone()
        .or(st.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let mut restarts = 0;
    let mut last_restart: Option<DateTime<Utc>> = None;
    let mut note_restart = |s: &ContainerStatus| {
        if let Some(t) = s
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .and_then(|t| t.finished_at.as_ref())
        {
            if last_restart.is_none_or(|l| t.0 > l) {
                last_restart = Some(t.0);
            }
        }
    };
    let inits = spec.init_containers.clone().unwrap_or_default();
    let init_st = st.init_container_statuses.clone().unwrap_or_default();
    let mut initializing = false;
    let mut ready = 0;
    let mut total = spec.containers.len();
    for (i, s) in init_st.iter().enumerate() {
        restarts += s.restart_count;
        note_restart(s);
        let sidecar = inits
            .iter()
            .find(|c| c.name == s.name)
            .is_some_and(crate::model::actions::is_sidecar);
        if sidecar {
            total += 1;
            if s.ready {
                ready += 1;
            }
        }
        let cs = state_of(s);
        if cs.terminated.as_ref().is_some_and(|t| t.exit_code == 0)
            || (sidecar && s.started == Some(true))
        {
            continue;
        }
        if initializing {
            continue;
        }
        initializing = true;
        reason = if let Some(t) = &cs.terminated {
            match t.reason.as_deref() {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => format!("Init:ExitCode:{}", t.exit_code),
            }
        } else if let Some(r) = cs
            .waiting
            .as_ref()
            .and_then(|w| w.reason.clone())
            .filter(|r| r != "PodInitializing")
        {
            format!("Init:{r}")
        } else {
            format!("Init:{i}/{}", inits.len())
        };
    }
    if !initializing {
        let mut has_running = false;
        for s in st.container_statuses.iter().flatten().rev() {
            restarts += s.restart_count;
            note_restart(s);
            let cs = state_of(s);
            if let Some(r) = cs
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .filter(|r| !r.is_empty())
            {
                reason = r;
            } else if let Some(t) = &cs.terminated {
                reason = t
                    .reason
                    .clone()
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| format!("ExitCode:{}", t.exit_code));
            } else if cs.running.is_some() && s.ready {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            reason = if pod_ready {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    } else {
        for s in st.container_statuses.iter().flatten() {
            restarts += s.restart_count;
        }
    }
    if pod.metadata.deletion_timestamp.is_some() {
        reason = "Terminating".into();
    }
    let restarts = match last_restart {
        Some(t) if restarts > 0 => format!(
            "{restarts} ({} ago)",
            human_duration((now - t).num_seconds())
        ),
        _ => restarts.to_string(),
    };
    (format!("{ready}/{total}"), reason, restarts)
}

/// `get pods` table; `wide` adds IP and NODE.
pub fn pods_table(records: &[PodRecord], wide: bool, now: DateTime<Utc>) -> String {
    if records.is_empty() {
        return "No resources found\n".into();
    }
    let mut rows = vec![];
    let mut head: Vec<String> = ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        .map(String::from)
        .to_vec();
    if wide {
        head.extend(["IP", "NODE"].map(String::from));
    }
    rows.push(head);
    for r in records {
        let p = &r.pod;
        let (ready, status, restarts) = pod_summary(p, now);
        let mut row = vec![
            r.namespace().to_string(),
            r.name().to_string(),
            ready,
            status,
            restarts,
            // Static pods have no creationTimestamp: their age is from the start time.
            age(
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .or(p.status.as_ref().and_then(|s| s.start_time.as_ref()))
                    .map(|t| t.0),
                now,
            ),
        ];
        if wide {
            let st = p.status.clone().unwrap_or_default();
            row.push(st.pod_ip.unwrap_or_else(|| "<none>".into()));
            row.push(
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_else(|| "<none>".into()),
            );
        }
        rows.push(row);
    }
    table(&rows)
}

fn kv_lines(label: &str, m: Option<&std::collections::BTreeMap<String, String>>, out: &mut String) {
    let items: Vec<String> = m
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if items.is_empty() {
        out.push_str(&format!("{label:<18}<none>\n"));
    }
    for (i, it) in items.iter().enumerate() {
        let l = if i == 0 { label } else { "" };
        out.push_str(&format!("{l:<18}{it}\n"));
    }
}

fn describe_state(label: &str, s: &ContainerState, indent: &str, out: &mut String) {
    let w = 16;
    if let Some(r) = &s.running {
        out.push_str(&format!("{indent}{label:<w$}Running\n"));
        if let Some(t) = &r.started_at {
            out.push_str(&format!(
                "{indent}  {:<w2$}{}\n",
                "Started:",
                t.0.to_rfc2822(),
                w2 = w - 2
            ));
        }
    } else if let Some(t) = &s.terminated {
        out.push_str(&format!("{indent}{label:<w$}Terminated\n"));
        out.push_str(&format!(
            "{indent}  {:<w2$}{}\n",
            "Reason:",
            t.reason.as_deref().unwrap_or(""),
            w2 = w - 2
        ));
        if let Some(m) = &t.message {
            out.push_str(&format!("{indent}  {:<w2$}{m}\n", "Message:", w2 = w - 2));
        }
        out.push_str(&format!(
            "{indent}  {:<w2$}{}\n",
            "Exit Code:",
            t.exit_code,
            w2 = w - 2
        ));
        if let Some(s) = &t.started_at {
            out.push_str(&format!(
                "{indent}  {:<w2$}{}\n",
                "Started:",
                s.0.to_rfc2822(),
                w2 = w - 2
            ));
        }
        if let Some(f) = &t.finished_at {
            out.push_str(&format!(
                "{indent}  {:<w2$}{}\n",
                "Finished:",
                f.0.to_rfc2822(),
                w2 = w - 2
            ));
        }
    } else if let Some(wt) = &s.waiting {
        out.push_str(&format!("{indent}{label:<w$}Waiting\n"));
        out.push_str(&format!(
            "{indent}  {:<w2$}{}\n",
            "Reason:",
            wt.reason.as_deref().unwrap_or(""),
            w2 = w - 2
        ));
        if let Some(m) = &wt.message {
            out.push_str(&format!("{indent}  {:<w2$}{m}\n", "Message:", w2 = w - 2));
        }
    }
}

/// `describe pod` text.
pub fn describe(rec: &PodRecord, now: DateTime<Utc>) -> String {
    let p = &rec.pod;
    let st = p.status.clone().unwrap_or_default();
    let spec = p.spec.clone().unwrap_or_default();
    let mut o = String::new();
    let line =
        |o: &mut String, k: &str, v: &str| o.push_str(&format!("{:<18}{v}\n", format!("{k}:")));
    line(&mut o, "Name", rec.name());
    line(&mut o, "Namespace", rec.namespace());
    line(&mut o, "UID", p.metadata.uid.as_deref().unwrap_or(""));
    line(
        &mut o,
        "Node",
        &format!(
            "{}/{}",
            spec.node_name.as_deref().unwrap_or("<none>"),
            st.host_ip.as_deref().unwrap_or("")
        ),
    );
    if let Some(t) = &st.start_time {
        line(&mut o, "Start Time", &t.0.to_rfc2822());
    }
    kv_lines("Labels:", p.metadata.labels.as_ref(), &mut o);
    kv_lines("Annotations:", p.metadata.annotations.as_ref(), &mut o);
    line(&mut o, "Status", &pod_summary(p, now).1);
    line(&mut o, "IP", st.pod_ip.as_deref().unwrap_or(""));
    let sections = [
        (
            "Init Containers:",
            spec.init_containers.clone().unwrap_or_default(),
            st.init_container_statuses.clone().unwrap_or_default(),
        ),
        (
            "Containers:",
            spec.containers.clone(),
            st.container_statuses.clone().unwrap_or_default(),
        ),
    ];
    for (title, containers, statuses) in sections {
        if containers.is_empty() {
            continue;
        }
        o.push_str(title);
        o.push('\n');
        for c in &containers {
            let s = statuses.iter().find(|s| s.name == c.name);
            o.push_str(&format!("  {}:\n", c.name));
            let l = |o: &mut String, k: &str, v: &str| {
                o.push_str(&format!("    {:<16}{v}\n", format!("{k}:")))
            };
            l(
                &mut o,
                "Container ID",
                s.and_then(|s| s.container_id.as_deref()).unwrap_or(""),
            );
            l(&mut o, "Image", c.image.as_deref().unwrap_or(""));
            if let Some(cmd) = &c.command {
                l(&mut o, "Command", &cmd.join(" "));
            }
            if let Some(args) = &c.args {
                l(&mut o, "Args", &args.join(" "));
            }
            if let Some(s) = s {
                describe_state(
                    "State:",
                    &s.state.clone().unwrap_or_default(),
                    "    ",
                    &mut o,
                );
                if let Some(ls) = &s.last_state {
                    if ls.running.is_some() || ls.terminated.is_some() || ls.waiting.is_some() {
                        describe_state("Last State:", ls, "    ", &mut o);
                    }
                }
                l(&mut o, "Ready", if s.ready { "True" } else { "False" });
                l(&mut o, "Restart Count", &s.restart_count.to_string());
            }
        }
    }
    o.push_str("Conditions:\n");
    let mut rows = vec![vec!["  Type".to_string(), "Status".to_string()]];
    for c in st.conditions.iter().flatten() {
        rows.push(vec![format!("  {}", c.type_), c.status.clone()]);
    }
    o.push_str(&table(&rows));
    line(&mut o, "QoS Class", st.qos_class.as_deref().unwrap_or(""));
    if rec.events.is_empty() {
        o.push_str("Events:           <none>\n");
    } else {
        o.push_str("Events:\n");
        let mut rows = vec![["  Type", "Reason", "Age", "From", "Message"]
            .map(String::from)
            .to_vec()];
        rows.push(
            ["  ----", "------", "----", "----", "-------"]
                .map(String::from)
                .to_vec(),
        );
        for e in &rec.events {
            let a = if e.count > 1 {
                format!(
                    "{} (x{} over {})",
                    age(Some(e.last_timestamp), now),
                    e.count,
                    age(Some(e.first_timestamp), now)
                )
            } else {
                age(Some(e.last_timestamp), now)
            };
            rows.push(vec![
                format!("  {}", e.type_),
                e.reason.clone(),
                a,
                "hako-agent".into(),
                e.message.clone(),
            ]);
        }
        o.push_str(&table(&rows));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;
    use std::path::PathBuf;

    #[test]
    fn human_duration_table() {
        for (s, want) in [
            (-5, "<invalid>"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (185, "3m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
            (800 * 86400, "2y"),
        ] {
            assert_eq!(human_duration(s), want, "{s}");
        }
    }

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    /// Compares with a golden file; `HAKO_UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, got: &str) {
        let p = testdata(name);
        if std::env::var_os("HAKO_UPDATE_GOLDEN").is_some() {
            std::fs::write(&p, got).unwrap();
        }
        let want = std::fs::read_to_string(&p).unwrap_or_default();
        assert_eq!(
            got, want,
            "golden {name} differs (HAKO_UPDATE_GOLDEN=1 to update)"
        );
    }

    fn records() -> Vec<PodRecord> {
        let text = std::fs::read_to_string(testdata("records.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).single().unwrap()
    }

    #[test]
    fn get_pods_golden() {
        let r = records();
        golden("get-pods.txt", &pods_table(&r, false, now()));
        golden("get-pods-wide.txt", &pods_table(&r, true, now()));
        assert_eq!(pods_table(&[], false, now()), "No resources found\n");
    }

    #[test]
    fn describe_golden() {
        for r in records() {
            golden(&format!("describe-{}.txt", r.name()), &describe(&r, now()));
        }
    }
}
