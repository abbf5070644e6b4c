# Shared set-up for scripts/demo and scripts/test: install what is missing (Debian, as root).
# Sourced, not run.

# Packages the build and the tests need, by the command that shows they are present.
kn_require_packages() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # The containerd executor: containerd-client's build needs protoc; the executor tests run a
    # private containerd with runc and build their job image from the static busybox.
    command -v containerd >/dev/null 2>&1 || missing+=(containerd)
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
        missing+=(busybox-static)
    # The registry pull tests run a private OCI registry (Debian's distribution 2.x) on loopback.
    command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
    # The fault tests give each node its own network namespace (iproute2's `ip netns`,
    # util-linux's `nsenter`) and cut links or drop packets with nftables.
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    # The NAT tests capture what a relay forwards (to show it cannot read it) with tcpdump.
    command -v tcpdump >/dev/null 2>&1 || [ -x /usr/bin/tcpdump ] || missing+=(tcpdump)
    # The Airflow tests stop `airflow standalone`'s process group with pgrep.
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    # The PACS tests run Debian's Orthanc with its DICOMweb plugin; they read the DICOM files
    # of the pydicom wheel, which they fetch with pip (nothing is installed from it).
    command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
    [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    # The DICOM tests check the synthetic CT files with dcmtk's dcmdump, dcmftest and dcm2pnm.
    command -v dcmdump >/dev/null 2>&1 || missing+=(dcmtk)
    # The dashboard's browser tests: Debian's Chromium, driven by Playwright on Node.js (>= 20).
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
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
            echo "cargo is missing: install a Rust toolchain >= 1.89 (https://rustup.rs) first" >&2
            exit 1
        fi
    fi
}

# Playwright for the dashboard's browser tests, from the lockfile (playwright-core only: it
# downloads no browser; the tests use Debian's /usr/bin/chromium).
kn_playwright() {
    (cd node/tests/dashboard && npm ci --no-audit --no-fund --prefer-offline --loglevel=error >&2)
}

# The job programs (`kaapana-stats`, `kaapana-fedavg`) run in the busybox job image, which has
# no glibc: build them statically linked (crt-static) into their own target folder, side by
# side, and print the path of `kaapana-stats` as the last line (callers rely on it; the other
# programs are in the same folder). RUSTFLAGS apply only to the `--target` build, so build
# scripts and proc-macros stay dynamic; the separate folder keeps the normal builds' cache valid.
kn_build_job_programs() {
    local triple=x86_64-unknown-linux-gnu
    local dir="${CARGO_TARGET_DIR:-target}/job-programs"
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$dir" \
        cargo build --locked -q --profile job-program -p kaapana-dicom --bin kaapana-stats \
        --bin kaapana-fedavg --target "$triple" || return
    echo "$dir/$triple/job-program/kaapana-stats"
}

# Python tools the tests use, in a virtual environment of their own (created once, reused):
# kubernetes-validate (the official Kubernetes schemas) and helm-python-sdk (the Helm engine).
# Prints the environment's python. Needs python3-venv (kn_require_packages installs it).
kn_python_tools() {
    local venv="${KN_PYTHON_TOOLS:-/var/tmp/kaapana-node-py}"
    if ! "$venv/bin/python" -c 'import kubernetes_validate, helm_python' >/dev/null 2>&1; then
        python3 -m venv "$venv" >&2 || return
        "$venv/bin/pip" install -q kubernetes-validate helm-python-sdk >&2 || return
    fi
    echo "$venv/bin/python"
}

# Apache Airflow for the Airflow executor's tests (`airflow standalone` on SQLite), in a virtual
# environment of its own (created once, reused): apache-airflow pinned to a 3.x release, which
# pip resolves here without a constraints file (about 30 s from PyPI). Prints the path of the
# `airflow` binary. Needs python3-venv (kn_require_packages installs it).
KN_AIRFLOW_VERSION="${KN_AIRFLOW_VERSION:-3.1.8}"
# Airflow 2 too (Kaapana 0.6 ships 2.11): its REST API /api/v1 with basic auth is tested with
# an `airflow standalone` of this version in a venv of its own (about 3 min from PyPI).
KN_AIRFLOW2_VERSION="${KN_AIRFLOW2_VERSION:-2.11.0}"
kn_airflow() { kn_airflow_venv "$KN_AIRFLOW_VERSION" "${KN_AIRFLOW_VENV:-/var/tmp/kaapana-node-airflow}"; }
kn_airflow2() { kn_airflow_venv "$KN_AIRFLOW2_VERSION" "${KN_AIRFLOW2_VENV:-/var/tmp/kaapana-node-airflow2}"; }
# kn_airflow_venv VERSION VENV: installs apache-airflow==VERSION into VENV unless it is there.
kn_airflow_venv() {
    local version="$1" venv="$2"
    if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('apache-airflow') != '$version')" >/dev/null 2>&1; then
        echo "installing apache-airflow $version into $venv ..." >&2
        python3 -m venv "$venv" >&2 || return
        "$venv/bin/pip" install -q "apache-airflow==$version" >&2 || return
    fi
    echo "$venv/bin/airflow"
}
