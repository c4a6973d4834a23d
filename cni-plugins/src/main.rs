//! `hako-cni`: a CNI plugin when run with `CNI_COMMAND` set, and `hako-cni overlay ...`
//! for operators.

fn main() {
    std::process::exit(hako_cni::cli::main());
}
