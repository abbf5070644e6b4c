//! Synthetic CT sites: a deterministic plan of patients, studies and series from a
//! [`SiteSpec`], a chest phantom per slice, and [`write_site`], which writes them as DICOM
//! Part-10 files and returns what it wrote ([`SiteTruth`]).
//!
//! The same spec always gives the same UIDs, headers and pixels (an own xorshift64* generator
//! seeded through splitmix64; no global state, no clock). Different sites should use different
//! seeds: their UIDs then differ too.
//!
//! Files: `dir/<SeriesInstanceUID>/<InstanceNumber>.dcm`, one folder per series as the node's
//! directory datasets expect. Each is a CT Image Storage instance in Explicit VR Little
//! Endian with 16-bit signed pixels (stored value = HU + 1024, RescaleIntercept -1024,
//! RescaleSlope 1). The phantom: air (about -1000 HU) outside an elliptic body with a thin fat
//! layer (about -120 HU), soft tissue (about 40 HU), two lungs (about -800 HU) whose size
//! changes along the series, a contrast-enhanced aorta (about 250 HU) and a spine (about 700
//! HU), plus uniform noise; the tissue values, sizes and noise vary per series.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::path::Path;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use crate::DicomError;
use crate::error::chain;
use crate::stats::{AgeDecades, HuHistogram, SexCounts, SiteStats, SliceCounts};

/// SOPClassUID of CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// The RescaleIntercept of every written image: stored value = HU + 1024.
pub const RESCALE_INTERCEPT: i32 = -1024;
/// The lowest HU a written voxel has (stored value 0).
pub const MIN_HU: i16 = -1024;
/// The highest HU a written voxel has.
pub const MAX_HU: i16 = 3071;

/// The deterministic generator: xorshift64* seeded through splitmix64.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = hi.abs_diff(lo).saturating_add(1);
        lo.wrapping_add(self.below(span) as i64)
    }

    /// Uniform in `[lo, hi)`.
    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What to generate for one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// The seed: the same spec gives the same files.
    pub seed: u64,
    /// How many series.
    pub series: usize,
    /// Slices per series, drawn uniformly from this range (at least 1).
    pub slices: RangeInclusive<u32>,
    /// Rows of every image (8 to 1024).
    pub rows: u16,
    /// Columns of every image (8 to 1024).
    pub columns: u16,
}

impl SiteSpec {
    /// The demo's default site: 100 series of 5 to 40 slices of 64 x 64 pixels.
    pub fn new(seed: u64) -> Self {
        Self { seed, series: 100, slices: 5..=40, rows: 64, columns: 64 }
    }

    fn validate(&self) -> Result<(), DicomError> {
        let bad = |m: String| Err(DicomError::Spec(m));
        if *self.slices.start() == 0 || self.slices.start() > self.slices.end() {
            return bad(format!(
                "slices {}..={} must be a non-empty range starting at 1 or more",
                self.slices.start(),
                self.slices.end()
            ));
        }
        if *self.slices.end() > 100_000 {
            return bad(format!("slices up to {} is too many (at most 100000)", self.slices.end()));
        }
        for (name, n) in [("rows", self.rows), ("columns", self.columns)] {
            if !(8..=1024).contains(&n) {
                return bad(format!("{name} {n} is outside 8..=1024"));
            }
        }
        if self.series > 1_000_000 {
            return bad(format!("{} series are too many (at most 1000000)", self.series));
        }
        Ok(())
    }

    /// The patients, studies and series this spec gives (no pixels yet): one or two studies
    /// per patient, one or two series per study (about 1.5 on average), `self.series` series
    /// in all.
    pub fn plan(&self) -> Result<Vec<Patient>, DicomError> {
        self.validate()?;
        let mut rng = Rng::new(self.seed);
        let site_tag = rng.next_u64() as u32;
        let mut uids = UidSource { rng: Rng::new(rng.next_u64()), issued: BTreeSet::new() };
        let mut patients = Vec::new();
        let mut left = self.series;
        let mut study_no = 0u32;
        while left > 0 {
            let n = patients.len() + 1;
            let sex = if rng.below(2) == 0 { Sex::F } else { Sex::M };
            let given: &[&str] = match sex {
                Sex::F => &["Anna", "Maria", "Lena", "Sofia", "Emma", "Julia", "Clara", "Ida"],
                Sex::M => &["Paul", "Jonas", "Felix", "Lukas", "Noah", "David", "Emil", "Max"],
            };
            let family = ["Becker", "Fischer", "Meyer", "Wagner", "Schulz", "Hoffmann", "Koch"];
            let name = format!("{}^{}", rng.pick(&family), rng.pick(given));
            let age_years = rng.range(18, 90) as u16;
            let with_birth_date = rng.below(4) != 0;
            let mut studies = Vec::new();
            let n_studies = if rng.below(4) == 0 { 2 } else { 1 };
            let mut birth_date = None;
            for _ in 0..n_studies {
                if left == 0 {
                    break;
                }
                study_no += 1;
                let (year, month, day) =
                    (rng.range(2015, 2025), rng.range(1, 12), rng.range(1, 28));
                if birth_date.is_none() && with_birth_date {
                    birth_date =
                        Some(format!("{:04}{month:02}{day:02}", year - i64::from(age_years)));
                }
                let time = format!(
                    "{:02}{:02}{:02}",
                    rng.range(7, 18),
                    rng.range(0, 59),
                    rng.range(0, 59)
                );
                let n_series = (if rng.below(2) == 0 { 2 } else { 1 }).min(left);
                left -= n_series;
                let mut series = Vec::new();
                for number in 1..=n_series as u32 {
                    series.push(self.plan_series(&mut rng, &mut uids, number));
                }
                studies.push(Study {
                    uid: uids.next(),
                    id: format!("S{study_no}"),
                    accession: format!("A{site_tag:08X}{study_no:03}"),
                    date: format!("{year:04}{month:02}{day:02}"),
                    time,
                    series,
                });
            }
            patients.push(Patient {
                id: format!("SYN-{site_tag:08X}-{n:04}"),
                name,
                sex,
                age_years,
                birth_date,
                studies,
            });
        }
        Ok(patients)
    }

    fn plan_series(&self, rng: &mut Rng, uids: &mut UidSource, number: u32) -> Series {
        let slices =
            rng.range(i64::from(*self.slices.start()), i64::from(*self.slices.end())) as u32;
        let thickness = *rng.pick(&[1.0, 1.25, 2.0, 2.5, 3.0, 5.0]);
        let field_of_view = rng.range(320, 400) as f64;
        let uid = uids.next();
        let frame_of_reference_uid = uids.next();
        let sop_instance_uids = (0..slices).map(|_| uids.next()).collect();
        Series {
            uid,
            number,
            frame_of_reference_uid,
            sop_instance_uids,
            rows: self.rows,
            columns: self.columns,
            slice_thickness: thickness,
            pixel_spacing: field_of_view / f64::from(self.columns),
            phantom: Phantom {
                body_scale: rng.float(0.82, 1.0),
                body_aspect: rng.float(0.66, 0.78),
                lung_scale: rng.float(0.85, 1.1),
                tissue_hu: rng.range(30, 55) as i16,
                fat_hu: rng.range(-140, -110) as i16,
                lung_hu: rng.range(-860, -760) as i16,
                vessel_hu: rng.range(180, 320) as i16,
                bone_hu: rng.range(600, 900) as i16,
                noise: rng.range(8, 30) as i16,
                seed: rng.next_u64(),
            },
        }
    }
}

/// Distinct `2.25.<128-bit decimal>` UIDs (at most 44 characters).
#[derive(Debug)]
struct UidSource {
    rng: Rng,
    issued: BTreeSet<u128>,
}

impl UidSource {
    fn next(&mut self) -> String {
        loop {
            let v = (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64());
            if v != 0 && self.issued.insert(v) {
                return format!("2.25.{v}");
            }
        }
    }
}

/// PatientSex of a synthetic patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sex {
    /// `F`.
    F,
    /// `M`.
    M,
}

impl Sex {
    /// The DICOM code string.
    pub fn as_str(self) -> &'static str {
        match self {
            Sex::F => "F",
            Sex::M => "M",
        }
    }
}

/// A synthetic patient.
#[derive(Debug, Clone, PartialEq)]
pub struct Patient {
    /// PatientID, `SYN-<8 hex digits of the site>-<nnnn>`.
    pub id: String,
    /// PatientName (`Family^Given`).
    pub name: String,
    /// PatientSex.
    pub sex: Sex,
    /// PatientAge in years (written as `045Y`).
    pub age_years: u16,
    /// PatientBirthDate (YYYYMMDD; for about three patients in four), consistent with the age
    /// at the first study.
    pub birth_date: Option<String>,
    /// The patient's studies.
    pub studies: Vec<Study>,
}

/// A synthetic study.
#[derive(Debug, Clone, PartialEq)]
pub struct Study {
    /// StudyInstanceUID.
    pub uid: String,
    /// StudyID.
    pub id: String,
    /// AccessionNumber.
    pub accession: String,
    /// StudyDate (YYYYMMDD).
    pub date: String,
    /// StudyTime (HHMMSS).
    pub time: String,
    /// The study's series.
    pub series: Vec<Series>,
}

/// A synthetic CT series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// SeriesInstanceUID (also the folder name).
    pub uid: String,
    /// SeriesNumber.
    pub number: u32,
    /// FrameOfReferenceUID.
    pub frame_of_reference_uid: String,
    /// SOPInstanceUID per slice; the slice count is its length.
    pub sop_instance_uids: Vec<String>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
    /// SliceThickness and the z step between slices, in mm.
    pub slice_thickness: f64,
    /// PixelSpacing (rows and columns alike), in mm.
    pub pixel_spacing: f64,
    /// The phantom's parameters.
    pub phantom: Phantom,
}

/// The per-series parameters of the chest phantom.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    /// Body size relative to the field of view.
    pub body_scale: f64,
    /// Anterior-posterior over left-right extent of the body.
    pub body_aspect: f64,
    /// Lung size relative to the body.
    pub lung_scale: f64,
    /// Soft tissue HU.
    pub tissue_hu: i16,
    /// Subcutaneous fat HU.
    pub fat_hu: i16,
    /// Lung HU.
    pub lung_hu: i16,
    /// HU of the contrast-enhanced aorta.
    pub vessel_hu: i16,
    /// Bone HU.
    pub bone_hu: i16,
    /// Noise amplitude: uniform in `-noise..=noise` HU.
    pub noise: i16,
    /// Seed of the noise.
    pub seed: u64,
}

fn inside(x: f64, y: f64, cx: f64, cy: f64, ax: f64, ay: f64) -> bool {
    let (dx, dy) = ((x - cx) / ax, (y - cy) / ay);
    dx * dx + dy * dy <= 1.0
}

impl Series {
    /// The number of slices.
    pub fn slices(&self) -> u32 {
        self.sop_instance_uids.len() as u32
    }

    /// The HU values of slice `k` (0-based), row by row: deterministic for the series and
    /// `k`, whatever order slices are made in.
    pub fn slice_hu(&self, k: u32) -> Vec<i16> {
        let p = &self.phantom;
        let n = self.slices();
        let t = if n > 1 { f64::from(k) / f64::from(n - 1) } else { 0.5 };
        let mut rng = Rng::new(p.seed ^ u64::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Normalized coordinates: x left to right, y anterior (top) to posterior, in [-1, 1].
        let s = p.body_scale * (1.0 - 0.1 * (2.0 * t - 1.0).powi(2));
        let (ax, ay) = (0.88 * s, 0.88 * s * p.body_aspect);
        let lung = p.lung_scale * (0.45 + 0.55 * (std::f64::consts::PI * t).sin());
        let (lx, ly) = (0.24 * s * lung, 0.34 * s * p.body_aspect * lung / 0.72);
        let (rows, cols) = (usize::from(self.rows), usize::from(self.columns));
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let y = (r as f64 + 0.5) / rows as f64 * 2.0 - 1.0;
            for c in 0..cols {
                let x = (c as f64 + 0.5) / cols as f64 * 2.0 - 1.0;
                let mut hu = -1000;
                if inside(x, y, 0.0, 0.0, ax, ay) {
                    hu = if inside(x, y, 0.0, 0.0, ax * 0.92, ay * 0.9) {
                        p.tissue_hu
                    } else {
                        p.fat_hu
                    };
                    if inside(x, y, -0.4 * s, -0.05 * s, lx, ly)
                        || inside(x, y, 0.4 * s, -0.05 * s, lx, ly)
                    {
                        hu = p.lung_hu;
                    }
                    if inside(x, y, 0.1 * s, 0.3 * ay, 0.07 * s, 0.07 * s) {
                        hu = p.vessel_hu;
                    }
                    if inside(x, y, 0.0, 0.62 * ay, 0.12 * s, 0.12 * s) {
                        hu = p.bone_hu;
                    }
                }
                let noise = rng.range(-i64::from(p.noise), i64::from(p.noise)) as i16;
                out.push(hu.saturating_add(noise).clamp(MIN_HU, MAX_HU));
            }
        }
        out
    }
}

/// What was written for one series, computed from the values in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesTruth {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// StudyInstanceUID.
    pub study_uid: String,
    /// PatientID.
    pub patient_id: String,
    /// PatientSex (`F` or `M`).
    pub sex: &'static str,
    /// PatientAge in years.
    pub age_years: u16,
    /// Slices (= files).
    pub slices: u32,
    /// Voxels of all slices.
    pub voxels: u64,
    /// The sum of their HU values.
    pub hu_sum: i64,
    /// Their HU histogram.
    pub hu_histogram: HuHistogram,
    /// Bytes of the series' files.
    pub bytes: u64,
}

/// What [`write_site`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteTruth {
    /// Per SeriesInstanceUID.
    pub series: BTreeMap<String, SeriesTruth>,
    /// The files written.
    pub files: u64,
    /// Their total bytes.
    pub bytes: u64,
}

impl SiteTruth {
    /// The statistics [`SiteStats::from_folder`] must compute from the written files.
    pub fn stats(&self) -> SiteStats {
        let mut patients = BTreeMap::new();
        let mut studies = BTreeSet::new();
        let mut slices = SliceCounts::default();
        let mut hist = HuHistogram::default();
        let (mut voxels, mut hu_sum, mut bytes) = (0, 0, 0);
        for s in self.series.values() {
            patients.insert(s.patient_id.as_str(), (s.sex, s.age_years));
            studies.insert(s.study_uid.as_str());
            slices.add_series(s.slices);
            hist.merge(&s.hu_histogram);
            voxels += s.voxels;
            hu_sum += s.hu_sum;
            bytes += s.bytes;
        }
        let mut by_sex = SexCounts::default();
        let mut by_age = AgeDecades::default();
        for (sex, age) in patients.values() {
            by_sex.add(sex);
            by_age.add(Some(u32::from(*age)));
        }
        SiteStats {
            sites: 1,
            patients: patients.len() as u64,
            studies: studies.len() as u64,
            series: self.series.len() as u64,
            slices,
            files: self.files,
            bytes,
            patients_by_sex: by_sex,
            patients_by_age: by_age,
            voxels,
            hu_sum,
            hu_histogram: hist,
            ..SiteStats::empty()
        }
    }
}

impl From<&SiteTruth> for SiteStats {
    fn from(truth: &SiteTruth) -> Self {
        truth.stats()
    }
}

/// A decimal string of at most 16 characters (six decimals at most, trailing zeros dropped).
fn ds(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".to_owned() } else { s.to_owned() }
}

fn put(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) {
    obj.put(DataElement::new(tag, vr, value.into()));
}

fn put_strs(obj: &mut InMemDicomObject, tag: Tag, vr: VR, values: &[String]) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::Strs(values.iter().cloned().collect())));
}

/// The DICOM object of slice `k` of `series`.
fn slice_object(
    patient: &Patient,
    study: &Study,
    series: &Series,
    k: u32,
    hu: &[i16],
) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    let z = (f64::from(k) - f64::from(series.slices()) / 2.0) * series.slice_thickness;
    let half = series.pixel_spacing * f64::from(series.columns) / 2.0;
    put(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
    put_strs(
        &mut o,
        tags::IMAGE_TYPE,
        VR::CS,
        &["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
    );
    put(&mut o, tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE);
    put(&mut o, tags::SOP_INSTANCE_UID, VR::UI, series.sop_instance_uids[k as usize].as_str());
    put(&mut o, tags::STUDY_DATE, VR::DA, study.date.as_str());
    put(&mut o, tags::SERIES_DATE, VR::DA, study.date.as_str());
    put(&mut o, tags::STUDY_TIME, VR::TM, study.time.as_str());
    put(&mut o, tags::ACCESSION_NUMBER, VR::SH, study.accession.as_str());
    put(&mut o, tags::MODALITY, VR::CS, "CT");
    put(&mut o, tags::MANUFACTURER, VR::LO, "kaapana-node synthetic");
    put(&mut o, tags::REFERRING_PHYSICIAN_NAME, VR::PN, PrimitiveValue::Empty);
    put(&mut o, tags::STUDY_DESCRIPTION, VR::LO, "Synthetic chest CT");
    put(&mut o, tags::SERIES_DESCRIPTION, VR::LO, format!("Synthetic chest {}", series.number));
    put(&mut o, tags::PATIENT_NAME, VR::PN, patient.name.as_str());
    put(&mut o, tags::PATIENT_ID, VR::LO, patient.id.as_str());
    match &patient.birth_date {
        Some(d) => put(&mut o, tags::PATIENT_BIRTH_DATE, VR::DA, d.as_str()),
        None => put(&mut o, tags::PATIENT_BIRTH_DATE, VR::DA, PrimitiveValue::Empty),
    }
    put(&mut o, tags::PATIENT_SEX, VR::CS, patient.sex.as_str());
    put(&mut o, tags::PATIENT_AGE, VR::AS, format!("{:03}Y", patient.age_years));
    put(&mut o, tags::BODY_PART_EXAMINED, VR::CS, "CHEST");
    put(&mut o, tags::SLICE_THICKNESS, VR::DS, ds(series.slice_thickness));
    put(&mut o, tags::KVP, VR::DS, "120");
    put(&mut o, tags::PATIENT_POSITION, VR::CS, "HFS");
    put(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, study.uid.as_str());
    put(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, series.uid.as_str());
    put(&mut o, tags::STUDY_ID, VR::SH, study.id.as_str());
    put(&mut o, tags::SERIES_NUMBER, VR::IS, series.number.to_string());
    put(&mut o, tags::ACQUISITION_NUMBER, VR::IS, "1");
    put(&mut o, tags::INSTANCE_NUMBER, VR::IS, (k + 1).to_string());
    put_strs(&mut o, tags::IMAGE_POSITION_PATIENT, VR::DS, &[ds(-half), ds(-half), ds(z)]);
    put_strs(
        &mut o,
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        &["1", "0", "0", "0", "1", "0"].map(String::from),
    );
    put(&mut o, tags::FRAME_OF_REFERENCE_UID, VR::UI, series.frame_of_reference_uid.as_str());
    put(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, PrimitiveValue::Empty);
    put(&mut o, tags::SLICE_LOCATION, VR::DS, ds(z));
    put(&mut o, tags::SAMPLES_PER_PIXEL, VR::US, 1u16);
    put(&mut o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    put(&mut o, tags::ROWS, VR::US, series.rows);
    put(&mut o, tags::COLUMNS, VR::US, series.columns);
    let spacing = ds(series.pixel_spacing);
    put_strs(&mut o, tags::PIXEL_SPACING, VR::DS, &[spacing.clone(), spacing]);
    put(&mut o, tags::BITS_ALLOCATED, VR::US, 16u16);
    put(&mut o, tags::BITS_STORED, VR::US, 16u16);
    put(&mut o, tags::HIGH_BIT, VR::US, 15u16);
    put(&mut o, tags::PIXEL_REPRESENTATION, VR::US, 1u16);
    put(&mut o, tags::WINDOW_CENTER, VR::DS, "40");
    put(&mut o, tags::WINDOW_WIDTH, VR::DS, "400");
    put(&mut o, tags::RESCALE_INTERCEPT, VR::DS, RESCALE_INTERCEPT.to_string());
    put(&mut o, tags::RESCALE_SLOPE, VR::DS, "1");
    put(&mut o, tags::RESCALE_TYPE, VR::LO, "HU");
    let stored: Vec<u16> =
        hu.iter().map(|&v| (i32::from(v) - RESCALE_INTERCEPT) as i16 as u16).collect();
    put(&mut o, tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(stored.into()));
    o
}

/// Writes the site `spec` describes into `dir` (created if missing; existing files of the same
/// names are replaced): `dir/<SeriesInstanceUID>/<InstanceNumber>.dcm`. Returns what it wrote,
/// computed from the values in memory, not by reading the files back.
pub fn write_site(spec: &SiteSpec, dir: &Path) -> Result<SiteTruth, DicomError> {
    let plan = spec.plan()?;
    let mut truth = SiteTruth { series: BTreeMap::new(), files: 0, bytes: 0 };
    let mut buf = Vec::new();
    for patient in &plan {
        for study in &patient.studies {
            for series in &study.series {
                let folder = dir.join(&series.uid);
                std::fs::create_dir_all(&folder).map_err(|source| DicomError::Io {
                    action: "create the folder",
                    path: folder.clone(),
                    source,
                })?;
                let mut st = SeriesTruth {
                    series_uid: series.uid.clone(),
                    study_uid: study.uid.clone(),
                    patient_id: patient.id.clone(),
                    sex: patient.sex.as_str(),
                    age_years: patient.age_years,
                    slices: series.slices(),
                    voxels: 0,
                    hu_sum: 0,
                    hu_histogram: HuHistogram::default(),
                    bytes: 0,
                };
                for k in 0..series.slices() {
                    let hu = series.slice_hu(k);
                    for &v in &hu {
                        st.hu_histogram.add(f64::from(v));
                        st.hu_sum += i64::from(v);
                    }
                    st.voxels += hu.len() as u64;
                    let path = folder.join(format!("{}.dcm", k + 1));
                    let encode = |e: &dyn std::error::Error| DicomError::Encode {
                        path: path.clone(),
                        reason: chain(e),
                    };
                    let file = slice_object(patient, study, series, k, &hu)
                        .with_meta(
                            FileMetaTableBuilder::new()
                                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN),
                        )
                        .map_err(|e| encode(&e))?;
                    buf.clear();
                    file.write_all(&mut buf).map_err(|e| encode(&e))?;
                    std::fs::write(&path, &buf).map_err(|source| DicomError::Io {
                        action: "write",
                        path: path.clone(),
                        source,
                    })?;
                    st.bytes += buf.len() as u64;
                }
                truth.files += u64::from(st.slices);
                truth.bytes += st.bytes;
                truth.series.insert(series.uid.clone(), st);
            }
        }
    }
    Ok(truth)
}

#[cfg(test)]
mod tests {
    use dicom_object::open_file;

    use super::*;

    fn small(seed: u64) -> SiteSpec {
        SiteSpec { seed, series: 7, slices: 2..=5, rows: 16, columns: 20 }
    }

    fn s(obj: &dicom_object::DefaultDicomObject, tag: Tag) -> String {
        obj.element(tag).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned()
    }

    #[test]
    fn plan_is_deterministic_and_uids_are_distinct_and_valid() {
        let a = small(3).plan().unwrap();
        assert_eq!(a, small(3).plan().unwrap());
        assert_ne!(a, small(4).plan().unwrap());
        let mut uids = BTreeSet::new();
        let mut n_series = 0;
        let mut n_studies = 0;
        for p in &a {
            assert!(!p.studies.is_empty());
            for st in &p.studies {
                n_studies += 1;
                assert!(uids.insert(st.uid.clone()));
                for se in &st.series {
                    n_series += 1;
                    assert!((2..=5).contains(&se.slices()));
                    assert!(uids.insert(se.uid.clone()));
                    assert!(uids.insert(se.frame_of_reference_uid.clone()));
                    for u in &se.sop_instance_uids {
                        assert!(uids.insert(u.clone()));
                    }
                }
            }
        }
        assert_eq!(n_series, 7);
        assert!(n_studies < 7, "some studies should hold two series");
        for u in &uids {
            assert!(u.len() <= 64 && u.starts_with("2.25."), "{u}");
            let digits = &u[5..];
            assert!(digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'), "{u}");
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        for spec in [
            SiteSpec { slices: 0..=3, ..small(1) },
            SiteSpec { slices: RangeInclusive::new(5, 3), ..small(1) },
            SiteSpec { rows: 4, ..small(1) },
        ] {
            let e = spec.plan().unwrap_err();
            assert!(matches!(e, DicomError::Spec(_)), "{e}");
        }
    }

    #[test]
    fn phantom_has_all_tissues_and_varies_with_the_slice() {
        let plan = SiteSpec { slices: 9..=9, rows: 64, columns: 64, ..small(5) }.plan().unwrap();
        let series = &plan[0].studies[0].series[0];
        let mut h = HuHistogram::default();
        let mid = series.slice_hu(4);
        mid.iter().for_each(|&v| h.add(f64::from(v)));
        assert_eq!(mid.len(), 64 * 64);
        for (bin, n) in h.0.iter().enumerate() {
            assert!(*n > 0, "bin {bin} empty: {:?}", h.0);
        }
        assert_ne!(series.slice_hu(0), mid);
        assert_eq!(series.slice_hu(4), mid);
    }

    #[test]
    fn a_written_series_reads_back_with_the_right_tags_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let spec = small(11);
        let truth = write_site(&spec, dir.path()).unwrap();
        let plan = spec.plan().unwrap();
        let patient = &plan[0];
        let study = &patient.studies[0];
        let series = &study.series[0];
        assert_eq!(truth.series[&series.uid].slices, series.slices());
        assert_eq!(truth.series.len(), 7);
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join(&series.uid))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let expected: Vec<String> = (1..=series.slices()).map(|n| format!("{n}.dcm")).collect();
        assert_eq!(names, expected);

        let k = series.slices() - 1;
        let obj = open_file(dir.path().join(&series.uid).join(format!("{}.dcm", k + 1))).unwrap();
        assert_eq!(obj.meta().transfer_syntax(), uids::EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(obj.meta().media_storage_sop_class_uid(), CT_IMAGE_STORAGE);
        assert_eq!(
            obj.meta().media_storage_sop_instance_uid(),
            series.sop_instance_uids[k as usize]
        );
        assert_eq!(s(&obj, tags::SOP_CLASS_UID), CT_IMAGE_STORAGE);
        assert_eq!(s(&obj, tags::SOP_INSTANCE_UID), series.sop_instance_uids[k as usize]);
        assert_eq!(s(&obj, tags::SERIES_INSTANCE_UID), series.uid);
        assert_eq!(s(&obj, tags::STUDY_INSTANCE_UID), study.uid);
        assert_eq!(s(&obj, tags::PATIENT_ID), patient.id);
        assert_eq!(s(&obj, tags::PATIENT_NAME), patient.name);
        assert_eq!(s(&obj, tags::PATIENT_SEX), patient.sex.as_str());
        assert_eq!(s(&obj, tags::PATIENT_AGE), format!("{:03}Y", patient.age_years));
        assert_eq!(s(&obj, tags::MODALITY), "CT");
        assert_eq!(s(&obj, tags::BODY_PART_EXAMINED), "CHEST");
        assert_eq!(s(&obj, tags::PHOTOMETRIC_INTERPRETATION), "MONOCHROME2");
        assert_eq!(s(&obj, tags::INSTANCE_NUMBER), (k + 1).to_string());
        assert_eq!(s(&obj, tags::STUDY_DATE), study.date);
        let int = |tag| obj.element(tag).unwrap().to_int::<i32>().unwrap();
        assert_eq!(int(tags::ROWS), 16);
        assert_eq!(int(tags::COLUMNS), 20);
        assert_eq!(int(tags::SAMPLES_PER_PIXEL), 1);
        assert_eq!(int(tags::BITS_ALLOCATED), 16);
        assert_eq!(int(tags::BITS_STORED), 16);
        assert_eq!(int(tags::HIGH_BIT), 15);
        assert_eq!(int(tags::PIXEL_REPRESENTATION), 1);
        assert_eq!(int(tags::RESCALE_INTERCEPT), -1024);
        assert_eq!(int(tags::RESCALE_SLOPE), 1);
        let pos = |kk: &str| {
            open_file(dir.path().join(&series.uid).join(kk))
                .unwrap()
                .element(tags::IMAGE_POSITION_PATIENT)
                .unwrap()
                .to_multi_float64()
                .unwrap()
        };
        let thickness = obj.element(tags::SLICE_THICKNESS).unwrap().to_float64().unwrap();
        assert_eq!(thickness, series.slice_thickness);
        let (p1, p2) = (pos("1.dcm"), pos("2.dcm"));
        assert_eq!(p1.len(), 3);
        assert!((p2[2] - p1[2] - thickness).abs() < 1e-6, "{p1:?} {p2:?}");
        assert_eq!(
            obj.element(tags::IMAGE_ORIENTATION_PATIENT).unwrap().to_multi_float64().unwrap(),
            vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        );
        let pixel = obj.element(tags::PIXEL_DATA).unwrap();
        assert_eq!(pixel.vr(), VR::OW);
        let bytes = pixel.to_bytes().unwrap();
        let read: Vec<i16> =
            bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) - 1024).collect();
        assert_eq!(read, series.slice_hu(k));
    }

    #[test]
    fn writing_twice_gives_the_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ta = write_site(&small(2), a.path()).unwrap();
        let tb = write_site(&small(2), b.path()).unwrap();
        assert_eq!(ta, tb);
        let (uid, st) = ta.series.iter().next().unwrap();
        for n in 1..=st.slices {
            let f = format!("{uid}/{n}.dcm");
            assert_eq!(
                std::fs::read(a.path().join(&f)).unwrap(),
                std::fs::read(b.path().join(&f)).unwrap()
            );
        }
    }

    #[test]
    fn stats_of_a_written_site_equal_its_truth() {
        let dir = tempfile::tempdir().unwrap();
        let truth = write_site(&small(21), dir.path()).unwrap();
        let stats = SiteStats::from_folder(dir.path()).unwrap();
        assert_eq!(stats, truth.stats());
        assert_eq!(stats, SiteStats::from(&truth));
        // The truth is not trivially zero.
        assert_eq!(stats.series, 7);
        assert_eq!(stats.files, truth.files);
        assert_eq!(stats.voxels, stats.slices.sum * 16 * 20);
        assert_eq!(stats.patients_by_sex.female + stats.patients_by_sex.male, stats.patients);
        assert!(stats.hu_histogram.0[0] > 0 && stats.hu_histogram.0[5] > 0);
        let on_disk: u64 = walk(dir.path());
        assert_eq!(stats.bytes, on_disk);
    }

    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                if p.is_dir() { walk(&p) } else { std::fs::metadata(&p).unwrap().len() }
            })
            .sum()
    }

    #[test]
    fn merge_of_two_sites_is_the_sum_of_their_truths() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ta = write_site(&small(31), a.path()).unwrap();
        let tb = write_site(&SiteSpec { series: 4, ..small(32) }, b.path()).unwrap();
        let sa = SiteStats::from_folder(a.path()).unwrap();
        let sb = SiteStats::from_folder(b.path()).unwrap();
        let m = SiteStats::merge([&sa, &sb]);
        assert_eq!(m, SiteStats::merge([ta.stats(), tb.stats()]));
        assert_eq!(m.sites, 2);
        assert_eq!(m.series, 11);
        assert_eq!(m.voxels, sa.voxels + sb.voxels);
        assert_eq!(m.hu_sum, sa.hu_sum + sb.hu_sum);
        for i in 0..crate::stats::HU_BINS {
            assert_eq!(m.hu_histogram.0[i], sa.hu_histogram.0[i] + sb.hu_histogram.0[i]);
        }
        assert_eq!(m.slices.min, sa.slices.min.min(sb.slices.min));
        assert_eq!(m.slices.max, sa.slices.max.max(sb.slices.max));
    }

    #[test]
    fn a_non_dicom_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_site(&SiteSpec { series: 2, ..small(41) }, dir.path()).unwrap();
        let bad_dir = dir.path().join("zz-broken");
        std::fs::create_dir(&bad_dir).unwrap();
        // Not even the preamble, and a preamble with garbage after "DICM".
        for (name, body) in [
            ("notes.dcm", b"just text\n".to_vec()),
            ("fake.dcm", {
                let mut v = vec![0u8; 128];
                v.extend_from_slice(b"DICM");
                v.extend_from_slice(&[0xAB; 64]);
                v
            }),
        ] {
            let path = bad_dir.join(name);
            std::fs::write(&path, body).unwrap();
            let e = SiteStats::from_folder(dir.path()).unwrap_err();
            assert!(matches!(e, DicomError::NotDicom { .. }), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            std::fs::remove_file(&path).unwrap();
        }
        // Files not ending in .dcm are ignored.
        std::fs::write(bad_dir.join("README.txt"), "x").unwrap();
        assert_eq!(SiteStats::from_folder(dir.path()).unwrap().series, 2);
    }
}
