//! Patch formats the apiserver accepts: JSON merge patch (RFC 7386), strategic merge patch
//! (the subset of directives and merge keys the kubelet and kube-rs clients send), JSON patch
//! (RFC 6902) and server-side apply (treated as a merge of the applied configuration, without
//! field-manager conflict tracking). Pure.

use serde_json::{Map, Value};

/// RFC 7386 merge: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Merge key of the lists Kubernetes declares with `patchStrategy: merge`.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "conditions" => "type",
        "containerStatuses" | "initContainerStatuses" | "ephemeralContainerStatuses" => "name",
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "podIPs" | "hostIPs" => "ip",
        "addresses" => "type",
        "ownerReferences" => "uid",
        "imagePullSecrets" => "name",
        "tolerations" => return None,
        _ => return None,
    })
}

/// Strategic merge patch: like a merge patch, but lists with a merge key merge element by key
/// (`$patch: delete` removes an element), `finalizers` merge as a set, and `$setElementOrder/*`
/// and `$retainKeys` directives are accepted (order directives are ignored).
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut v = patch.clone();
        if let Value::Object(m) = &mut v {
            m.remove("$patch");
        }
        *target = v;
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Value::Array(del)) = (t.get_mut(field), v) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (merge_key(k), v) {
            (Some(key), Value::Array(items)) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                let Value::Array(cur) = cur else { continue };
                for item in items {
                    let Some(id) = item.get(key).cloned() else {
                        return Err(format!(
                            "map: {item} does not contain declared merge key: {key}"
                        ));
                    };
                    let pos = cur.iter().position(|c| c.get(key) == Some(&id));
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            cur.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => strategic_merge_patch(&mut cur[i], item)?,
                        (None, false) => {
                            let mut fresh = Value::Object(Map::new());
                            strategic_merge_patch(&mut fresh, item)?;
                            cur.push(fresh);
                        }
                    }
                }
            }
            (None, Value::Array(items)) if k == "finalizers" => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if let Value::Array(cur) = cur {
                    for i in items {
                        if !cur.contains(i) {
                            cur.push(i.clone());
                        }
                    }
                }
            }
            (_, Value::Object(_)) => {
                strategic_merge_patch(t.entry(k.clone()).or_insert(Value::Null), v)?;
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn parent_and_key<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    let p = if parent.is_empty() {
        Some(doc)
    } else {
        doc.pointer_mut(parent)
    };
    let p = p.ok_or_else(|| format!("path {parent:?} does not exist"))?;
    Ok((p, unescape(last)))
}

/// RFC 6902 JSON patch (add, remove, replace, test, copy, move).
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    let mut work = doc.clone();
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).ok_or("op missing")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("path missing")?;
        let value = || op.get("value").cloned().ok_or("value missing");
        match kind {
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(format!("test failed at {path}"));
                }
            }
            "remove" => {
                let (p, k) = parent_and_key(&mut work, path)?;
                let gone = match p {
                    Value::Object(m) => m.remove(&k).is_some(),
                    Value::Array(a) => match k.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !gone {
                    return Err(format!("path {path} does not exist"));
                }
            }
            "add" | "replace" | "copy" | "move" => {
                let v = match kind {
                    "copy" | "move" => {
                        let from = op
                            .get("from")
                            .and_then(Value::as_str)
                            .ok_or("from missing")?;
                        let v = work
                            .pointer(from)
                            .cloned()
                            .ok_or_else(|| format!("path {from} does not exist"))?;
                        if kind == "move" {
                            json_patch(
                                &mut work,
                                &serde_json::json!([{"op": "remove", "path": from}]),
                            )?;
                        }
                        v
                    }
                    _ => value()?,
                };
                if path.is_empty() {
                    work = v;
                    continue;
                }
                let (p, k) = parent_and_key(&mut work, path)?;
                match p {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&k) {
                            return Err(format!("path {path} does not exist"));
                        }
                        m.insert(k, v);
                    }
                    Value::Array(a) => {
                        if k == "-" {
                            a.push(v);
                        } else {
                            let i: usize = k.parse().map_err(|_| format!("bad index {k}"))?;
                            if kind == "replace" {
                                *a.get_mut(i).ok_or_else(|| format!("no index {i}"))? = v;
                            } else if i <= a.len() {
                                a.insert(i, v);
                            } else {
                                return Err(format!("index {i} out of range"));
                            }
                        }
                    }
                    _ => return Err(format!("path {path}: parent is not a container")),
                }
            }
            other => return Err(format!("unknown op {other:?}")),
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut t = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "MemoryPressure", "status": "False"}]}});
        strategic_merge_patch(
            &mut t,
            &json!({"status": {
                "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "MemoryPressure"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"},
                               {"type": "DiskPressure", "status": "False"}]}}),
        )
        .expect("patch");
        assert_eq!(
            t,
            json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                {"type": "MemoryPressure", "status": "False"},
                {"type": "DiskPressure", "status": "False"}]}})
        );
        strategic_merge_patch(
            &mut t,
            &json!({"status": {"conditions": [{"type": "DiskPressure", "$patch": "delete"}]}}),
        )
        .expect("patch");
        assert_eq!(t["status"]["conditions"].as_array().map(Vec::len), Some(2));
        assert!(strategic_merge_patch(
            &mut t,
            &json!({"status": {"conditions": [{"status": "x"}]}})
        )
        .is_err());
    }

    #[test]
    fn strategic_replaces_plain_lists() {
        let mut t = json!({"spec": {"taints": [{"key": "a"}]}});
        strategic_merge_patch(&mut t, &json!({"spec": {"taints": [{"key": "b"}]}})).expect("p");
        assert_eq!(t, json!({"spec": {"taints": [{"key": "b"}]}}));
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": {"b": 1}, "l": [1, 2]});
        json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/a/c", "value": 2},
                    {"op": "replace", "path": "/a/b", "value": 3},
                    {"op": "add", "path": "/l/-", "value": 9},
                    {"op": "remove", "path": "/l/0"},
                    {"op": "test", "path": "/a/c", "value": 2}]),
        )
        .expect("patch");
        assert_eq!(d, json!({"a": {"b": 3, "c": 2}, "l": [2, 9]}));
        let before = d.clone();
        assert!(json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/x", "value": 2}])
        )
        .is_err());
        assert_eq!(d, before, "a failed patch applies nothing");
    }
}
