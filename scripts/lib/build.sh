# scripts/lib/build.sh: sourced by scripts/demo and scripts/install. Builds release binaries
# with cargo's own progress on the terminal, as the user who called sudo (so target/ stays
# theirs and their rustup toolchain is used: sudo's secure_path does not hold ~/.cargo/bin).
#   hako_build PKG_ARGS...      e.g. hako_build -p hako-agent -p hako-shim
# Reads REPO and CARGO_TARGET_DIR. Prints how long it took.

# The cargo to use ($HAKO_CARGO_BIN) and the user to build as ($HAKO_CARGO_USER, empty for
# the current one): $HAKO_CARGO, then the sudo caller's ~/.cargo/bin/cargo (built as the
# caller), then cargo on PATH, then root's ~/.cargo/bin/cargo.
hako_find_cargo() {
  local home
  HAKO_CARGO_BIN= HAKO_CARGO_USER=
  if [ -n "${HAKO_CARGO:-}" ]; then HAKO_CARGO_BIN=$HAKO_CARGO; return 0; fi
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(id -u)" = 0 ]; then
    home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    if [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ]; then
      HAKO_CARGO_BIN=$home/.cargo/bin/cargo HAKO_CARGO_USER=$SUDO_USER
      return 0
    fi
  fi
  if command -v cargo >/dev/null 2>&1; then HAKO_CARGO_BIN=$(command -v cargo); return 0; fi
  if [ -x /root/.cargo/bin/cargo ]; then HAKO_CARGO_BIN=/root/.cargo/bin/cargo; return 0; fi
  return 1
}

hako_build() {
  local cargo start secs as_user=()
  if ! hako_find_cargo; then
    cat >&2 <<TXT
cargo not found. hako needs Rust 1.85 or newer (Debian 12's cargo is older):
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh     # as the user who builds
then run this command again (with sudo, the caller's ~/.cargo/bin/cargo is found).
TXT
    return 1
  fi
  cargo=$HAKO_CARGO_BIN
  if [ -n "$HAKO_CARGO_USER" ]; then
    # Build as the caller: their toolchain, their cache, a target/ they own.
    as_user=(sudo -u "$HAKO_CARGO_USER" -H env "PATH=$(dirname "$cargo"):/usr/local/bin:/usr/bin:/bin"
             "CARGO_TARGET_DIR=$CARGO_TARGET_DIR")
  fi
  echo "building: cargo build --release $* (into $CARGO_TARGET_DIR)" >&2
  if [ ! -d "$CARGO_TARGET_DIR/release" ]; then
    echo "first build: about 370 crates; measured at 19 min on a 2-core AMD EPYC VM shared with" >&2
    echo "other builds (README.md, On a fresh machine); later builds take seconds" >&2
  fi
  start=$(date +%s)
  # No -q: cargo's own progress bar on a terminal, and a "Compiling <crate>" line per crate
  # when the output is a log or a pipe.
  (cd "$REPO" && "${as_user[@]}" "$cargo" build --release "$@")
  secs=$(( $(date +%s) - start ))
  echo "built in $((secs / 60)) min $((secs % 60)) s" >&2
}
