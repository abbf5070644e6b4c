# Shared set-up for scripts/demo and scripts/test: install what is missing (Debian, as root).
# Sourced, not run.

# Packages the build and the tests need, by the command that shows they are present.
kn_require_packages() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if ((${#missing[@]})); then
        if [ "$(id -u)" != 0 ]; then
            echo "missing packages: ${missing[*]}; run as root or install them first" >&2
            exit 1
        fi
        echo "installing ${missing[*]} ..." >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "cargo is missing: install a Rust toolchain >= 1.88 (https://rustup.rs) first" >&2
            exit 1
        fi
    fi
}
