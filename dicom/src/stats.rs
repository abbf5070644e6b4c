//! Statistics over the DICOM files of a site, and their merge across sites.
//!
//! [`SiteStats::from_folder`] reads every `*.dcm` file under a folder (one sub-folder per
//! series, as the node's directory datasets hold them; deeper or shallower files are read
//! too) with dicom-object, headers and native pixel data, and counts:
//!
//! * patients (distinct PatientID), studies (distinct StudyInstanceUID), series (distinct
//!   SeriesInstanceUID), files and their bytes;
//! * slices: their sum over all series and the smallest and largest series (a multi-frame file
//!   counts NumberOfFrames slices);
//! * patients by PatientSex and by PatientAge decade, **once per patient**: the first file of
//!   a patient in path order decides;
//! * voxels, the sum of their Hounsfield units (each voxel's `stored * RescaleSlope +
//!   RescaleIntercept`, rounded to an integer) and a histogram with the fixed bins of
//!   [`HU_BIN_LABELS`].
//!
//! Every figure is an integer, so a job's output can be compared exactly with the truth of a
//! synthetic site ([`crate::SiteTruth::stats`]); the mean HU is only printed. Merging sums
//! every count (a patient seen at two sites counts twice) and keeps the smallest minimum and
//! the largest maximum of the slices per series.
//!
//! The JSON layout is stable: fields in declaration order, bins as objects in bin order with
//! the labels below as keys; `format` is [`FORMAT`].

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dicom_core::PrimitiveValue;
use dicom_core::header::HasLength as _;
use dicom_core::value::DicomValueType as _;
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use serde::de::Error as _;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::DicomError;
use crate::error::chain;

/// The value of the `format` field of every statistics file.
pub const FORMAT: &str = "kaapana-stats/1";

/// How many HU bins [`HuHistogram`] has.
pub const HU_BINS: usize = 6;
/// The lower edges (inclusive) of the HU bins after the first: a voxel with `hu` falls into
/// the bin of the number of edges `<= hu`.
pub const HU_EDGES: [i32; HU_BINS - 1] = [-900, -500, -100, 100, 400];
/// The HU bins' labels (JSON keys), half-open intervals: air (and anything below), lung,
/// fat and partial volumes, soft tissue and water, dense tissue and contrast, bone (and
/// anything above).
pub const HU_BIN_LABELS: [&str; HU_BINS] =
    ["[-inf,-900)", "[-900,-500)", "[-500,-100)", "[-100,100)", "[100,400)", "[400,inf)"];

/// How many age bins [`AgeDecades`] has: ten decades, 100 and over, and unknown.
pub const AGE_BINS: usize = 12;
/// The age bins' labels (JSON keys), in years.
pub const AGE_BIN_LABELS: [&str; AGE_BINS] = [
    "0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90-99", "100+",
    "unknown",
];

/// The HU bin (index into [`HU_BIN_LABELS`]) of a value.
pub fn hu_bin(hu: f64) -> usize {
    HU_EDGES.iter().take_while(|&&edge| hu >= f64::from(edge)).count()
}

/// The age bin (index into [`AGE_BIN_LABELS`]) of an age in years, `None` for unknown.
pub fn age_bin(years: Option<u32>) -> usize {
    match years {
        Some(y) => (y / 10).min(10) as usize,
        None => AGE_BINS - 1,
    }
}

/// Years of a DICOM Age String (`nnnD`, `nnnW`, `nnnM` or `nnnY`, e.g. `045Y`), rounded down;
/// `None` if it is not one.
pub fn parse_age(value: &str) -> Option<u32> {
    let value = value.trim_matches(|c: char| c == ' ' || c == '\0');
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    match unit {
        "Y" => Some(n),
        "M" => Some(n / 12),
        "W" => Some(n / 52),
        "D" => Some(n / 365),
        _ => None,
    }
}

fn serialize_bins<S: Serializer, const N: usize>(
    labels: &[&str; N],
    counts: &[u64; N],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(N))?;
    for (label, count) in labels.iter().zip(counts) {
        map.serialize_entry(label, count)?;
    }
    map.end()
}

fn deserialize_bins<'de, D: Deserializer<'de>, const N: usize>(
    labels: &[&str; N],
    d: D,
) -> Result<[u64; N], D::Error> {
    let mut map = BTreeMap::<String, u64>::deserialize(d)?;
    let mut counts = [0; N];
    for (label, count) in labels.iter().zip(&mut counts) {
        *count = map
            .remove(*label)
            .ok_or_else(|| D::Error::custom(format!("the bin {label:?} is missing")))?;
    }
    if let Some(extra) = map.keys().next() {
        return Err(D::Error::custom(format!("unknown bin {extra:?}; expected {labels:?}")));
    }
    Ok(counts)
}

/// Voxel counts per HU bin ([`HU_BIN_LABELS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HuHistogram(pub [u64; HU_BINS]);

impl HuHistogram {
    /// Counts one voxel.
    pub fn add(&mut self, hu: f64) {
        self.0[hu_bin(hu)] += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// All voxels counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Serialize for HuHistogram {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bins(&HU_BIN_LABELS, &self.0, s)
    }
}

impl<'de> Deserialize<'de> for HuHistogram {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bins(&HU_BIN_LABELS, d).map(Self)
    }
}

/// Patient counts per age decade ([`AGE_BIN_LABELS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AgeDecades(pub [u64; AGE_BINS]);

impl AgeDecades {
    /// Counts one patient of this age (in years; `None` if unknown).
    pub fn add(&mut self, years: Option<u32>) {
        self.0[age_bin(years)] += 1;
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

impl Serialize for AgeDecades {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bins(&AGE_BIN_LABELS, &self.0, s)
    }
}

impl<'de> Deserialize<'de> for AgeDecades {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bins(&AGE_BIN_LABELS, d).map(Self)
    }
}

/// Patient counts by PatientSex (0010,0040).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SexCounts {
    /// `F`.
    #[serde(rename = "F")]
    pub female: u64,
    /// `M`.
    #[serde(rename = "M")]
    pub male: u64,
    /// `O` (other).
    #[serde(rename = "O")]
    pub other: u64,
    /// Missing, empty or any other value.
    pub unknown: u64,
}

impl SexCounts {
    /// Counts one patient with this PatientSex value.
    pub fn add(&mut self, sex: &str) {
        match sex.trim_matches(|c: char| c == ' ' || c == '\0') {
            "F" => self.female += 1,
            "M" => self.male += 1,
            "O" => self.other += 1,
            _ => self.unknown += 1,
        }
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        self.female += other.female;
        self.male += other.male;
        self.other += other.other;
        self.unknown += other.unknown;
    }
}

/// Slices per series: the sum over all series, the smallest and the largest series (`None`
/// without series).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceCounts {
    /// All slices.
    pub sum: u64,
    /// The fewest slices of one series.
    pub min: Option<u32>,
    /// The most slices of one series.
    pub max: Option<u32>,
}

impl SliceCounts {
    /// Counts one series of `slices` slices.
    pub fn add_series(&mut self, slices: u32) {
        self.sum += u64::from(slices);
        self.min = Some(self.min.map_or(slices, |m| m.min(slices)));
        self.max = Some(self.max.map_or(slices, |m| m.max(slices)));
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        self.sum += other.sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The statistics of one site's DICOM files, or the merge of several sites' (see the module
/// documentation for what is counted and how).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteStats {
    /// Always [`FORMAT`].
    pub format: String,
    /// How many sites' statistics this is (1 for one site, the number merged otherwise).
    pub sites: u64,
    /// Distinct PatientIDs (summed over sites).
    pub patients: u64,
    /// Distinct StudyInstanceUIDs.
    pub studies: u64,
    /// Distinct SeriesInstanceUIDs.
    pub series: u64,
    /// Slices per series.
    pub slices: SliceCounts,
    /// DICOM files read.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Patients by sex, once per patient.
    pub patients_by_sex: SexCounts,
    /// Patients by age decade, once per patient.
    pub patients_by_age: AgeDecades,
    /// Voxels (pixels of all slices).
    pub voxels: u64,
    /// The sum of all voxels' HU values (each rounded to an integer).
    pub hu_sum: i64,
    /// Voxels per HU bin.
    pub hu_histogram: HuHistogram,
}

impl Default for SiteStats {
    fn default() -> Self {
        Self::empty()
    }
}

/// What one file contributes.
pub(crate) struct FileFacts {
    patient_id: String,
    sex: String,
    age: Option<u32>,
    study_uid: String,
    pub(crate) series_uid: String,
    pub(crate) frames: u32,
    bytes: u64,
}

fn attribute(path: &Path, attribute: &'static str, reason: impl Into<String>) -> DicomError {
    DicomError::Attribute { path: path.to_owned(), attribute, reason: reason.into() }
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> String {
    match obj.element_opt(tag) {
        Ok(Some(e)) => e
            .to_str()
            .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0').to_owned())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn number(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    keyword: &'static str,
    default: Option<u16>,
) -> Result<u16, DicomError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if !e.value().primitive().is_some_and(|p| p.is_empty()) => e
            .to_int::<u16>()
            .map_err(|err| attribute(path, keyword, format!("is not a number: {err}"))),
        _ => default.ok_or_else(|| attribute(path, keyword, "is missing")),
    }
}

fn float(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    keyword: &'static str,
    default: f64,
) -> Result<f64, DicomError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if !e.value().primitive().is_some_and(|p| p.is_empty()) => e
            .to_float64()
            .map_err(|err| attribute(path, keyword, format!("is not a number: {err}"))),
        _ => Ok(default),
    }
}

/// Every `*.dcm` file under `dir` (up to 8 folders deep), unsorted (callers sort).
pub(crate) fn collect_dcm(
    dir: &Path,
    depth: u32,
    out: &mut Vec<PathBuf>,
) -> Result<(), DicomError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DicomError::Io {
        action: "list the folder",
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| DicomError::Io {
            action: "list the folder",
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|source| DicomError::Io {
            action: "inspect",
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            if depth < 8 {
                collect_dcm(&path, depth + 1, out)?;
            }
        } else if path.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm")) {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads one file, adds its voxels to `hist`/`hu_sum` and returns its other facts.
pub(crate) fn read_file(
    path: &Path,
    hist: &mut HuHistogram,
    hu_sum: &mut i64,
) -> Result<FileFacts, DicomError> {
    let bytes = std::fs::read(path).map_err(|source| DicomError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(DicomError::NotDicom {
            path: path.to_owned(),
            reason: "it has no \"DICM\" magic code after a 128-byte preamble".into(),
        });
    }
    let obj = OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .map_err(|e| DicomError::NotDicom { path: path.to_owned(), reason: chain(&e) })?;

    let series_uid = text(&obj, tags::SERIES_INSTANCE_UID);
    if series_uid.is_empty() {
        return Err(attribute(path, "SeriesInstanceUID", "is missing or empty"));
    }
    let frames = match text(&obj, tags::NUMBER_OF_FRAMES) {
        t if t.is_empty() => 1,
        t => t.parse::<u32>().map_err(|_| {
            attribute(path, "NumberOfFrames", format!("is {t:?}, not a positive integer"))
        })?,
    };
    read_pixels(&obj, path, frames, hist, hu_sum)?;
    Ok(FileFacts {
        patient_id: text(&obj, tags::PATIENT_ID),
        sex: text(&obj, tags::PATIENT_SEX),
        age: parse_age(&text(&obj, tags::PATIENT_AGE)),
        study_uid: text(&obj, tags::STUDY_INSTANCE_UID),
        series_uid,
        frames,
        bytes: bytes.len() as u64,
    })
}

fn read_pixels(
    obj: &DefaultDicomObject,
    path: &Path,
    frames: u32,
    hist: &mut HuHistogram,
    hu_sum: &mut i64,
) -> Result<(), DicomError> {
    let rows: u32 = number(obj, path, tags::ROWS, "Rows", None)?.into();
    let columns: u32 = number(obj, path, tags::COLUMNS, "Columns", None)?.into();
    let samples = number(obj, path, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel", Some(1))?;
    if samples != 1 {
        return Err(attribute(
            path,
            "SamplesPerPixel",
            format!("is {samples}; only grayscale images (1 sample per pixel) have HU values"),
        ));
    }
    let allocated = number(obj, path, tags::BITS_ALLOCATED, "BitsAllocated", None)?;
    if allocated != 8 && allocated != 16 {
        return Err(attribute(
            path,
            "BitsAllocated",
            format!("is {allocated}; only 8 and 16 are supported"),
        ));
    }
    let stored = number(obj, path, tags::BITS_STORED, "BitsStored", Some(allocated))?;
    if stored == 0 || stored > allocated {
        return Err(attribute(
            path,
            "BitsStored",
            format!("is {stored} with BitsAllocated {allocated}"),
        ));
    }
    let signed =
        number(obj, path, tags::PIXEL_REPRESENTATION, "PixelRepresentation", Some(0))? == 1;
    let slope = float(obj, path, tags::RESCALE_SLOPE, "RescaleSlope", 1.0)?;
    let intercept = float(obj, path, tags::RESCALE_INTERCEPT, "RescaleIntercept", 0.0)?;

    let element = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| attribute(path, "PixelData", "is missing"))?;
    let expected = rows as usize * columns as usize * frames as usize;
    let unsupported = |what: &str| DicomError::PixelData {
        path: path.to_owned(),
        reason: format!(
            "it is {what} (transfer syntax {}); only native, uncompressed pixel data is read: \
             decompress the file first, e.g. with dcmtk's `dcmdjpeg` or `dcmconv +te`",
            obj.meta().transfer_syntax()
        ),
    };
    let value = match element.value() {
        Value::Primitive(p) => p,
        Value::PixelSequence(_) => return Err(unsupported("encapsulated (compressed)")),
        Value::Sequence(_) => return Err(unsupported("a sequence")),
    };
    let mask: u32 = (1u32 << stored) - 1;
    let sign_bit: u32 = 1u32 << (stored - 1);
    let to_value = |raw: u32| -> f64 {
        let v = raw & mask;
        let v = if signed && v & sign_bit != 0 {
            i64::from(v) - (1i64 << stored)
        } else {
            i64::from(v)
        };
        v as f64 * slope + intercept
    };
    let mut count = |raw: u32| {
        let hu = to_value(raw);
        hist.add(hu);
        *hu_sum += hu.round() as i64;
    };
    let short = |have: usize| DicomError::PixelData {
        path: path.to_owned(),
        reason: format!(
            "it holds {have} samples, but Rows {rows} x Columns {columns} x {frames} frame(s) \
             need {expected}"
        ),
    };
    match (allocated, value) {
        (16, PrimitiveValue::U16(v)) => {
            if v.len() < expected {
                return Err(short(v.len()));
            }
            v[..expected].iter().for_each(|&s| count(u32::from(s)));
        }
        (16, PrimitiveValue::I16(v)) => {
            if v.len() < expected {
                return Err(short(v.len()));
            }
            v[..expected].iter().for_each(|&s| count(u32::from(s as u16)));
        }
        (16, PrimitiveValue::U8(v)) => {
            // Only little endian transfer syntaxes leave 16-bit samples as bytes here.
            if v.len() / 2 < expected {
                return Err(short(v.len() / 2));
            }
            v[..expected * 2]
                .chunks_exact(2)
                .for_each(|b| count(u32::from(u16::from_le_bytes([b[0], b[1]]))));
        }
        (8, PrimitiveValue::U8(v)) => {
            if v.len() < expected {
                return Err(short(v.len()));
            }
            v[..expected].iter().for_each(|&s| count(u32::from(s)));
        }
        (8, PrimitiveValue::U16(v)) => {
            // 8-bit samples read as OW: two samples per little-endian word.
            if v.len() * 2 < expected {
                return Err(short(v.len() * 2));
            }
            v.iter().flat_map(|w| w.to_le_bytes()).take(expected).for_each(|s| count(u32::from(s)));
        }
        _ => {
            return Err(DicomError::PixelData {
                path: path.to_owned(),
                reason: format!(
                    "its value has the unexpected type {:?} for BitsAllocated {allocated}",
                    value.value_type()
                ),
            });
        }
    }
    Ok(())
}

impl SiteStats {
    /// The statistics of no files (`sites` 0), the neutral element of [`SiteStats::merge`].
    pub fn empty() -> Self {
        Self {
            format: FORMAT.to_owned(),
            sites: 0,
            patients: 0,
            studies: 0,
            series: 0,
            slices: SliceCounts::default(),
            files: 0,
            bytes: 0,
            patients_by_sex: SexCounts::default(),
            patients_by_age: AgeDecades::default(),
            voxels: 0,
            hu_sum: 0,
            hu_histogram: HuHistogram::default(),
        }
    }

    /// Reads every `*.dcm` file under `input` (one sub-folder per series is the expected
    /// layout; files at any depth up to 8 folders are read, other files are ignored) and
    /// computes one site's statistics.
    ///
    /// Fails on the first file that is not DICOM, lacks SeriesInstanceUID or the image pixel
    /// attributes, or holds compressed pixel data; the error names the file. A folder without
    /// any `.dcm` file gives statistics with zero series.
    pub fn from_folder(input: &Path) -> Result<Self, DicomError> {
        let mut files = Vec::new();
        collect_dcm(input, 0, &mut files)?;
        files.sort();

        let mut stats = Self { sites: 1, ..Self::empty() };
        let mut patients: BTreeMap<String, (String, Option<u32>)> = BTreeMap::new();
        let mut studies = BTreeSet::new();
        let mut series: BTreeMap<String, u32> = BTreeMap::new();
        let mut hist = HuHistogram::default();
        let mut hu_sum = 0i64;
        for path in &files {
            let facts = read_file(path, &mut hist, &mut hu_sum)?;
            stats.files += 1;
            stats.bytes += facts.bytes;
            patients.entry(facts.patient_id).or_insert((facts.sex, facts.age));
            if !facts.study_uid.is_empty() {
                studies.insert(facts.study_uid);
            }
            *series.entry(facts.series_uid).or_insert(0) += facts.frames;
        }
        stats.patients = patients.len() as u64;
        for (sex, age) in patients.values() {
            stats.patients_by_sex.add(sex);
            stats.patients_by_age.add(*age);
        }
        stats.studies = studies.len() as u64;
        stats.series = series.len() as u64;
        for slices in series.values() {
            stats.slices.add_series(*slices);
        }
        stats.voxels = hist.total();
        stats.hu_sum = hu_sum;
        stats.hu_histogram = hist;
        Ok(stats)
    }

    /// The sum of several sites' statistics (see the module documentation).
    pub fn merge<I>(all: I) -> Self
    where
        I: IntoIterator,
        I::Item: Borrow<SiteStats>,
    {
        let mut m = Self::empty();
        for s in all {
            let s = s.borrow();
            m.sites += s.sites;
            m.patients += s.patients;
            m.studies += s.studies;
            m.series += s.series;
            m.slices.merge(&s.slices);
            m.files += s.files;
            m.bytes += s.bytes;
            m.patients_by_sex.merge(&s.patients_by_sex);
            m.patients_by_age.merge(&s.patients_by_age);
            m.voxels += s.voxels;
            m.hu_sum += s.hu_sum;
            m.hu_histogram.merge(&s.hu_histogram);
        }
        m
    }

    /// Reads every `input/*/stats.json` (one sub-folder per upstream job; sub-folders without
    /// one are skipped and returned) and merges them. Fails if there is none, or if one is
    /// not a statistics file.
    pub fn merge_folder(input: &Path) -> Result<(Self, Vec<PathBuf>), DicomError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| DicomError::Io { action, path, source }
        };
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(input).map_err(io("list the folder", input))? {
            let path = entry.map_err(io("list the folder", input))?.path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
        dirs.sort();
        let mut all = Vec::new();
        let mut skipped = Vec::new();
        for dir in dirs {
            let file = dir.join("stats.json");
            if file.is_file() {
                all.push(Self::read_json(&file)?);
            } else {
                skipped.push(dir);
            }
        }
        if all.is_empty() {
            return Err(DicomError::NoStatsFiles { dir: input.to_owned() });
        }
        Ok((Self::merge(&all), skipped))
    }

    /// Parses a statistics file's contents; `path` is only for the error.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Self, DicomError> {
        let bad = |reason: String| DicomError::StatsFile { path: path.to_owned(), reason };
        let stats: Self = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        if stats.format != FORMAT {
            return Err(bad(format!("its format is {:?}, expected {FORMAT:?}", stats.format)));
        }
        Ok(stats)
    }

    /// Reads a statistics file.
    pub fn read_json(path: &Path) -> Result<Self, DicomError> {
        let json = std::fs::read(path).map_err(|source| DicomError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&json, path)
    }

    /// The JSON text (pretty, with a final newline).
    pub fn to_json(&self) -> Result<String, DicomError> {
        let mut s = serde_json::to_string_pretty(self).map_err(DicomError::Serialize)?;
        s.push('\n');
        Ok(s)
    }

    /// Writes the JSON text to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), DicomError> {
        std::fs::write(path, self.to_json()?).map_err(|source| DicomError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })
    }

    /// The mean HU over all voxels, `None` without voxels (for display only: compare
    /// [`SiteStats::hu_sum`]).
    pub fn mean_hu(&self) -> Option<f64> {
        (self.voxels > 0).then(|| self.hu_sum as f64 / self.voxels as f64)
    }

    /// A short human summary (several lines).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let slices = match (self.slices.min, self.slices.max) {
            (Some(min), Some(max)) => {
                format!("{} slices ({min}-{max} per series)", self.slices.sum)
            }
            _ => format!("{} slices", self.slices.sum),
        };
        let _ = writeln!(
            s,
            "{} site(s): {} patients, {} studies, {} series, {slices}, {} files, {} bytes",
            self.sites, self.patients, self.studies, self.series, self.files, self.bytes
        );
        let sex = &self.patients_by_sex;
        let _ = writeln!(
            s,
            "patients by sex: F {} M {} O {} unknown {}",
            sex.female, sex.male, sex.other, sex.unknown
        );
        let ages: Vec<String> = AGE_BIN_LABELS
            .iter()
            .zip(self.patients_by_age.0)
            .filter(|(_, n)| *n > 0)
            .map(|(label, n)| format!("{label}: {n}"))
            .collect();
        let _ = writeln!(s, "patients by age: {}", ages.join(", "));
        let mean = self.mean_hu().map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"));
        let _ = writeln!(s, "voxels: {}, mean HU {mean}", self.voxels);
        let bins: Vec<String> = HU_BIN_LABELS
            .iter()
            .zip(self.hu_histogram.0)
            .map(|(label, n)| format!("{label} {n}"))
            .collect();
        let _ = writeln!(s, "HU histogram: {}", bins.join(", "));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_and_ages() {
        assert_eq!(hu_bin(-3000.0), 0);
        assert_eq!(hu_bin(-900.5), 0);
        assert_eq!(hu_bin(-900.0), 1);
        assert_eq!(hu_bin(-100.0), 3);
        assert_eq!(hu_bin(99.9), 3);
        assert_eq!(hu_bin(400.0), 5);
        assert_eq!(parse_age("045Y"), Some(45));
        assert_eq!(parse_age("018M"), Some(1));
        assert_eq!(parse_age("003W"), Some(0));
        assert_eq!(parse_age("45"), None);
        assert_eq!(parse_age("Y"), None);
        assert_eq!(parse_age(""), None);
        assert_eq!(age_bin(Some(45)), 4);
        assert_eq!(age_bin(Some(104)), 10);
        assert_eq!(age_bin(None), 11);
    }

    #[test]
    fn json_round_trip_and_strictness() {
        let mut s = SiteStats { sites: 1, series: 2, voxels: 3, hu_sum: -5, ..SiteStats::empty() };
        s.slices.add_series(4);
        s.hu_histogram.0[2] = 3;
        s.patients_by_age.add(Some(45));
        let json = s.to_json().unwrap();
        assert!(json.contains("\"[-500,-100)\": 3"), "{json}");
        assert!(json.contains("\"40-49\": 1"), "{json}");
        let p = Path::new("x/stats.json");
        assert_eq!(SiteStats::from_json(json.as_bytes(), p).unwrap(), s);
        let other = json.replace(FORMAT, "something/2");
        let e = SiteStats::from_json(other.as_bytes(), p).unwrap_err().to_string();
        assert!(e.contains("x/stats.json") && e.contains("something/2"), "{e}");
        let extra = json.replace("\"40-49\"", "\"40-50\"");
        assert!(SiteStats::from_json(extra.as_bytes(), p).is_err());
    }

    #[test]
    fn merge_sums_and_keeps_extremes() {
        let mut a =
            SiteStats { sites: 1, patients: 2, hu_sum: -7, voxels: 1, ..SiteStats::empty() };
        a.slices.add_series(5);
        a.slices.add_series(9);
        a.hu_histogram.0[0] = 1;
        a.patients_by_sex.add("F");
        let mut b = SiteStats { sites: 1, patients: 3, hu_sum: 2, voxels: 2, ..SiteStats::empty() };
        b.slices.add_series(7);
        b.slices.add_series(12);
        b.hu_histogram.0[5] = 2;
        b.patients_by_sex.add("X");
        let m = SiteStats::merge([&a, &b, &SiteStats::empty()]);
        assert_eq!(m.sites, 2);
        assert_eq!(m.patients, 5);
        assert_eq!(m.hu_sum, -5);
        assert_eq!(m.voxels, 3);
        assert_eq!(m.slices, SliceCounts { sum: 33, min: Some(5), max: Some(12) });
        assert_eq!(m.hu_histogram.0, [1, 0, 0, 0, 0, 2]);
        assert_eq!(m.patients_by_sex, SexCounts { female: 1, unknown: 1, ..Default::default() });
        assert_eq!(SiteStats::merge(Vec::<SiteStats>::new()), SiteStats::empty());
    }
}
