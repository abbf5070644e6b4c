//! Federated averaging (FedAvg) of a logistic regression on features of DICOM CT series: the
//! library of the job program `kaapana-fedavg` (`src/bin/kaapana-fedavg.rs`).
//!
//! A training workflow runs `kaapana-fedavg train` at every site in each round, and
//! `kaapana-fedavg aggregate` at the owner, whose output is the next round's global model.
//!
//! # Samples: one per series
//!
//! [`samples_from_folder`] reads the `*.dcm` files under a folder exactly as
//! [`SiteStats::from_folder`](crate::SiteStats::from_folder) does (one sub-folder per series
//! is the expected layout; files up to 8 folders deep are read, in path order; the same errors
//! name the file) and groups them by SeriesInstanceUID, in UID order. Each voxel's HU value
//! falls into a bin of [`HU_BIN_LABELS`](crate::stats::HU_BIN_LABELS). For each series:
//!
//! * **features** ([`FEATURES`]): a constant 1 (the bias), the fractions of the series' voxels
//!   in the lung, fat, soft tissue, dense/contrast and bone bins (air is left out: it is one
//!   minus the others), and the mean HU. Each but the bias is standardized with *fixed*
//!   constants ([`FEATURE_CENTER`], [`FEATURE_SCALE`], typical values of chest CT like the
//!   synthetic phantom's), never with statistics of the site's data, so that all sites compute
//!   the same features for the same series.
//! * **label** "large lungs": the slice with the most lung relative to the body, that is the
//!   largest `lung voxels / body voxels` over the series' files (body: every voxel of -900 HU
//!   or more), is at least [`LARGE_LUNG_RATIO`] (an inflation measure; a multi-frame file
//!   counts as one slice here). The features average over *all* slices and the lungs' share
//!   varies along a series, so the features predict the label well but not perfectly (it is
//!   not a threshold on any feature, nor exactly linear in them).
//!
//! # Training (`train`)
//!
//! Full-batch gradient descent on the mean logistic loss ([`loss`]) for `epochs` epochs:
//! `w -= learning_rate * (1/n) Σ (σ(w·x_i) - y_i) x_i`, summed in sample order, no
//! regularization, no randomness: the same data and starting model give bit-identical weights.
//! The starting model is the single `INPUT/*/model.json` (the global model of the previous
//! round) or zeros when there is none or the input folder does not exist (the first round);
//! several are refused.
//!
//! Output files: `OUTPUT/model.json` ([`Model`]: `{"weights": [f64...], "features":
//! [name...]}`; floats as serde_json writes them, the shortest text that parses back to the
//! same bits with a correctly rounding parser such as serde_json's `float_roundtrip`, which
//! this crate enables), `OUTPUT/samples` (the number of samples in decimal and a newline,
//! nothing else) and `OUTPUT/metrics.json` ([`TrainMetrics`]: `samples`, `loss_before` (of the
//! starting model), `loss_after`, `accuracy` (of the trained model on the site's samples,
//! threshold 0.5)). A data folder without series is refused.
//!
//! # Aggregation (`aggregate`)
//!
//! Reads every sub-folder of the input that holds a `model.json`, sorted by folder name (other
//! sub-folders are skipped); each must also hold `samples`, a positive integer, and may hold
//! the `metrics.json` of `train`. [`fedavg`] then computes, in that order,
//!
//! ```text
//! acc[j] = 0.0;  for each update i: acc[j] += (n_i as f64) * w_i[j]
//! w[j]   = acc[j] / (Σ n_i) as f64          (Σ n_i summed as u64)
//! ```
//!
//! All models must have the same feature names (and so the same length); at least one update
//! is needed. Output: `OUTPUT/model.json` and `OUTPUT/metrics.json` ([`AggregateMetrics`]:
//! `updates` (folder `name`, `samples`, `loss`: its `loss_after`, `loss_before`), `samples`
//! (the total), `loss` (the sample-weighted mean of the updates' `loss_after`) and
//! `loss_before` (the same of their `loss_before`: the previous global model's loss over all
//! sites' data); both are `null` unless every update has a `metrics.json`).
//!
//! # Command line
//!
//! ```text
//! kaapana-fedavg train     [--data DIR] [--input DIR] [--output DIR] [--epochs N] [--learning-rate F]
//! kaapana-fedavg aggregate [--input DIR] [--output DIR]
//! ```
//!
//! Defaults: `--data /data`, `--input /input`, `--output /output` (created if missing),
//! [`DEFAULT_EPOCHS`] epochs at [`DEFAULT_LEARNING_RATE`]. Each command prints one summary
//! line; exit status 0 on success, 1 on bad input (the message names the file or folder), 2
//! on bad usage. [`train_site`] and [`aggregate_folder`] are the two commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DicomError;
use crate::stats::{HuHistogram, collect_dcm, read_file};

/// The features' names, in weight order; the first is the bias (always 1).
pub const FEATURES: [&str; 7] = [
    "bias",
    "lung_fraction",
    "fat_fraction",
    "soft_tissue_fraction",
    "dense_fraction",
    "bone_fraction",
    "mean_hu",
];

/// What each raw feature value has subtracted before it is divided by [`FEATURE_SCALE`] (the
/// bias is not changed): fixed, typical values of the synthetic chest phantom at 64 x 64.
pub const FEATURE_CENTER: [f64; 7] = [0.0, 0.06, 0.055, 0.21, 0.003, 0.0087, -700.0];
/// What each raw feature value is divided by after [`FEATURE_CENTER`] is subtracted.
pub const FEATURE_SCALE: [f64; 7] = [1.0, 0.012, 0.008, 0.027, 0.0004, 0.001, 36.0];

/// The label's threshold: a series has "large lungs" if in one of its slices the lung voxels
/// (-900 to -500 HU) are at least this fraction of the body voxels (-900 HU or more).
pub const LARGE_LUNG_RATIO: f64 = 0.27;

/// The default number of epochs per round.
pub const DEFAULT_EPOCHS: u32 = 20;
/// The default learning rate.
pub const DEFAULT_LEARNING_RATE: f64 = 0.5;

/// The file name of a model in the input and output folders.
pub const MODEL_FILE: &str = "model.json";
/// The file name of the sample count.
pub const SAMPLES_FILE: &str = "samples";
/// The file name of the metrics.
pub const METRICS_FILE: &str = "metrics.json";

/// Why training or aggregation failed. Every variant that concerns a file or folder names it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FedAvgError {
    /// Reading the DICOM files failed.
    #[error(transparent)]
    Dicom(#[from] DicomError),
    /// Reading or writing a file or folder failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `model.json` that is not a model.
    #[error("{} is not a model file written by kaapana-fedavg: {reason}", path.display())]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `samples` file that is missing or not a positive integer.
    #[error("{}: {reason}", path.display())]
    SamplesFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `metrics.json` that is not the metrics of `kaapana-fedavg train`.
    #[error("{} is not the metrics.json of `kaapana-fedavg train`: {reason}", path.display())]
    MetricsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Training found more than one starting model.
    #[error(
        "several */model.json under {}: {}; `train` starts from exactly one global model \
         (the previous round's aggregate) or from zeros when there is none",
        dir.display(),
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    SeveralModels {
        /// The input folder.
        dir: PathBuf,
        /// The models found.
        paths: Vec<PathBuf>,
    },
    /// Training found no series.
    #[error(
        "no DICOM series under {}: training needs at least one (*.dcm files, one sub-folder \
         per series)",
        dir.display()
    )]
    NoSeries {
        /// The data folder.
        dir: PathBuf,
    },
    /// Aggregation found no update.
    #[error(
        "no */model.json under {}: `kaapana-fedavg aggregate` expects one sub-folder per \
         site's training job, each holding the model.json and samples of `kaapana-fedavg train`",
        dir.display()
    )]
    NoUpdates {
        /// The input folder.
        dir: PathBuf,
    },
    /// Models or samples that do not fit together (lengths, feature names).
    #[error("{0}")]
    Mismatch(String),
    /// Invalid training options.
    #[error("{0}")]
    Options(String),
    /// Gradient descent produced a weight that is not finite.
    #[error(
        "training diverged in epoch {epoch}: weight {feature} is not finite; use a smaller \
         learning rate"
    )]
    Diverged {
        /// The epoch (1-based).
        epoch: u32,
        /// The feature name of the weight.
        feature: String,
    },
    /// Serializing to JSON failed.
    #[error("cannot serialize as JSON: {0}")]
    Serialize(#[source] serde_json::Error),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FedAvgError {
    let path = path.to_owned();
    move |source| FedAvgError::Io { action, path, source }
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), FedAvgError> {
    std::fs::write(path, contents).map_err(io_error("write", path))
}

fn to_json<T: Serialize>(value: &T) -> Result<String, FedAvgError> {
    let mut s = serde_json::to_string_pretty(value).map_err(FedAvgError::Serialize)?;
    s.push('\n');
    Ok(s)
}

/// A logistic regression model: one weight per feature, the feature names alongside (the
/// layout of `model.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The weights, in the order of `features`.
    pub weights: Vec<f64>,
    /// The feature names ([`FEATURES`] for the models this crate trains).
    pub features: Vec<String>,
}

impl Model {
    /// The all-zero model over [`FEATURES`] (the first round's start).
    pub fn zeros() -> Self {
        Self {
            weights: vec![0.0; FEATURES.len()],
            features: FEATURES.iter().map(|&f| f.to_owned()).collect(),
        }
    }

    /// Parses a model file's contents; `path` is only for the error. Refuses a model without
    /// weights, with a different number of weights and names, or with non-finite weights.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Self, FedAvgError> {
        let bad = |reason: String| FedAvgError::ModelFile { path: path.to_owned(), reason };
        let model: Self = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        if model.weights.is_empty() {
            return Err(bad("it has no weights".into()));
        }
        if model.weights.len() != model.features.len() {
            return Err(bad(format!(
                "it has {} weights but {} feature names",
                model.weights.len(),
                model.features.len()
            )));
        }
        if let Some(i) = model.weights.iter().position(|w| !w.is_finite()) {
            return Err(bad(format!("weight {} is not finite", model.features[i])));
        }
        Ok(model)
    }

    /// Reads a model file.
    pub fn read_json(path: &Path) -> Result<Self, FedAvgError> {
        let json = std::fs::read(path).map_err(io_error("read", path))?;
        Self::from_json(&json, path)
    }

    /// The JSON text (pretty, with a final newline).
    pub fn to_json(&self) -> Result<String, FedAvgError> {
        to_json(self)
    }

    /// Writes the JSON text to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), FedAvgError> {
        write_file(path, self.to_json()?.as_bytes())
    }

    /// Fails unless the feature names are [`FEATURES`] (a model trained on other features).
    pub fn check_features(&self, path: Option<&Path>) -> Result<(), FedAvgError> {
        if self.features.iter().map(String::as_str).eq(FEATURES)
            && self.weights.len() == FEATURES.len()
        {
            return Ok(());
        }
        let origin = path.map_or_else(|| "the model".to_owned(), |p| p.display().to_string());
        Err(FedAvgError::Mismatch(format!(
            "{origin} has the features {:?}, but this program computes {FEATURES:?}",
            self.features
        )))
    }

    /// The predicted probability of the label for the features `x` (`σ(w·x)`); `NaN` if `x`
    /// has another length than the weights.
    pub fn predict(&self, x: &[f64]) -> f64 {
        sigmoid(self.score(x))
    }

    /// `w·x`, summed in order; `NaN` if the lengths differ.
    fn score(&self, x: &[f64]) -> f64 {
        if x.len() != self.weights.len() {
            return f64::NAN;
        }
        self.weights.iter().zip(x).fold(0.0, |acc, (w, x)| acc + w * x)
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The logistic loss of score `z` for label `y`: `ln(1 + e^z) - y z`, computed stably.
fn logistic_loss(z: f64, y: bool) -> f64 {
    let softplus = z.max(0.0) + (-z.abs()).exp().ln_1p();
    if y { softplus - z } else { softplus }
}

/// One series' sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// Its slices (frames of its files).
    pub slices: u32,
    /// The standardized features, in [`FEATURES`] order (the first is 1).
    pub features: Vec<f64>,
    /// The largest lung-to-body voxel ratio of one slice, which the label thresholds.
    pub peak_lung_ratio: f64,
    /// "Large lungs": `peak_lung_ratio >= LARGE_LUNG_RATIO`.
    pub label: bool,
}

/// What is collected of one series while its files are read.
#[derive(Default)]
struct SeriesAcc {
    slices: u32,
    hist: HuHistogram,
    hu_sum: i64,
    peak_lung_ratio: f64,
}

/// The standardized features ([`FEATURES`] order, the bias first) of a series' HU histogram
/// and the sum of its voxels' (rounded) HU values.
pub fn series_features(hist: &HuHistogram, hu_sum: i64) -> Vec<f64> {
    let total = hist.total().max(1) as f64;
    let fraction = |bin: usize| hist.0[bin] as f64 / total;
    let raw = [
        1.0,
        fraction(1),
        fraction(2),
        fraction(3),
        fraction(4),
        fraction(5),
        hu_sum as f64 / total,
    ];
    let mut x = vec![1.0];
    x.extend((1..FEATURES.len()).map(|j| (raw[j] - FEATURE_CENTER[j]) / FEATURE_SCALE[j]));
    x
}

/// Reads every `*.dcm` file under `data` (as [`SiteStats::from_folder`](crate::SiteStats)
/// does: one sub-folder per series expected, up to 8 folders deep, path order) and returns one
/// [`Sample`] per SeriesInstanceUID, in UID order (see the module documentation). A folder
/// without `.dcm` files gives no samples; a file that is not DICOM, lacks SeriesInstanceUID or
/// pixel attributes, or holds compressed pixel data fails naming it.
pub fn samples_from_folder(data: &Path) -> Result<Vec<Sample>, FedAvgError> {
    let mut files = Vec::new();
    collect_dcm(data, 0, &mut files)?;
    files.sort();
    let mut series: BTreeMap<String, SeriesAcc> = BTreeMap::new();
    for path in &files {
        let mut hist = HuHistogram::default();
        let mut hu_sum = 0i64;
        let facts = read_file(path, &mut hist, &mut hu_sum)?;
        let acc = series.entry(facts.series_uid).or_default();
        acc.slices += facts.frames;
        acc.hu_sum += hu_sum;
        acc.hist.merge(&hist);
        let body = hist.total() - hist.0[0];
        if body > 0 {
            acc.peak_lung_ratio = acc.peak_lung_ratio.max(hist.0[1] as f64 / body as f64);
        }
    }
    Ok(series
        .into_iter()
        .map(|(series_uid, acc)| Sample {
            series_uid,
            slices: acc.slices,
            features: series_features(&acc.hist, acc.hu_sum),
            peak_lung_ratio: acc.peak_lung_ratio,
            label: acc.peak_lung_ratio >= LARGE_LUNG_RATIO,
        })
        .collect())
}

/// The mean logistic loss of `model` over `samples` (summed in order); `NaN` without samples
/// or if a sample has another number of features than the model has weights.
pub fn loss(model: &Model, samples: &[Sample]) -> f64 {
    let sum =
        samples.iter().fold(0.0, |acc, s| acc + logistic_loss(model.score(&s.features), s.label));
    sum / samples.len() as f64
}

/// The fraction of `samples` whose label `model` predicts (probability 0.5 or more means
/// `true`); `NaN` without samples.
pub fn accuracy(model: &Model, samples: &[Sample]) -> f64 {
    let right = samples.iter().filter(|s| (model.predict(&s.features) >= 0.5) == s.label).count();
    right as f64 / samples.len() as f64
}

/// Gradient descent's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Full-batch epochs (0 only evaluates the starting model).
    pub epochs: u32,
    /// The step size (finite, positive).
    pub learning_rate: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { epochs: DEFAULT_EPOCHS, learning_rate: DEFAULT_LEARNING_RATE }
    }
}

/// Full-batch gradient descent from `start` on `samples` (see the module documentation);
/// deterministic. Fails without samples, if the model's weights and a sample's features differ
/// in number, on a learning rate that is not finite and positive, and if a weight stops being
/// finite.
pub fn train(
    start: &Model,
    samples: &[Sample],
    options: &TrainOptions,
) -> Result<Model, FedAvgError> {
    if samples.is_empty() {
        return Err(FedAvgError::Mismatch("training needs at least one sample".into()));
    }
    if !(options.learning_rate.is_finite() && options.learning_rate > 0.0) {
        return Err(FedAvgError::Options(format!(
            "the learning rate {} is not a finite positive number",
            options.learning_rate
        )));
    }
    let dims = start.weights.len();
    if let Some(s) = samples.iter().find(|s| s.features.len() != dims) {
        return Err(FedAvgError::Mismatch(format!(
            "the model has {dims} weights but series {} has {} features",
            s.series_uid,
            s.features.len()
        )));
    }
    let mut model = start.clone();
    let n = samples.len() as f64;
    let mut gradient = vec![0.0; dims];
    for epoch in 1..=options.epochs {
        gradient.iter_mut().for_each(|g| *g = 0.0);
        for s in samples {
            let error = sigmoid(model.score(&s.features)) - if s.label { 1.0 } else { 0.0 };
            for (g, x) in gradient.iter_mut().zip(&s.features) {
                *g += error * x;
            }
        }
        for (w, g) in model.weights.iter_mut().zip(&gradient) {
            *w -= options.learning_rate * (g / n);
        }
        if let Some(j) = model.weights.iter().position(|w| !w.is_finite()) {
            let feature = model.features.get(j).cloned().unwrap_or_else(|| j.to_string());
            return Err(FedAvgError::Diverged { epoch, feature });
        }
    }
    Ok(model)
}

/// FedAvg: the sample-weighted mean of the models, `w[j] = (Σ n_i·w_i[j]) / Σ n_i`, summed in
/// the given order as `acc[j] += (n_i as f64) * w_i[j]` and divided by `Σ n_i` (a `u64`) as
/// `f64`. Fails without updates, on an update of 0 samples, and if the models' feature names
/// (or lengths) differ.
pub fn fedavg(updates: &[(u64, &Model)]) -> Result<Model, FedAvgError> {
    let Some((_, first)) = updates.first() else {
        return Err(FedAvgError::Mismatch("FedAvg needs at least one update".into()));
    };
    let mut acc = vec![0.0; first.weights.len()];
    let mut total: u64 = 0;
    for (i, (n, model)) in updates.iter().enumerate() {
        if *n == 0 {
            return Err(FedAvgError::Mismatch(format!("update {} has 0 samples", i + 1)));
        }
        if model.weights.len() != acc.len() || model.features != first.features {
            return Err(FedAvgError::Mismatch(format!(
                "update {} has {} weights for the features {:?}, but update 1 has {} for {:?}",
                i + 1,
                model.weights.len(),
                model.features,
                acc.len(),
                first.features
            )));
        }
        total = total
            .checked_add(*n)
            .ok_or_else(|| FedAvgError::Mismatch("the sample counts overflow u64".into()))?;
        for (a, w) in acc.iter_mut().zip(&model.weights) {
            *a += (*n as f64) * w;
        }
    }
    let total = total as f64;
    Ok(Model { weights: acc.iter().map(|a| a / total).collect(), features: first.features.clone() })
}

/// The `metrics.json` of `train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// The samples (series) trained on.
    pub samples: u64,
    /// The starting model's mean loss on them.
    pub loss_before: f64,
    /// The trained model's mean loss on them.
    pub loss_after: f64,
    /// The trained model's accuracy on them.
    pub accuracy: f64,
}

impl TrainMetrics {
    /// Reads a `metrics.json` of `train`.
    pub fn read_json(path: &Path) -> Result<Self, FedAvgError> {
        let json = std::fs::read(path).map_err(io_error("read", path))?;
        serde_json::from_slice(&json)
            .map_err(|e| FedAvgError::MetricsFile { path: path.to_owned(), reason: e.to_string() })
    }
}

/// What [`train_site`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The starting model's file, `None` for zeros.
    pub start: Option<PathBuf>,
    /// The trained model.
    pub model: Model,
    /// Its metrics.
    pub metrics: TrainMetrics,
}

impl TrainReport {
    /// The one-line summary `kaapana-fedavg train` prints.
    pub fn summary(&self, data: &Path, options: &TrainOptions) -> String {
        let start =
            self.start.as_ref().map_or_else(|| "zeros".to_owned(), |p| p.display().to_string());
        format!(
            "trained on {} series of {}: {} epochs at learning rate {} from {start}: loss {:.6} -> \
             {:.6}, accuracy {:.3}",
            self.metrics.samples,
            data.display(),
            options.epochs,
            options.learning_rate,
            self.metrics.loss_before,
            self.metrics.loss_after,
            self.metrics.accuracy
        )
    }
}

/// The sub-folders of `dir`, sorted by name.
fn sub_folders(dir: &Path) -> Result<Vec<PathBuf>, FedAvgError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("list the folder", dir))? {
        let path = entry.map_err(io_error("list the folder", dir))?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// The starting model of a round: the one `input/*/model.json` (returned with its path), or
/// zeros if there is none or `input` does not exist. Fails on several, or on one that is not a
/// model over [`FEATURES`].
pub fn start_model(input: &Path) -> Result<(Model, Option<PathBuf>), FedAvgError> {
    if !input.exists() {
        return Ok((Model::zeros(), None));
    }
    let mut found: Vec<PathBuf> = sub_folders(input)?
        .into_iter()
        .map(|d| d.join(MODEL_FILE))
        .filter(|f| f.is_file())
        .collect();
    match found.len() {
        0 => Ok((Model::zeros(), None)),
        1 => {
            let path = found.remove(0);
            let model = Model::read_json(&path)?;
            model.check_features(Some(&path))?;
            Ok((model, Some(path)))
        }
        _ => Err(FedAvgError::SeveralModels { dir: input.to_owned(), paths: found }),
    }
}

fn create_output(dir: &Path) -> Result<(), FedAvgError> {
    std::fs::create_dir_all(dir).map_err(io_error("create the output folder", dir))
}

/// `kaapana-fedavg train`: the samples of `data`, the starting model of `input`
/// ([`start_model`]), [`train`], then writes `output/model.json`, `output/samples` and
/// `output/metrics.json` (creating `output`). Fails on a `data` folder without series.
pub fn train_site(
    data: &Path,
    input: &Path,
    output: &Path,
    options: &TrainOptions,
) -> Result<TrainReport, FedAvgError> {
    let samples = samples_from_folder(data)?;
    if samples.is_empty() {
        return Err(FedAvgError::NoSeries { dir: data.to_owned() });
    }
    let (start_model, start) = start_model(input)?;
    let model = train(&start_model, &samples, options)?;
    let metrics = TrainMetrics {
        samples: samples.len() as u64,
        loss_before: loss(&start_model, &samples),
        loss_after: loss(&model, &samples),
        accuracy: accuracy(&model, &samples),
    };
    create_output(output)?;
    model.write_json(&output.join(MODEL_FILE))?;
    write_file(&output.join(SAMPLES_FILE), format!("{}\n", metrics.samples).as_bytes())?;
    write_file(&output.join(METRICS_FILE), to_json(&metrics)?.as_bytes())?;
    Ok(TrainReport { start, model, metrics })
}

/// Parses a `samples` file: decimal digits, optionally followed by one newline; positive.
pub fn parse_samples(text: &[u8], path: &Path) -> Result<u64, FedAvgError> {
    let bad = |reason: String| FedAvgError::SamplesFile { path: path.to_owned(), reason };
    let digits = text.strip_suffix(b"\n").unwrap_or(text);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad(format!(
            "holds {:?}, not the number of samples (decimal digits and a newline)",
            String::from_utf8_lossy(&text[..text.len().min(40)])
        )));
    }
    let n: u64 = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| bad("holds a number too large for 64 bits".into()))?;
    if n == 0 {
        return Err(bad("holds 0: an update must have at least one sample".into()));
    }
    Ok(n)
}

/// One update in the aggregate's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateMetrics {
    /// The update's folder name.
    pub name: String,
    /// Its samples.
    pub samples: u64,
    /// Its `loss_after`, `None` without a `metrics.json`.
    pub loss: Option<f64>,
    /// Its `loss_before` (the previous global model's loss on its data).
    pub loss_before: Option<f64>,
}

/// The `metrics.json` of `aggregate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateMetrics {
    /// The updates, in folder-name order.
    pub updates: Vec<UpdateMetrics>,
    /// All their samples.
    pub samples: u64,
    /// The sample-weighted mean of the updates' `loss_after`; `None` unless all are known.
    pub loss: Option<f64>,
    /// The sample-weighted mean of their `loss_before`; `None` unless all are known.
    pub loss_before: Option<f64>,
}

/// What [`aggregate_folder`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateReport {
    /// The FedAvg model.
    pub model: Model,
    /// Its metrics.
    pub metrics: AggregateMetrics,
    /// Sub-folders of the input without `model.json`, skipped.
    pub skipped: Vec<PathBuf>,
}

impl AggregateReport {
    /// The one-line summary `kaapana-fedavg aggregate` prints.
    pub fn summary(&self) -> String {
        let show = |l: Option<f64>| l.map_or_else(|| "unknown".to_owned(), |l| format!("{l:.6}"));
        format!(
            "aggregated {} updates of {} samples: weighted loss {} (before local training {})",
            self.metrics.updates.len(),
            self.metrics.samples,
            show(self.metrics.loss),
            show(self.metrics.loss_before)
        )
    }
}

fn weighted_mean(values: &[(u64, Option<f64>)]) -> Option<f64> {
    let mut sum = 0.0;
    let mut total = 0u64;
    for (n, v) in values {
        sum += (*n as f64) * (*v)?;
        total += n;
    }
    (total > 0).then(|| sum / total as f64)
}

/// `kaapana-fedavg aggregate`: reads the updates of `input` (see the module documentation),
/// computes [`fedavg`] in folder-name order and writes `output/model.json` and
/// `output/metrics.json` (creating `output`).
pub fn aggregate_folder(input: &Path, output: &Path) -> Result<AggregateReport, FedAvgError> {
    let mut models = Vec::new();
    let mut updates = Vec::new();
    let mut skipped = Vec::new();
    for dir in sub_folders(input)? {
        let model_file = dir.join(MODEL_FILE);
        if !model_file.is_file() {
            skipped.push(dir);
            continue;
        }
        let model = Model::read_json(&model_file)?;
        let samples_file = dir.join(SAMPLES_FILE);
        if !samples_file.is_file() {
            return Err(FedAvgError::SamplesFile {
                path: samples_file,
                reason: format!(
                    "is missing: {} has a model.json, so it must also hold the samples file of \
                     `kaapana-fedavg train`",
                    dir.display()
                ),
            });
        }
        let text = std::fs::read(&samples_file).map_err(io_error("read", &samples_file))?;
        let samples = parse_samples(&text, &samples_file)?;
        let metrics_file = dir.join(METRICS_FILE);
        let metrics = if metrics_file.is_file() {
            Some(TrainMetrics::read_json(&metrics_file)?)
        } else {
            None
        };
        if let Some(m) = &metrics
            && m.samples != samples
        {
            return Err(FedAvgError::MetricsFile {
                path: metrics_file,
                reason: format!(
                    "it counts {} samples but {} says {samples}",
                    m.samples,
                    samples_file.display()
                ),
            });
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        updates.push(UpdateMetrics {
            name,
            samples,
            loss: metrics.as_ref().map(|m| m.loss_after),
            loss_before: metrics.as_ref().map(|m| m.loss_before),
        });
        models.push((samples, model, model_file));
    }
    if models.is_empty() {
        return Err(FedAvgError::NoUpdates { dir: input.to_owned() });
    }
    let (_, _, first_file) = &models[0];
    for (_, model, file) in &models[1..] {
        if model.features != models[0].1.features {
            return Err(FedAvgError::Mismatch(format!(
                "{} has the features {:?}, but {} has {:?}: all updates must come from the same \
                 program",
                file.display(),
                model.features,
                first_file.display(),
                models[0].1.features
            )));
        }
    }
    let pairs: Vec<(u64, &Model)> = models.iter().map(|(n, m, _)| (*n, m)).collect();
    let model = fedavg(&pairs)?;
    let samples = updates.iter().map(|u| u.samples).sum();
    let loss = weighted_mean(&updates.iter().map(|u| (u.samples, u.loss)).collect::<Vec<_>>());
    let loss_before =
        weighted_mean(&updates.iter().map(|u| (u.samples, u.loss_before)).collect::<Vec<_>>());
    let metrics = AggregateMetrics { updates, samples, loss, loss_before };
    create_output(output)?;
    model.write_json(&output.join(MODEL_FILE))?;
    write_file(&output.join(METRICS_FILE), to_json(&metrics)?.as_bytes())?;
    Ok(AggregateReport { model, metrics, skipped })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{SiteSpec, write_site};

    fn spec(seed: u64, series: usize) -> SiteSpec {
        SiteSpec { series, slices: 3..=8, rows: 32, columns: 32, ..SiteSpec::new(seed) }
    }

    fn model(weights: &[f64]) -> Model {
        Model {
            weights: weights.to_vec(),
            features: (0..weights.len()).map(|i| format!("f{i}")).collect(),
        }
    }

    #[test]
    fn fedavg_of_known_vectors() {
        let (a, b, c) =
            (model(&[1.0, 2.0, -4.0]), model(&[3.0, 6.0, 0.0]), model(&[0.5, 0.0, 8.0]));
        let avg = fedavg(&[(1, &a), (3, &b)]).unwrap();
        assert_eq!(avg.weights, vec![2.5, 5.0, -1.0]);
        assert_eq!(avg.features, a.features);
        let avg = fedavg(&[(2, &a), (1, &b), (1, &c)]).unwrap();
        assert_eq!(avg.weights, vec![(2.0 + 3.0 + 0.5) / 4.0, 10.0 / 4.0, 0.0]);
        assert_eq!(fedavg(&[(7, &c)]).unwrap(), c);
    }

    #[test]
    fn fedavg_refuses_what_does_not_fit() {
        let (a, short) = (model(&[1.0, 2.0]), model(&[1.0]));
        let e = fedavg(&[(1, &a), (1, &short)]).unwrap_err().to_string();
        assert!(e.contains("update 2 has 1 weights"), "{e}");
        let mut renamed = a.clone();
        renamed.features[1] = "other".into();
        assert!(fedavg(&[(1, &a), (2, &renamed)]).is_err());
        assert!(fedavg(&[]).is_err());
        assert!(fedavg(&[(1, &a), (0, &a)]).unwrap_err().to_string().contains("0 samples"));
        // And training refuses a model over other features.
        let sample = Sample {
            series_uid: "1.2".into(),
            slices: 1,
            features: vec![1.0; 7],
            peak_lung_ratio: 0.0,
            label: false,
        };
        assert!(train(&a, std::slice::from_ref(&sample), &TrainOptions::default()).is_err());
        assert!(loss(&a, &[sample]).is_nan());
        let e = a.check_features(Some(Path::new("in/x/model.json"))).unwrap_err().to_string();
        assert!(e.contains("in/x/model.json"), "{e}");
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        write_site(&spec(11, 30), dir.path()).unwrap();
        let samples = samples_from_folder(dir.path()).unwrap();
        assert_eq!(samples.len(), 30);
        let positives = samples.iter().filter(|s| s.label).count();
        assert!((5..=25).contains(&positives), "{positives} of 30 have large lungs");
        assert!(samples.iter().all(|s| s.features.len() == FEATURES.len() && s.features[0] == 1.0));

        let zeros = Model::zeros();
        let before = loss(&zeros, &samples);
        assert!((before - std::f64::consts::LN_2).abs() < 1e-12, "{before}");
        let options = TrainOptions::default();
        let once = train(&zeros, &samples, &options).unwrap();
        let twice = train(&once, &samples, &options).unwrap();
        let (l1, l2) = (loss(&once, &samples), loss(&twice, &samples));
        assert!(l1 < before - 0.1 && l2 < l1, "{before} -> {l1} -> {l2}");
        assert!(accuracy(&twice, &samples) >= 0.8, "{}", accuracy(&twice, &samples));

        // Same data and model: the same bits, also through a second read of the files.
        let again = train(&zeros, &samples_from_folder(dir.path()).unwrap(), &options).unwrap();
        let bits = |m: &Model| m.weights.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&again), bits(&once));
        // model.json round-trips exactly.
        let json = once.to_json().unwrap();
        assert_eq!(bits(&Model::from_json(json.as_bytes(), Path::new("m")).unwrap()), bits(&once));

        // train_site twice writes the same files.
        let out = tempfile::tempdir().unwrap();
        let (o1, o2) = (out.path().join("o1"), out.path().join("o2"));
        let nowhere = dir.path().join("no-input");
        for o in [&o1, &o2] {
            let report = train_site(dir.path(), &nowhere, o, &options).unwrap();
            assert_eq!(report.start, None);
            assert_eq!(report.model, once);
            assert_eq!(std::fs::read_to_string(o.join(SAMPLES_FILE)).unwrap(), "30\n");
        }
        for f in [MODEL_FILE, SAMPLES_FILE, METRICS_FILE] {
            assert_eq!(std::fs::read(o1.join(f)).unwrap(), std::fs::read(o2.join(f)).unwrap());
        }
    }

    #[test]
    fn start_models_samples_files_and_empty_data() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("input");
        std::fs::create_dir_all(input.join("logs")).unwrap();
        assert_eq!(start_model(&input).unwrap(), (Model::zeros(), None));
        let global = Model { weights: vec![0.25; 7], ..Model::zeros() };
        std::fs::create_dir_all(input.join("aggregate")).unwrap();
        global.write_json(&input.join("aggregate/model.json")).unwrap();
        let (m, path) = start_model(&input).unwrap();
        assert_eq!((m, path), (global.clone(), Some(input.join("aggregate/model.json"))));
        std::fs::create_dir_all(input.join("other")).unwrap();
        global.write_json(&input.join("other/model.json")).unwrap();
        let e = start_model(&input).unwrap_err().to_string();
        assert!(e.contains("several") && e.contains("other/model.json"), "{e}");

        let bad = tmp.path().join("bad.json");
        std::fs::write(&bad, r#"{"weights": [1.0, null], "features": ["a", "b"]}"#).unwrap();
        let e = Model::read_json(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json"), "{e}");
        std::fs::write(&bad, r#"{"weights": [1.0], "features": ["a", "b"]}"#).unwrap();
        assert!(Model::read_json(&bad).unwrap_err().to_string().contains("1 weights but 2"));

        let p = Path::new("u/samples");
        assert_eq!(parse_samples(b"42\n", p).unwrap(), 42);
        assert_eq!(parse_samples(b"7", p).unwrap(), 7);
        for text in
            [&b"0\n"[..], b"", b"\n", b"-3\n", b"12 \n", b"4\n\n", b"99999999999999999999999"]
        {
            let e = parse_samples(text, p).unwrap_err().to_string();
            assert!(e.contains("u/samples"), "{e}");
        }

        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("empty-series")).unwrap();
        let e = train_site(&data, &input, &tmp.path().join("out"), &TrainOptions::default());
        assert!(matches!(e, Err(FedAvgError::NoSeries { .. })), "{e:?}");
        assert!(!tmp.path().join("out").exists());
    }
}
