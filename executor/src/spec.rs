//! The OCI runtime spec of a job's container (pure: no I/O besides path checks).
//!
//! The sandbox: the image's root filesystem (writable, thrown away afterwards); `/input`
//! read-only; `/input/<name>` read-only per upstream result; `/output` writable; new pid, ipc,
//! uts, mount and network namespaces (the network namespace has only `lo`); a cgroup with the
//! CPU quota, memory limit and pids limit; no new privileges; a short capability list; the
//! usual masked and read-only `/proc` paths.
//!
//! `/input` with upstream results: runc must create `/input/<name>` mount points, which it
//! cannot do inside a read-only bind mount of the dataset. So `/input` is then a read-only
//! overlay of a stub folder holding the empty `<name>` folders over the dataset (or, without a
//! dataset, a read-only bind of the stub alone); the upstream folders are bound onto them.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::ExecError;
use super::image::RunConfig;

/// The capabilities a job keeps (Docker's default set minus `NET_RAW`, `NET_BIND_SERVICE`,
/// `MKNOD`, `SYS_CHROOT`, `AUDIT_WRITE` and `SETFCAP`): enough to work on files as root.
pub(crate) const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
];

/// CFS period for the CPU quota, in microseconds.
const CPU_PERIOD: u64 = 100_000;
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything the spec is made of.
#[derive(Debug)]
pub(crate) struct SpecParams<'a> {
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) cwd: String,
    pub(crate) user: (u32, u32),
    pub(crate) mounts: Vec<Value>,
    pub(crate) cgroups_path: String,
    pub(crate) cpu_millis: u32,
    pub(crate) memory_bytes: u64,
    /// Whether to set memory+swap to the memory limit (cgroup v1 needs swap accounting).
    pub(crate) limit_swap: bool,
    pub(crate) pids_max: i64,
    pub(crate) hostname: &'a str,
}

fn bad_job(detail: impl Into<String>) -> ExecError {
    ExecError::BadJob { detail: detail.into() }
}

/// The process's argv: the job's command, or the image's Entrypoint + Cmd.
pub(crate) fn args(command: &[String], config: &RunConfig) -> Result<Vec<String>, ExecError> {
    let args: Vec<String> = if command.is_empty() {
        let mut a = config.entrypoint.clone().unwrap_or_default();
        a.extend(config.cmd.clone().unwrap_or_default());
        a
    } else {
        command.to_vec()
    };
    if args.is_empty() {
        return Err(bad_job("the job has no command and its image no Entrypoint or Cmd"));
    }
    Ok(args)
}

/// The image's Env, then the job's variables (a job variable replaces the image's).
pub(crate) fn env(config: &RunConfig, job: &[(String, String)]) -> Result<Vec<String>, ExecError> {
    let mut out: Vec<String> = config.env.clone().unwrap_or_default();
    if !out.iter().any(|v| v.starts_with("PATH=")) {
        out.insert(0, DEFAULT_PATH.to_owned());
    }
    for (k, v) in job {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(bad_job(format!("invalid environment variable name {k:?}")));
        }
        let prefix = format!("{k}=");
        out.retain(|e| !e.starts_with(&prefix));
        out.push(format!("{k}={v}"));
    }
    Ok(out)
}

/// The image's `User` as `(uid, gid)`: empty is root; only numeric `uid[:gid]` is supported
/// (names would need the image's `/etc/passwd`).
pub(crate) fn user(config: &RunConfig) -> Result<(u32, u32), ExecError> {
    let user = config.user.as_deref().unwrap_or("").trim();
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    match (u.parse::<u32>(), g.parse::<u32>()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(ExecError::BadImage {
            detail: format!(
                "the image's User {user:?} is not numeric (uid[:gid]); only numeric users are \
                 supported"
            ),
        }),
    }
}

fn bind(dest: &str, source: &Path, writable: bool) -> Value {
    let mode = if writable { "rw" } else { "ro" };
    json!({
        "destination": dest,
        "type": "bind",
        "source": source,
        "options": ["rbind", mode, "nosuid", "nodev"],
    })
}

/// An existing folder as an absolute, symlink-free path.
pub(crate) fn folder(what: &str, p: &Path) -> Result<PathBuf, ExecError> {
    let canon = p.canonicalize().map_err(|e| ExecError::io(p, e))?;
    if !canon.is_dir() {
        return Err(bad_job(format!("{what} {} is not a folder", p.display())));
    }
    Ok(canon)
}

/// Whether `name` can be a folder name under `/input`.
pub(crate) fn valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// The mounts for `/input`, `/input/<name>` and `/output`. `stub` is an empty folder the
/// executor owns for this job (it gets the `<name>` mount points).
pub(crate) fn data_mounts(
    input: Option<&Path>,
    upstream: &[(String, PathBuf)],
    output: &Path,
    stub: &Path,
) -> Result<Vec<Value>, ExecError> {
    let mut mounts = Vec::new();
    let output = folder("the output", output)?;
    let input = input.map(|p| folder("the input", p)).transpose()?;
    let mut ups = Vec::new();
    for (name, path) in upstream {
        if !valid_upstream_name(name) {
            return Err(bad_job(format!("invalid upstream name {name:?}")));
        }
        if ups.iter().any(|(n, _): &(String, PathBuf)| n == name) {
            return Err(bad_job(format!("upstream name {name:?} appears twice")));
        }
        ups.push((name.clone(), folder(&format!("upstream result {name:?}"), path)?));
    }
    for (name, _) in &ups {
        let dir = stub.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| ExecError::io(&dir, e))?;
    }
    match (&input, ups.is_empty()) {
        (Some(dataset), true) => mounts.push(bind("/input", dataset, false)),
        (Some(dataset), false) => {
            let stub = folder("the stub", stub)?;
            for p in [&stub, dataset] {
                let s = p.to_string_lossy();
                if s.contains([':', ',', '\\']) {
                    return Err(bad_job(format!(
                        "{s} cannot be combined with upstream results (':', ',' or '\\' in the \
                         path)"
                    )));
                }
            }
            mounts.push(json!({
                "destination": "/input",
                "type": "overlay",
                "source": "overlay",
                "options": ["ro", "nosuid", "nodev",
                    format!("lowerdir={}:{}", stub.display(), dataset.display())],
            }));
        }
        (None, _) => mounts.push(bind("/input", stub, false)),
    }
    for (name, path) in &ups {
        mounts.push(bind(&format!("/input/{name}"), path, false));
    }
    mounts.push(bind("/output", &output, true));
    Ok(mounts)
}

/// The whole OCI runtime spec.
pub(crate) fn build(p: SpecParams<'_>) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    mounts.extend(p.mounts);

    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "pids": {"limit": p.pids_max},
    });
    if p.memory_bytes > 0 {
        let limit = i64::try_from(p.memory_bytes).unwrap_or(i64::MAX);
        resources["memory"] = if p.limit_swap {
            json!({"limit": limit, "swap": limit})
        } else {
            json!({"limit": limit})
        };
    }
    if p.cpu_millis > 0 {
        let quota = u64::from(p.cpu_millis) * CPU_PERIOD / 1000;
        resources["cpu"] = json!({"quota": quota.max(1000), "period": CPU_PERIOD});
    }

    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": p.user.0, "gid": p.user.1},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": p.hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": p.cgroups_path,
            "resources": resources,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "network"},
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ep: &[&str], cmd: &[&str]) -> RunConfig {
        RunConfig {
            entrypoint: Some(ep.iter().map(|s| (*s).to_owned()).collect()),
            cmd: Some(cmd.iter().map(|s| (*s).to_owned()).collect()),
            env: Some(vec!["A=1".into(), "B=2".into()]),
            ..RunConfig::default()
        }
    }

    #[test]
    fn command_overrides_entrypoint_and_cmd() {
        let c = cfg(&["/bin/sh", "-c"], &["echo hi"]);
        assert_eq!(args(&[], &c).unwrap(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(args(&["ls".into()], &c).unwrap(), ["ls"]);
        assert!(args(&[], &RunConfig::default()).is_err());
    }

    #[test]
    fn job_env_overrides_image_env_and_path_defaults() {
        let e =
            env(&cfg(&[], &[]), &[("B".into(), "3".into()), ("C".into(), "x=y".into())]).unwrap();
        assert_eq!(e, [DEFAULT_PATH, "A=1", "B=3", "C=x=y"]);
        assert!(env(&RunConfig::default(), &[("X=Y".into(), String::new())]).is_err());
    }

    #[test]
    fn users_must_be_numeric() {
        let mut c = RunConfig::default();
        assert_eq!(user(&c).unwrap(), (0, 0));
        c.user = Some("1000:100".into());
        assert_eq!(user(&c).unwrap(), (1000, 100));
        c.user = Some("7".into());
        assert_eq!(user(&c).unwrap(), (7, 7));
        c.user = Some("nobody".into());
        assert!(matches!(user(&c), Err(ExecError::BadImage { .. })));
    }

    #[test]
    fn upstream_names_cannot_escape_input() {
        assert!(valid_upstream_name("seg"));
        for n in ["", ".", "..", "a/b", "a\0"] {
            assert!(!valid_upstream_name(n), "{n:?}");
        }
    }

    #[test]
    fn limits_become_cgroup_resources() {
        let spec = build(SpecParams {
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: (0, 0),
            mounts: vec![],
            cgroups_path: "/ns/id".into(),
            cpu_millis: 500,
            memory_bytes: 32 << 20,
            limit_swap: true,
            pids_max: 100,
            hostname: "job",
        });
        let r = &spec["linux"]["resources"];
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["memory"]["swap"], 32 << 20);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        let ns = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().any(|n| n["type"] == "network" && n.get("path").is_none()));
    }
}
