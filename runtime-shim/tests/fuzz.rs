//! Fuzz targets for hako-shim's parsers of what pods and images supply: image references and
//! pull-secret docker configs (from API objects), and an image's config JSON and its
//! `/etc/passwd` and `/etc/group` (from a registry), plus the CRI log records the agent reads.
//!
//! `fuzz_*` targets are `#[ignore]`d and run for `HAKO_FUZZ_SECONDS` (scripts/fuzz);
//! `quick_*` run a few deterministic inputs in the unit lane. See tests/fuzz/harness.rs.

#[path = "../../tests/fuzz/harness.rs"]
mod harness;
#[path = "../../tests/fuzz/json.rs"]
mod json;

use hako_shim::image::reference::{self, normalize};
use hako_shim::image::{parse_config, process_for};
use hako_shim::logs::{format_record, parse_record, Stream};
use hako_shim::users;
use harness::{apply, edits, fuzz, quick, text, Edit};
use proptest::prelude::*;
use serde_json::{json, Value};

const QUICK: u32 = 64;

// ---- image references and pull secrets -------------------------------------------------

fn reference_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => proptest::sample::select(vec![
            "busybox", "library/", "docker.io/", "index.docker.io/", "localhost", "localhost/",
            "127.0.0.1:5000/", "[::1]:5000/", "quay.io/", "a/b", ":", ":1.36", ":latest", "@",
            "@sha256:", "/", "//", ".", "-", "_", "A", "é",
        ])
        .prop_map(str::to_string),
        1 => "[0-9a-f]{64}",
        1 => "[a-z0-9._-]{1,8}",
        1 => text(),
    ];
    proptest::collection::vec(piece, 1..8).prop_map(|v| v.concat())
}

#[derive(Debug, Clone)]
struct RefInput {
    reference: String,
    secrets: Vec<Value>,
    edits: Vec<Edit>,
}

fn auth_entry() -> impl Strategy<Value = Value> {
    (text(), text(), any::<bool>()).prop_flat_map(|(u, p, b64)| {
        use base64::Engine;
        let auth = if b64 {
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        } else {
            format!("{u}:{p}")
        };
        json::shaped(vec![
            ("auth", json!(auth)),
            ("username", json!(u)),
            ("password", json!(p)),
        ])
    })
}

fn secret() -> impl Strategy<Value = Value> {
    let host = prop_oneof![
        Just("https://index.docker.io/v1/".to_string()),
        Just("127.0.0.1:5000".to_string()),
        Just("quay.io".to_string()),
        text(),
    ];
    let entries = proptest::collection::btree_map(host, auth_entry(), 0..3)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed();
    prop_oneof![
        entries.clone().prop_map(|e| json!({"auths": e})),
        entries,
        json::json(),
    ]
}

fn ref_input() -> impl Strategy<Value = RefInput> {
    (
        reference_text(),
        proptest::collection::vec(secret(), 0..3),
        edits(4),
    )
        .prop_map(|(reference, secrets, edits)| RefInput {
            reference,
            secrets,
            edits,
        })
}

fn check_ref(input: &RefInput) -> Result<(), String> {
    let s = &input.reference;
    if let Ok(r) = normalize(s) {
        // A normalized reference is a fixed point.
        let again = normalize(&r.to_string());
        if again.as_ref() != Ok(&r) {
            return Err(format!("{s:?} -> {r} -> {again:?}"));
        }
        let _ = reference::is_loopback(&r.registry);
    }
    let _ = reference::is_loopback(s);
    let docs: Vec<String> = input
        .secrets
        .iter()
        .map(|v| {
            String::from_utf8_lossy(&apply(v.to_string().into_bytes(), &input.edits)).into_owned()
        })
        .collect();
    for d in &docs {
        let _ = reference::credentials(d, "docker.io");
        let _ = reference::credentials(d, s);
    }
    if let Some(m) = reference::merge_docker_configs(docs.iter().map(String::as_str)) {
        let _ = reference::credentials(&m, "docker.io");
        let _ = reference::credentials(&m, "quay.io");
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_image_reference() {
    fuzz("fuzz_image_reference", ref_input(), check_ref);
}

#[test]
fn quick_image_reference() {
    quick(QUICK, ref_input(), check_ref);
}

// ---- image config, users and groups, log records ---------------------------------------

fn passwd_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("root".to_string()), Just("app".to_string()), text()],
        prop_oneof![
            (0u64..70000).prop_map(|n| n.to_string()),
            Just("4294967296".to_string()),
            Just("-1".to_string()),
            text()
        ],
        prop_oneof![(0u64..70000).prop_map(|n| n.to_string()), text()],
        prop_oneof![Just("/root".to_string()), text()],
        0usize..8,
    )
        .prop_map(|(name, uid, gid, home, fields)| {
            let all = [
                name,
                "x".into(),
                uid,
                gid,
                String::new(),
                home,
                "/bin/sh".into(),
            ];
            all[..fields.min(all.len())].join(":")
        })
}

fn group_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("root".to_string()), Just("wheel".to_string()), text()],
        prop_oneof![(0u64..70000).prop_map(|n| n.to_string()), text()],
        proptest::collection::vec(
            prop_oneof![Just("app".to_string()), Just("".to_string()), text()],
            0..4,
        ),
        0usize..5,
    )
        .prop_map(|(name, gid, members, fields)| {
            let all = [name, "x".into(), gid, members.join(",")];
            all[..fields.min(all.len())].join(":")
        })
}

#[derive(Debug, Clone)]
struct ImageInput {
    config: Value,
    config_edits: Vec<Edit>,
    user: String,
    passwd: Vec<String>,
    group: Vec<String>,
    extra_gids: Vec<u32>,
    command: Vec<String>,
    args: Vec<String>,
    log_payload: Vec<u8>,
}

fn image_input() -> impl Strategy<Value = ImageInput> {
    let config = json::shaped(vec![
        ("Entrypoint", json!(["/bin/sh", "-c"])),
        ("Cmd", json!(["echo hi"])),
        ("Env", json!(["PATH=/bin", "A="])),
        ("WorkingDir", json!("/app")),
        ("User", json!("app:wheel")),
    ])
    .prop_flat_map(|c| json::shaped(vec![("config", c), ("architecture", json!("amd64"))]));
    let user = prop_oneof![
        Just(String::new()),
        Just("app".to_string()),
        Just("1000:wheel".to_string()),
        Just(":".to_string()),
        (any::<u32>(), proptest::option::of(any::<u32>())).prop_map(|(u, g)| match g {
            Some(g) => format!("{u}:{g}"),
            None => u.to_string(),
        }),
        text(),
    ];
    (
        (config, edits(6), user),
        (
            proptest::collection::vec(passwd_line(), 0..4),
            proptest::collection::vec(group_line(), 0..4),
            proptest::collection::vec(any::<u32>(), 0..3),
        ),
        (
            proptest::collection::vec(text(), 0..3),
            proptest::collection::vec(text(), 0..3),
            harness::raw(64),
        ),
    )
        .prop_map(
            |((config, config_edits, user), (passwd, group, extra_gids), (command, args, log))| {
                ImageInput {
                    config,
                    config_edits,
                    user,
                    passwd,
                    group,
                    extra_gids,
                    command,
                    args,
                    log_payload: log,
                }
            },
        )
}

fn check_image(input: &ImageInput) -> Result<(), String> {
    let text = String::from_utf8_lossy(&apply(
        input.config.to_string().into_bytes(),
        &input.config_edits,
    ))
    .into_owned();
    if let Ok(c) = parse_config(&text) {
        let p = process_for(&c, &input.command, &input.args);
        if !input.command.is_empty() && !p.args.starts_with(&input.command) {
            return Err("the pod's command does not lead the process".into());
        }
    }
    let passwd = input.passwd.join("\n");
    let group = input.group.join("\n");
    if let Ok(id) = users::resolve(&input.user, &input.extra_gids, &passwd, &group) {
        // A numeric user is that uid, whatever the image's files say.
        let user = input.user.split(':').next().unwrap_or("");
        if let Ok(uid) = user.parse::<u32>() {
            if id.uid != uid {
                return Err(format!("user {user} resolved to uid {}", id.uid));
            }
        }
        for g in &input.extra_gids {
            if !id.groups.contains(g) {
                return Err(format!("supplementary gid {g} dropped"));
            }
        }
    }
    // A record the shim writes reads back with its payload (one line of it).
    let line: Vec<u8> = input
        .log_payload
        .iter()
        .copied()
        .take_while(|b| *b != b'\n')
        .collect();
    let rec = format_record(
        "2026-01-02T03:04:05.123456789Z",
        Stream::Stderr,
        true,
        &line,
    );
    let rec = String::from_utf8_lossy(&rec).into_owned();
    let parsed = parse_record(rec.trim_end_matches('\n'));
    let want = String::from_utf8_lossy(&line).into_owned();
    if parsed
        .as_ref()
        .map(|r| (&r.line, r.partial, r.stream.as_str()))
        != Some((&want, true, "stderr"))
    {
        return Err(format!("record read back as {parsed:?}"));
    }
    let _ = parse_record(&String::from_utf8_lossy(&input.log_payload));
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_image_metadata() {
    fuzz("fuzz_image_metadata", image_input(), check_image);
}

#[test]
fn quick_image_metadata() {
    quick(QUICK, image_input(), check_image);
}
