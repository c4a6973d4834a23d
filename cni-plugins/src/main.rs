//! `hako-cni`: command-line entry point (answers VERSION only so far).

fn main() {
    let out = hako_cni::version::version_info(hako_cni::version::LATEST);
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), format!("{out}\n").as_bytes());
}
