//! A minimal job image built on the spot from the host's static busybox: what the demo and the
//! tests run their jobs in, without a registry or a container build tool.
//!
//! [`build_image`] writes an OCI image layout tarball (as `kaapana-node image import` takes)
//! with one layer: `/bin/busybox` (Debian's `busybox-static`), a symlink per applet in
//! [`APPLETS`], `/etc/passwd` with root, an empty `/tmp` and `/etc/image-tag`. Every file has
//! mtime 0 and owner root, so the same busybox and tag give the same digest.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use kaapana_protocol::{ImageDigest, Sha256Digest};
use serde_json::json;

/// Where the static busybox is read from.
pub const BUSYBOX: &str = "/bin/busybox";

/// The busybox applets linked into the image's `/bin` (all pointing to `/bin/busybox`).
pub const APPLETS: &[&str] = &[
    "sh",
    "sha256sum",
    "cat",
    "ls",
    "nc",
    "sleep",
    "head",
    "dd",
    "tr",
    "echo",
    "ip",
    "awk",
    "true",
    "false",
    "wc",
    "id",
    "mkdir",
    "env",
    "sed",
    "grep",
    "printf",
    "test",
    "yes",
    "touch",
    "hostname",
];

fn digest_of(bytes: &[u8]) -> String {
    Sha256Digest::of(bytes).to_string()
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
    b.append_data(&mut h, path, data)
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0, mode);
    b.append_data(&mut h, path, io::empty())
}

fn add_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) -> io::Result<()> {
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, path, target)
}

fn json_bytes(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// Builds an OCI image layout tarball `dir/<tag>[-gz].oci.tar` from the host's static busybox
/// (one layer, gzip-compressed if `gzip`) and returns its path and the image's manifest digest
/// (what jobs name it by). `tag` goes into the image's files, so different tags give different
/// digests.
///
/// Fails with [`io::ErrorKind::NotFound`] and a hint to install `busybox-static` when
/// `/bin/busybox` is missing, or with the error of writing the file.
pub fn build_image(dir: &Path, tag: &str, gzip: bool) -> io::Result<(PathBuf, ImageDigest)> {
    let busybox = std::fs::read(BUSYBOX).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read {BUSYBOX} ({e}): the job image is built from the static busybox; \
                 apt-get install busybox-static"
            ),
        )
    })?;
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "etc"] {
        add_dir(&mut layer, d, 0o755)?;
    }
    add_dir(&mut layer, "tmp", 0o1777)?;
    add_file(&mut layer, "bin/busybox", 0o755, &busybox)?;
    for a in APPLETS {
        add_symlink(&mut layer, &format!("bin/{a}"), "busybox")?;
    }
    add_file(&mut layer, "etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    add_file(&mut layer, "etc/image-tag", 0o644, tag.as_bytes())?;
    let layer = layer.into_inner()?;
    let diff_id = digest_of(&layer);
    let (layer_blob, layer_type) = if gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer)?;
        (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (layer, "application/vnd.oci.image.layer.v1.tar")
    };

    let config = json_bytes(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))?;
    let manifest = json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(&config),
            "size": config.len(),
        },
        "layers": [{"mediaType": layer_type, "digest": digest_of(&layer_blob), "size": layer_blob.len()}],
    }))?;
    let manifest_digest = digest_of(&manifest);
    let index = json_bytes(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))?;

    let mut outer = tar::Builder::new(Vec::new());
    add_file(&mut outer, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add_file(&mut outer, "index.json", 0o644, &index)?;
    add_dir(&mut outer, "blobs", 0o755)?;
    add_dir(&mut outer, "blobs/sha256", 0o755)?;
    for blob in [&layer_blob, &config, &manifest] {
        let name = format!("blobs/sha256/{}", Sha256Digest::of(blob).hex());
        add_file(&mut outer, &name, 0o644, blob)?;
    }
    let tar = dir.join(format!("{tag}{}.oci.tar", if gzip { "-gz" } else { "" }));
    std::fs::write(&tar, outer.into_inner()?)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", tar.display())))?;
    let digest = ImageDigest::parse(&manifest_digest)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok((tar, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tag_same_digest_other_tag_other_digest() {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing: apt-get install busybox-static (scripts/test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let a = tempfile::tempdir().unwrap();
        let (tar, d1) = build_image(dir.path(), "one", false).unwrap();
        assert_eq!(tar, dir.path().join("one.oci.tar"));
        let (_, d2) = build_image(a.path(), "one", false).unwrap();
        let (gz, d3) = build_image(dir.path(), "one", true).unwrap();
        let (_, d4) = build_image(dir.path(), "two", false).unwrap();
        assert_eq!(d1, d2);
        assert_ne!(d1, d3);
        assert_ne!(d1, d4);
        assert_eq!(gz, dir.path().join("one-gz.oci.tar"));
        let mut names = Vec::new();
        for e in tar::Archive::new(std::fs::File::open(&tar).unwrap()).entries().unwrap() {
            names.push(e.unwrap().path().unwrap().to_string_lossy().into_owned());
        }
        assert!(names.contains(&"index.json".to_owned()), "{names:?}");
        assert!(
            names.contains(&format!(
                "blobs/sha256/{}",
                d1.to_string().trim_start_matches("sha256:")
            ))
        );
    }
}
