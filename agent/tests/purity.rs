//! The code map's invariant, checked: the pure modules of the agent import no tokio, nix,
//! std::fs, std::process, threads or sockets outside their unit tests, so they stay testable without
//! root and free of effects.

use std::path::{Path, PathBuf};

const FORBIDDEN: [&str; 8] = [
    "tokio::",
    "nix::",
    "std::fs",
    "std::process",
    "std::thread",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
];

fn pure_files() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(src.join("model"))
        .expect("model dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.extend(
        [
            "source/manifest.rs",
            "node/overlay.rs",
            "cli/render.rs",
            "sys/volumes/projection.rs",
        ]
        .map(|f| src.join(f)),
    );
    files.sort();
    files
}

/// The text of a module before its `#[cfg(test)]` unit tests.
fn non_test_part(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

#[test]
fn pure_modules_have_no_effects() {
    let files = pure_files();
    assert!(files.len() >= 16, "pure modules found: {files:?}");
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        for (n, line) in non_test_part(&text).lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in FORBIDDEN {
                if line.contains(word) {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "effects in pure modules:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_an_effect() {
    let text = "use std::fs;\nfn f() {}\n#[cfg(test)]\nmod tests { use tokio::x; }\n";
    let part = non_test_part(text);
    assert!(part.contains("std::fs"));
    assert!(!part.contains("tokio::"));
}
