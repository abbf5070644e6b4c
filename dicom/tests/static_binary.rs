//! The job programs as the job image gets them: `kn_build_job_programs` (scripts/common.sh)
//! builds `kaapana-stats` and `kaapana-fedavg` statically, and they run in a chroot that holds
//! nothing but the binaries and their input (no libc, no loader, no /lib), as in the
//! busybox-only job image.
//! Needs root for the chroot (or unprivileged user namespaces); builds with cargo, so the
//! first run takes a while.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kaapana_dicom::fedavg::{self, Model, TrainOptions};
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
fn static_job_programs_run_without_any_library() {
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
    assert!(binary.ends_with("kaapana-stats"), "the last line is {}", binary.display());
    // kaapana-fedavg is built into the same folder.
    let fedavg_binary = binary.with_file_name("kaapana-fedavg");
    for program in [&binary, &fedavg_binary] {
        let elf = std::fs::read(program).unwrap();
        assert!(!has_interpreter(&elf), "{} asks for a dynamic loader", program.display());
        let file = Command::new("file").arg(program).output().unwrap();
        let file = String::from_utf8_lossy(&file.stdout);
        assert!(file.contains("statically linked") || file.contains("static-pie linked"), "{file}");
    }

    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&binary, root.path().join("kaapana-stats")).unwrap();
    std::fs::copy(&fedavg_binary, root.path().join("kaapana-fedavg")).unwrap();
    let spec = SiteSpec { seed: 5, series: 3, slices: 2..=4, rows: 16, columns: 16 };
    let truth = write_site(&spec, &root.path().join("input")).unwrap();
    std::fs::create_dir(root.path().join("output")).unwrap();

    let uid = Command::new("id").arg("-u").output().unwrap();
    let is_root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    let chroot = || {
        if is_root {
            Command::new("chroot")
        } else {
            let mut c = Command::new("unshare");
            c.args(["--map-root-user", "chroot"]);
            c
        }
    };
    let out = chroot()
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

    // kaapana-fedavg train: the same model as the library computes (to rounding: the static
    // and the test's libm may differ in the last bit).
    let out = chroot()
        .arg(root.path())
        .args(["/kaapana-fedavg", "train", "--data", "/input", "--input", "/none"])
        .args(["--output", "/fl-out"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kaapana-fedavg in an empty chroot: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let model = Model::read_json(&root.path().join("fl-out/model.json")).unwrap();
    let samples = fedavg::samples_from_folder(&root.path().join("input")).unwrap();
    let expected = fedavg::train(&Model::zeros(), &samples, &TrainOptions::default()).unwrap();
    assert_eq!(model.features, expected.features);
    for (a, b) in model.weights.iter().zip(&expected.weights) {
        assert!((a - b).abs() < 1e-9, "{model:?} != {expected:?}");
    }
    assert_eq!(std::fs::read_to_string(root.path().join("fl-out/samples")).unwrap(), "3\n");
}
