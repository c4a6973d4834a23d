//! The pods `ephemeralcontainers` subresource as the kube-apiserver validates it (pure):
//! `ValidatePodEphemeralContainersUpdate` (existing entries may be neither removed nor
//! changed, static pods have none), the per-container rules of `validateEphemeralContainers`
//! (a DNS-label name unique across containers, init and ephemeral containers, an image, no
//! ports/probes/lifecycle/resources/resizePolicy/restartPolicy, a `targetContainerName` that
//! names a container or init container), and the rules for the pod itself: no ephemeral
//! containers on create, no change to them through a pod update; with them, the create-time
//! check of `securityContext.sysctls` names (`validateSysctls`).

use serde_json::Value;

/// Fields the API forbids on an ephemeral container.
const FORBIDDEN: &[&str] = &[
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "resources",
    "resizePolicy",
    "restartPolicy",
];

fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(ok)
        && b.last().is_some_and(ok)
        && b.iter().all(|c| ok(c) || *c == b'-')
}

fn list<'a>(pod: &'a Value, field: &str) -> &'a [Value] {
    pod["spec"][field].as_array().map_or(&[], Vec::as_slice)
}

fn name_of(c: &Value) -> &str {
    c["name"].as_str().unwrap_or("")
}

/// The `Pod "<name>" is invalid: ...` message of a 422, or `None` when `errs` is empty.
fn invalid(pod: &Value, errs: Vec<String>) -> Result<(), String> {
    if errs.is_empty() {
        return Ok(());
    }
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    Err(format!("Pod \"{name}\" is invalid: {}", errs.join(", ")))
}

/// The API's sysctl name pattern (`^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$`,
/// at most 253 characters).
fn sysctl_name_ok(name: &str) -> bool {
    let seg = |s: &str| {
        let b = s.as_bytes();
        let an = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && b.first().is_some_and(an)
            && b.last().is_some_and(an)
            && b.iter().all(|c| an(c) || *c == b'-' || *c == b'_')
    };
    name.len() <= 253 && name.split(['.', '/']).all(seg)
}

/// A pod create: ephemeral containers cannot be set on create; `securityContext.sysctls`
/// names must be sysctl names, each at most once (`validateSysctls`).
pub fn validate_create(pod: &Value) -> Result<(), String> {
    let mut errs = Vec::new();
    if !list(pod, "ephemeralContainers").is_empty() {
        errs.push("spec.ephemeralContainers: Forbidden: cannot be set on create".to_string());
    }
    let sysctls = pod["spec"]["securityContext"]["sysctls"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut names: Vec<&str> = Vec::new();
    for (i, s) in sysctls.iter().enumerate() {
        let name = name_of(s);
        let path = format!("spec.securityContext.sysctls[{i}].name");
        if name.is_empty() {
            errs.push(format!("{path}: Required value"));
        } else if !sysctl_name_ok(name) {
            errs.push(format!(
                "{path}: Invalid value: {name:?}: must have at most 253 characters and match regex ^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$"
            ));
        } else if names.contains(&name) {
            errs.push(format!("{path}: Duplicate value: {name:?}"));
        } else {
            names.push(name);
        }
    }
    invalid(pod, errs)
}

/// `v` without nulls, empty objects and empty lists (at any depth): a typed client's round trip
/// drops or adds those, and the apiserver compares decoded Go structs where they are the same.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        v => v.clone(),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A pod update (PUT or PATCH of the pod itself) as `ValidatePodUpdate` allows it: the spec may
/// change only in `containers[*].image`, `initContainers[*].image`, `activeDeadlineSeconds`
/// (set when unset, or lowered; never removed), `tolerations` (additions only),
/// `terminationGracePeriodSeconds` (to 1 from a negative value) and `schedulingGates` (removals);
/// ephemeral containers change only through their subresource.
pub fn validate_pod_update(old: &Value, new: &Value) -> Result<(), String> {
    const FORBIDDEN_MSG: &str = "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";
    let mut errs = Vec::new();
    if list(old, "ephemeralContainers") != list(new, "ephemeralContainers") {
        errs.push(format!(
            "{FORBIDDEN_MSG}; ephemeral containers are added through the ephemeralcontainers subresource"
        ));
        return invalid(new, errs);
    }
    let (os, ns) = (&old["spec"], &new["spec"]);
    match (os["activeDeadlineSeconds"].as_i64(), &ns["activeDeadlineSeconds"]) {
        (_, Value::Number(n)) => {
            let v = n.as_i64().unwrap_or(-1);
            if !(0..=i64::from(i32::MAX)).contains(&v) {
                errs.push(format!(
                    "spec.activeDeadlineSeconds: Invalid value: {n}: must be between 0 and 2147483647, inclusive"
                ));
            } else if os["activeDeadlineSeconds"].as_i64().is_some_and(|o| o < v) {
                errs.push(format!(
                    "spec.activeDeadlineSeconds: Invalid value: {v}: must be less than or equal to previous value"
                ));
            }
        }
        (Some(_), Value::Null) => errs.push(
            "spec.activeDeadlineSeconds: Invalid value: \"null\": must not update from a positive integer to nil value".into(),
        ),
        _ => {}
    }
    if !errs.is_empty() {
        return invalid(new, errs);
    }
    // The new spec with every field that may change put back to the old value: what is left
    // must be equal.
    let mut probe = ns.clone();
    for field in ["containers", "initContainers"] {
        let olds = os[field].as_array().map_or(&[][..], Vec::as_slice);
        // (`get_mut`: indexing a missing key mutably would insert a null.)
        if let Some(news) = probe.get_mut(field).and_then(Value::as_array_mut) {
            if news.len() == olds.len() {
                for (n, o) in news.iter_mut().zip(olds) {
                    n["image"] = o["image"].clone();
                }
            }
        }
    }
    let set = |v: &mut Value, k: &str, to: &Value| {
        if let Some(m) = v.as_object_mut() {
            match to {
                Value::Null => {
                    m.remove(k);
                }
                to => {
                    m.insert(k.to_string(), to.clone());
                }
            }
        }
    };
    set(
        &mut probe,
        "activeDeadlineSeconds",
        &os["activeDeadlineSeconds"],
    );
    let old_tol = os["tolerations"].as_array().map_or(&[][..], Vec::as_slice);
    let new_tol = ns["tolerations"].as_array().map_or(&[][..], Vec::as_slice);
    if old_tol.iter().all(|t| new_tol.contains(t)) {
        set(&mut probe, "tolerations", &os["tolerations"]);
    }
    if os["terminationGracePeriodSeconds"]
        .as_i64()
        .is_some_and(|g| g < 0)
        && ns["terminationGracePeriodSeconds"].as_i64() == Some(1)
    {
        set(
            &mut probe,
            "terminationGracePeriodSeconds",
            &os["terminationGracePeriodSeconds"],
        );
    }
    let old_gates = os["schedulingGates"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let new_gates = ns["schedulingGates"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if new_gates.iter().all(|g| old_gates.contains(g)) {
        set(&mut probe, "schedulingGates", &os["schedulingGates"]);
    }
    if normalized(&probe) != normalized(os) {
        errs.push(FORBIDDEN_MSG.to_string());
    }
    invalid(new, errs)
}

/// An update through `pods/<name>/ephemeralcontainers`: `new` is the stored pod with the
/// request's `spec.ephemeralContainers`.
pub fn validate_update(old: &Value, new: &Value) -> Result<(), String> {
    if old
        .pointer("/metadata/annotations/kubernetes.io~1config.mirror")
        .is_some()
    {
        return invalid(
            new,
            vec![": Forbidden: static pods do not support ephemeral containers".to_string()],
        );
    }
    let mut errs = Vec::new();
    let news = list(new, "ephemeralContainers");
    let olds = list(old, "ephemeralContainers");
    for o in olds {
        match news.iter().find(|n| name_of(n) == name_of(o)) {
            None => errs.push(format!(
                "spec.ephemeralContainers: Forbidden: existing ephemeral containers {:?} may not be removed",
                name_of(o)
            )),
            Some(n) if n != o => errs.push(format!(
                "spec.ephemeralContainers[{0}]: Forbidden: existing ephemeral containers {0:?} may not be changed",
                name_of(o)
            )),
            Some(_) => {}
        }
    }
    let regular: Vec<&str> = list(new, "containers")
        .iter()
        .chain(list(new, "initContainers"))
        .map(name_of)
        .collect();
    let mut seen: Vec<&str> = regular.clone();
    for (i, c) in news.iter().enumerate() {
        let path = format!("spec.ephemeralContainers[{i}]");
        let name = name_of(c);
        if name.is_empty() {
            errs.push(format!("{path}.name: Required value"));
        } else if !dns_label(name) {
            errs.push(format!(
                "{path}.name: Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            ));
        } else if seen.contains(&name) {
            errs.push(format!("{path}.name: Duplicate value: {name:?}"));
        } else {
            seen.push(name);
        }
        if c["image"].as_str().unwrap_or("").trim().is_empty() {
            errs.push(format!("{path}.image: Required value"));
        }
        for f in FORBIDDEN {
            if c.get(*f).is_some_and(|v| !v.is_null()) {
                errs.push(format!(
                    "{path}.{f}: Forbidden: cannot be set for an Ephemeral Container"
                ));
            }
        }
        if let Some(t) = c["targetContainerName"].as_str().filter(|t| !t.is_empty()) {
            if !regular.contains(&t) {
                errs.push(format!("{path}.targetContainerName: Not found: {t:?}"));
            }
        }
    }
    invalid(new, errs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ecs: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "init", "image": "i"}],
            "containers": [{"name": "app", "image": "i"}],
            "ephemeralContainers": ecs}})
    }

    #[test]
    fn pod_update_mutability_as_validate_pod_update() {
        let base = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "app", "image": "i:1"}],
            "tolerations": [{"key": "a", "operator": "Exists"}],
            "restartPolicy": "Always"}});
        let with = |f: &dyn Fn(&mut Value)| {
            let mut p = base.clone();
            f(&mut p);
            p
        };
        let ok = |n: &Value| validate_pod_update(&base, n);
        assert_eq!(ok(&base), Ok(()));
        assert_eq!(
            ok(&with(
                &|p| p["spec"]["containers"][0]["image"] = json!("i:2")
            )),
            Ok(())
        );
        assert_eq!(
            ok(&with(&|p| p["spec"]["activeDeadlineSeconds"] = json!(5))),
            Ok(())
        );
        assert_eq!(
            ok(&with(&|p| {
                p["spec"]["tolerations"] =
                    json!([{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}])
            })),
            Ok(())
        );
        // Everything else is refused.
        for bad in [
            with(&|p| p["spec"]["restartPolicy"] = json!("Never")),
            with(&|p| p["spec"]["containers"][0]["command"] = json!(["sh"])),
            with(&|p| p["spec"]["tolerations"] = json!([])),
            with(&|p| p["spec"]["nodeName"] = json!("other")),
        ] {
            let e = ok(&bad).unwrap_err();
            assert!(e.contains("pod updates may not change fields"), "{e}");
        }
        // activeDeadlineSeconds: lowered only, never removed.
        let d10 = with(&|p| p["spec"]["activeDeadlineSeconds"] = json!(10));
        let mut d5 = d10.clone();
        d5["spec"]["activeDeadlineSeconds"] = json!(5);
        assert_eq!(validate_pod_update(&d10, &d5), Ok(()));
        let e = validate_pod_update(&d5, &d10).unwrap_err();
        assert!(e.contains("less than or equal to previous value"), "{e}");
        let e = validate_pod_update(&d5, &base).unwrap_err();
        assert!(e.contains("to nil value"), "{e}");
    }

    #[test]
    fn ephemeral_update_rules() {
        let dbg = json!({"name": "debugger", "image": "busybox", "targetContainerName": "app"});
        let empty = pod(json!([]));
        let one = pod(json!([dbg.clone()]));
        assert_eq!(validate_update(&empty, &one), Ok(()));
        // Additions only: removal and change refused.
        let e = validate_update(&one, &empty).unwrap_err();
        assert!(e.contains("\"debugger\" may not be removed"), "{e}");
        let mut changed = dbg.clone();
        changed["image"] = json!("other");
        let e = validate_update(&one, &pod(json!([changed]))).unwrap_err();
        assert!(e.contains("may not be changed"), "{e}");
        // Names unique across every kind of container.
        for dup in ["app", "init", "debugger"] {
            let e = validate_update(
                &one,
                &pod(json!([dbg.clone(), {"name": dup, "image": "b"}])),
            )
            .unwrap_err();
            assert!(e.contains(&format!("Duplicate value: \"{dup}\"")), "{e}");
        }
        // What an ephemeral container may not have.
        for f in ["ports", "readinessProbe", "resources", "lifecycle"] {
            let mut c = json!({"name": "x", "image": "b"});
            c[f] = json!({});
            let e = validate_update(&empty, &pod(json!([c]))).unwrap_err();
            assert_eq!(
                e,
                format!("Pod \"p\" is invalid: spec.ephemeralContainers[0].{f}: Forbidden: cannot be set for an Ephemeral Container")
            );
        }
        let e = validate_update(
            &empty,
            &pod(json!([{"name": "x", "image": "b", "targetContainerName": "nope"}])),
        )
        .unwrap_err();
        assert!(
            e.contains("targetContainerName: Not found: \"nope\""),
            "{e}"
        );
        assert!(validate_update(&empty, &pod(json!([{"name": "x"}]))).is_err());
        assert!(validate_update(&empty, &pod(json!([{"name": "X_1", "image": "b"}]))).is_err());
        // Static (mirror) pods have none.
        let mut mirror = empty.clone();
        mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "h"});
        assert!(validate_update(&mirror, &one).is_err());
        // sysctl.go "should reject invalid sysctls": the invalid names, not the valid ones.
        let mut bad = empty.clone();
        bad["spec"]["securityContext"] = json!({"sysctls": [
            {"name": "foo-", "value": "bar"}, {"name": "kernel.shmmax", "value": "1"},
            {"name": "safe-and-unsafe", "value": "1"}, {"name": "bar..", "value": "42"}]});
        let e = validate_create(&bad).unwrap_err();
        assert!(
            e.contains("Invalid value: \"foo-\"") && e.contains("Invalid value: \"bar..\""),
            "{e}"
        );
        assert!(
            !e.contains("safe-and-unsafe") && !e.contains("kernel.shmmax"),
            "{e}"
        );
        bad["spec"]["securityContext"]["sysctls"] = json!([
            {"name": "kernel.shmmax", "value": "1"}, {"name": "kernel.shmmax", "value": "2"}]);
        assert!(validate_create(&bad)
            .unwrap_err()
            .contains("Duplicate value"));
        // Not on create, not through a pod update.
        assert_eq!(validate_create(&empty), Ok(()));
        assert!(validate_create(&one).is_err());
        assert_eq!(validate_pod_update(&one, &one), Ok(()));
        assert!(validate_pod_update(&empty, &one).is_err());
    }
}
