//! `kaapana-fedavg`: the federated-learning job program (run inside the busybox job image;
//! built statically by `kn_build_job_programs` in `scripts/common.sh`). A thin command line
//! over [`kaapana_dicom::fedavg`].

use std::path::PathBuf;
use std::process::ExitCode;

use kaapana_dicom::fedavg::{self, FedAvgError, TrainOptions};

const HELP: &str = "\
kaapana-fedavg: federated averaging (FedAvg) of a logistic regression on DICOM CT series
(a kaapana-node job program)

Usage:
  kaapana-fedavg train     [--data DIR] [--input DIR] [--output DIR] [--epochs N]
                           [--learning-rate F]
  kaapana-fedavg aggregate [--input DIR] [--output DIR]
  kaapana-fedavg --help | --version

Commands:
  train      Runs at every site in every round. Reads every *.dcm file under the data
             folder (default /data; one sub-folder per series), one sample per series:
             features = bias, the fractions of voxels in the HU bands lung, fat, soft
             tissue, dense/contrast and bone, and the mean HU, standardized by fixed
             constants; label = \"large lungs\" (some slice's lung voxels are at least 27% of
             its body voxels). Starts from INPUT/*/model.json (default /input) if there is
             exactly one (the previous round's global model), from zeros if there is none,
             and fails on several. Full-batch gradient descent on the mean logistic loss for
             N epochs (default 20) at learning rate F (default 0.5); deterministic. Writes
             OUTPUT/model.json ({\"weights\": [...], \"features\": [...]}), OUTPUT/samples (the
             number of samples and a newline) and OUTPUT/metrics.json (samples,
             loss_before, loss_after, accuracy) (default /output). Fails on 0 series.
  aggregate  Runs at the owner after every round. Reads every sub-folder of the input
             (default /input), sorted by name, that holds model.json; each must also hold
             samples (a positive integer) and may hold metrics.json. Computes FedAvg in
             that order: acc[j] += (n_i as f64) * w_i[j], then w[j] = acc[j] / (sum of n_i)
             as f64. All models must have the same features. Writes OUTPUT/model.json and
             OUTPUT/metrics.json (updates: name, samples, loss; samples; loss: the
             sample-weighted mean of the updates' loss_after, null if one is unknown;
             loss_before likewise) (default /output).

Each command prints one summary line. The output folder is created if missing. Exit status:
0 on success, 1 on bad input (the message names the file or folder), 2 on bad usage.
";

enum Command {
    Train,
    Aggregate,
}

struct Args {
    command: Command,
    data: PathBuf,
    input: PathBuf,
    output: PathBuf,
    options: TrainOptions,
}

enum Parsed {
    Run(Args),
    Help,
    Version,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut command = None;
    let mut data = PathBuf::from("/data");
    let mut input = PathBuf::from("/input");
    let mut output = PathBuf::from("/output");
    let mut options = TrainOptions::default();
    let mut train_only = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            let v = match inline.clone() {
                Some(v) => v,
                None => args.next().ok_or_else(|| format!("{flag} needs {what}"))?,
            };
            if v.is_empty() {
                return Err(format!("{flag} needs {what}"));
            }
            Ok(v)
        };
        match flag.as_str() {
            "-h" | "--help" | "help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--data" => {
                data = value("a folder")?.into();
                train_only.push(flag);
            }
            "--input" => input = value("a folder")?.into(),
            "--output" => output = value("a folder")?.into(),
            "--epochs" => {
                let v = value("a number")?;
                options.epochs =
                    v.parse().ok().filter(|&n: &u32| n <= 1_000_000).ok_or_else(|| {
                        format!("--epochs {v:?} is not a number from 0 to 1000000")
                    })?;
                train_only.push(flag);
            }
            "--learning-rate" => {
                let v = value("a number")?;
                options.learning_rate = v
                    .parse()
                    .ok()
                    .filter(|&f: &f64| f.is_finite() && f > 0.0)
                    .ok_or_else(|| format!("--learning-rate {v:?} is not a positive number"))?;
                train_only.push(flag);
            }
            "train" | "aggregate" if command.is_none() => {
                command = Some(if flag == "train" { Command::Train } else { Command::Aggregate });
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let command = command.ok_or("name a command: train or aggregate")?;
    if let (Command::Aggregate, Some(flag)) = (&command, train_only.first()) {
        return Err(format!("{flag} is an option of train, not of aggregate"));
    }
    Ok(Parsed::Run(Args { command, data, input, output, options }))
}

fn run(args: &Args) -> Result<(), FedAvgError> {
    match args.command {
        Command::Train => {
            let report = fedavg::train_site(&args.data, &args.input, &args.output, &args.options)?;
            println!(
                "{}; wrote {}",
                report.summary(&args.data, &args.options),
                args.output.join(fedavg::MODEL_FILE).display()
            );
        }
        Command::Aggregate => {
            let report = fedavg::aggregate_folder(&args.input, &args.output)?;
            for dir in &report.skipped {
                eprintln!("kaapana-fedavg: skipped {} (no model.json)", dir.display());
            }
            println!(
                "{}; wrote {}",
                report.summary(),
                args.output.join(fedavg::MODEL_FILE).display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(Parsed::Help) => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Version) => {
            println!("kaapana-fedavg {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(args)) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kaapana-fedavg: error: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("kaapana-fedavg: {e}\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}
