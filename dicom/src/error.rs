//! `DicomError`: what can go wrong writing a synthetic site or computing statistics.

use std::path::PathBuf;

/// Why a site could not be written, a DICOM file not read, or statistics not computed.
///
/// Every variant that concerns a file names it, so that the job's log says which file to look
/// at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DicomError {
    /// Reading or writing a file or folder failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create the folder", ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `.dcm` file that is not a DICOM Part-10 file dicom-rs can parse.
    #[error(
        "{} is not a readable DICOM file: {reason} (every file ending in .dcm must be a DICOM \
         Part-10 file: 128-byte preamble, \"DICM\", file meta group; remove or rename it)",
        path.display()
    )]
    NotDicom {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A DICOM file lacks an attribute the statistics need, or has an unusable value.
    #[error("{}: attribute {attribute} {reason}", path.display())]
    Attribute {
        /// The file.
        path: PathBuf,
        /// The attribute's keyword, e.g. `SeriesInstanceUID`.
        attribute: &'static str,
        /// What is wrong ("is missing", "has the value ... but ... is expected").
        reason: String,
    },
    /// The pixel data of a DICOM file cannot be read as native (uncompressed) samples.
    #[error("{}: cannot read the pixel data: {reason}", path.display())]
    PixelData {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Building or encoding a DICOM object failed (a bug in the generator, or a value dicom-rs
    /// refuses).
    #[error("cannot encode {} as DICOM: {reason}", path.display())]
    Encode {
        /// The file that was to be written.
        path: PathBuf,
        /// What dicom-rs said.
        reason: String,
    },
    /// A statistics file that is not JSON written by `kaapana-stats`.
    #[error(
        "{} is not a statistics file written by `kaapana-stats site` or `merge`: {reason}",
        path.display()
    )]
    StatsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A merge whose input holds no `*/stats.json` at all.
    #[error(
        "no */stats.json under {}: `kaapana-stats merge` expects one sub-folder per upstream \
         job, each holding the stats.json of `kaapana-stats site`",
        dir.display()
    )]
    NoStatsFiles {
        /// The input folder.
        dir: PathBuf,
    },
    /// Serializing statistics to JSON failed.
    #[error("cannot serialize the statistics as JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// A [`SiteSpec`](crate::SiteSpec) that cannot be generated.
    #[error("invalid site specification: {0}")]
    Spec(String),
}

/// The message of `e` followed by its sources, joined by ": " (dicom-rs' messages are terse
/// on their own).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cur = s.source();
    }
    text
}
