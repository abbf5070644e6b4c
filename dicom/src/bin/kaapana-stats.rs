//! `kaapana-stats`: the statistics job program (run inside the busybox job image; built
//! statically by `kn_build_job_programs` in `scripts/common.sh`). A thin command line over
//! [`kaapana_dicom::SiteStats`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kaapana_dicom::{DicomError, SiteStats};

const HELP: &str = "\
kaapana-stats: statistics over DICOM CT series (a kaapana-node job program)

Usage:
  kaapana-stats site  [--input DIR] [--output DIR]
  kaapana-stats merge [--input DIR] [--output DIR]
  kaapana-stats --help | --version

Commands:
  site   Reads every *.dcm file under the input folder (default /input; one sub-folder per
         series), headers and pixel data, and writes OUTPUT/stats.json (default /output):
         patients, studies, series, slices per series, patients by sex and age decade,
         voxels and an HU histogram. Prints a short summary.
  merge  Reads every INPUT/*/stats.json (default /input; one sub-folder per upstream job),
         sums them and writes OUTPUT/merged.json (default /output). Prints it.

The output folder is created if missing. Exit status: 0 on success, 1 on bad input (the
message names the file), 2 on bad usage.
";

enum Command {
    Site,
    Merge,
}

struct Args {
    command: Command,
    input: PathBuf,
    output: PathBuf,
}

enum Parsed {
    Run(Args),
    Help,
    Version,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut command = None;
    let mut input = PathBuf::from("/input");
    let mut output = PathBuf::from("/output");
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" | "help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--input" | "--output" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| format!("{flag} needs a folder"))?,
                };
                if value.is_empty() {
                    return Err(format!("{flag} needs a folder"));
                }
                if flag == "--input" {
                    input = value.into();
                } else {
                    output = value.into();
                }
            }
            "site" | "merge" if command.is_none() => {
                command = Some(if flag == "site" { Command::Site } else { Command::Merge });
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let command = command.ok_or("name a command: site or merge")?;
    Ok(Parsed::Run(Args { command, input, output }))
}

fn create_output(dir: &Path) -> Result<(), DicomError> {
    std::fs::create_dir_all(dir).map_err(|source| DicomError::Io {
        action: "create the output folder",
        path: dir.to_owned(),
        source,
    })
}

fn run(args: &Args) -> Result<(), DicomError> {
    match args.command {
        Command::Site => {
            let stats = SiteStats::from_folder(&args.input)?;
            create_output(&args.output)?;
            let out = args.output.join("stats.json");
            stats.write_json(&out)?;
            print!("{}", stats.summary());
            println!("wrote {}", out.display());
        }
        Command::Merge => {
            let (merged, skipped) = SiteStats::merge_folder(&args.input)?;
            for dir in skipped {
                eprintln!("kaapana-stats: skipped {} (no stats.json)", dir.display());
            }
            create_output(&args.output)?;
            let out = args.output.join("merged.json");
            merged.write_json(&out)?;
            print!("{}", merged.to_json()?);
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
            println!("kaapana-stats {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(args)) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kaapana-stats: error: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("kaapana-stats: {e}\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}
