//! The job program as the job image gets it: `kn_build_job_programs` (scripts/common.sh)
//! builds `kaapana-stats` statically, and it runs in a chroot that holds nothing but the
//! binary and its input (no libc, no loader, no /lib), as in the busybox-only job image.
//! Needs root for the chroot (or unprivileged user namespaces); builds with cargo, so the
//! first run takes a while.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kaapana_dicom::{SiteSpec, SiteStats, write_site};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Whether the ELF file has a PT_INTERP program header (asks for a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn static_kaapana_stats_runs_without_any_library() {
    let out = Command::new("bash")
        .arg("-c")
        .arg(". scripts/common.sh && kn_build_job_programs")
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kn_build_job_programs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut binary = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    if binary.is_relative() {
        binary = workspace_root().join(binary);
    }
    let elf = std::fs::read(&binary).unwrap();
    assert!(!has_interpreter(&elf), "{} asks for a dynamic loader", binary.display());
    let file = Command::new("file").arg(&binary).output().unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(file.contains("statically linked") || file.contains("static-pie linked"), "{file}");

    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&binary, root.path().join("kaapana-stats")).unwrap();
    let spec = SiteSpec { seed: 5, series: 3, slices: 2..=4, rows: 16, columns: 16 };
    let truth = write_site(&spec, &root.path().join("input")).unwrap();
    std::fs::create_dir(root.path().join("output")).unwrap();

    let uid = Command::new("id").arg("-u").output().unwrap();
    let mut run = if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        Command::new("chroot")
    } else {
        let mut c = Command::new("unshare");
        c.args(["--map-root-user", "chroot"]);
        c
    };
    let out = run
        .arg(root.path())
        .args(["/kaapana-stats", "site", "--input", "/input", "--output", "/output"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kaapana-stats in an empty chroot: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = SiteStats::read_json(&root.path().join("output/stats.json")).unwrap();
    assert_eq!(stats, truth.stats());
}
