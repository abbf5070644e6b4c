//! A minimal job image built on the spot from the host's static busybox: what the demo and the
//! tests run their jobs in, without a registry or a container build tool.
//!
//! [`build_image`] writes an OCI image layout tarball (as `kaapana-node image import` takes)
//! with one layer: `/bin/busybox` (Debian's `busybox-static`), a symlink per applet in
//! [`APPLETS`], `/etc/passwd` with root, an empty `/tmp` and `/etc/image-tag`. Every file has
//! mtime 0 and owner root, so the same busybox and tag give the same digest.
//! [`build_image_with`] adds host files (e.g. a static job program as `bin/kaapana-stats`)
//! after those, in the order given, so the same files give the same digest too.

use std::collections::BTreeSet;
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

/// Appends `extra` (and their missing parent folders) to the layer after the base entries.
fn add_extra_files(b: &mut tar::Builder<Vec<u8>>, extra: &[ExtraFile]) -> io::Result<()> {
    let invalid = |path: &str, why: &str| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("image path {path:?}: {why}"))
    };
    let mut dirs: BTreeSet<String> = ["bin", "etc", "tmp"].map(String::from).into();
    let mut files: BTreeSet<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    files.extend(["bin/busybox", "etc/passwd", "etc/image-tag"].map(String::from));
    for file in extra {
        let path = file.path_in_image.as_str();
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err(invalid(path, "give a relative path without empty, . or .. components"));
        }
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            if files.contains(&parent) {
                return Err(invalid(path, &format!("its parent {parent:?} is a file")));
            }
            if dirs.insert(parent.clone()) {
                add_dir(b, &parent, 0o755)?;
            }
        }
        if dirs.contains(path) || !files.insert(path.to_owned()) {
            return Err(invalid(path, "the image already has it"));
        }
        let data = std::fs::read(&file.host).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot read {} for the job image: {e}", file.host.display()),
            )
        })?;
        add_file(b, path, file.mode, &data)?;
    }
    Ok(())
}

fn json_bytes(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// A host file copied into the job image by [`build_image_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// Where it goes, relative to the image's root, e.g. `bin/kaapana-stats`; missing parent
    /// folders are created (mode 0755).
    pub path_in_image: String,
    /// The file on the host (read when the image is built).
    pub host: PathBuf,
    /// Its mode in the image, e.g. `0o755`.
    pub mode: u32,
}

/// Builds an OCI image layout tarball `dir/<tag>[-gz].oci.tar` from the host's static busybox
/// (one layer, gzip-compressed if `gzip`) and returns its path and the image's manifest digest
/// (what jobs name it by). `tag` goes into the image's files, so different tags give different
/// digests.
///
/// Fails with [`io::ErrorKind::NotFound`] and a hint to install `busybox-static` when
/// `/bin/busybox` is missing, or with the error of writing the file.
pub fn build_image(dir: &Path, tag: &str, gzip: bool) -> io::Result<(PathBuf, ImageDigest)> {
    build_image_with(dir, tag, gzip, &[])
}

/// [`build_image`] with `extra` host files added to the layer (the image of no extra files is
/// the one [`build_image`] builds). The host programs must run with busybox alone: statically
/// linked, no glibc.
///
/// Fails with [`io::ErrorKind::InvalidInput`] for a `path_in_image` that is absolute, empty,
/// contains `.` or `..`, or names a path the image already has, and with the error of reading
/// a host file (naming it).
pub fn build_image_with(
    dir: &Path,
    tag: &str,
    gzip: bool,
    extra: &[ExtraFile],
) -> io::Result<(PathBuf, ImageDigest)> {
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
    add_extra_files(&mut layer, extra)?;
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

    /// The entries (path, mode, contents) of the image's only layer.
    fn layer_entries(tar: &Path) -> Vec<(String, u32, Vec<u8>)> {
        use std::io::Read as _;
        let mut blobs = std::collections::BTreeMap::new();
        for e in tar::Archive::new(std::fs::File::open(tar).unwrap()).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            blobs.insert(name, data);
        }
        let blob = |digest: &serde_json::Value| {
            let hex = digest.as_str().unwrap().trim_start_matches("sha256:");
            blobs[&format!("blobs/sha256/{hex}")].clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        let mut out = Vec::new();
        for e in tar::Archive::new(&layer[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, mode, data));
        }
        out
    }

    #[test]
    fn extra_files_go_into_the_layer_deterministically() {
        let host = tempfile::tempdir().unwrap();
        let prog = host.path().join("prog");
        std::fs::write(&prog, b"#!/bin/sh\necho hi\n").unwrap();
        let extra = [
            ExtraFile { path_in_image: "bin/prog".into(), host: prog.clone(), mode: 0o755 },
            ExtraFile { path_in_image: "opt/kn/data.txt".into(), host: prog.clone(), mode: 0o644 },
        ];
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (plain_tar, plain) = build_image(a.path(), "x", false).unwrap();
        let (_, same_as_plain) = build_image_with(b.path(), "x", false, &[]).unwrap();
        assert_eq!(plain, same_as_plain);
        let (tar, d1) = build_image_with(a.path(), "x", false, &extra).unwrap();
        assert_eq!(tar, plain_tar);
        let (_, d2) = build_image_with(b.path(), "x", false, &extra).unwrap();
        assert_eq!(d1, d2);
        assert_ne!(d1, plain);
        let entries = layer_entries(&tar);
        let find = |p: &str| entries.iter().find(|(n, ..)| n.trim_end_matches('/') == p);
        let (_, mode, data) = find("bin/prog").expect("bin/prog in the layer");
        assert_eq!((*mode, data.as_slice()), (0o755, &b"#!/bin/sh\necho hi\n"[..]));
        assert_eq!(find("opt/kn/data.txt").unwrap().1, 0o644);
        assert!(find("opt").is_some() && find("opt/kn").is_some());
        assert!(find("bin/busybox").is_some());

        for bad in ["/bin/prog", "bin/../x", "bin/sh", "bin/busybox/x", "", "bin//x", "tmp"] {
            let e = [ExtraFile { path_in_image: bad.into(), host: prog.clone(), mode: 0o755 }];
            let err = build_image_with(a.path(), "x", false, &e).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}: {err}");
        }
        let missing = host.path().join("missing");
        let e = [ExtraFile { path_in_image: "bin/m".into(), host: missing.clone(), mode: 0o755 }];
        let err = build_image_with(a.path(), "x", false, &e).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }
}
