//! The written files are valid DICOM for an independent implementation: Debian's dcmtk
//! (`apt-get install dcmtk`; `scripts/common.sh` installs it) dumps, checks and renders every
//! file of a small synthetic site.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use kaapana_dicom::{SiteSpec, write_site};

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: apt-get install dcmtk (scripts/test does)"
    );
    path
}

#[test]
fn dcmdump_reads_every_file_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SiteSpec { seed: 77, series: 4, slices: 2..=4, rows: 24, columns: 32 };
    let truth = write_site(&spec, dir.path()).unwrap();
    let (dcmdump, dcmftest, dcm2pnm) = (tool("dcmdump"), tool("dcmftest"), tool("dcm2pnm"));
    let mut checked = 0;
    for (uid, series) in &truth.series {
        for n in 1..=series.slices {
            let file = dir.path().join(uid).join(format!("{n}.dcm"));
            let out = Command::new(&dcmdump).arg(&file).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "dcmdump {}: {}\n{stdout}\n{stderr}",
                file.display(),
                out.status
            );
            for line in stdout.lines().chain(stderr.lines()) {
                assert!(!line.starts_with("E:"), "dcmdump {}: {line}", file.display());
            }
            assert!(stdout.contains("PixelData"), "{stdout}");
            assert!(stdout.contains(&format!("(0020,000e) UI [{uid}]")), "{stdout}");
            assert!(stdout.contains("=CTImageStorage"), "{stdout}");
            assert!(stdout.contains("=LittleEndianExplicit"), "{stdout}");
            assert!(stdout.contains(&format!("(0020,0013) IS [{n}]")), "{stdout}");

            // dcmftest: a Part-10 file (preamble, "DICM", meta header).
            let out = Command::new(&dcmftest).arg(&file).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && stdout.starts_with("yes:"), "dcmftest: {stdout}");

            // dcm2pnm decodes the pixel data with the image pixel module's attributes.
            let pgm = dir.path().join("slice.pgm");
            let out = Command::new(&dcm2pnm).arg("+Wm").arg(&file).arg(&pgm).output().unwrap();
            assert!(
                out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("E:"),
                "dcm2pnm {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let image = std::fs::read(&pgm).unwrap();
            assert!(image.starts_with(b"P5\n32 24\n"), "{:?}", &image[..12.min(image.len())]);
            checked += 1;
        }
    }
    assert_eq!(checked, truth.files);
    assert!(checked >= 8);
}
