//! `simulations`: runs scenario files and plots their results.
//!
//! ```sh
//! cargo run -p simulations --release -- run simulations/scenarios/scale.toml
//! cargo run -p simulations --release -- plot
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use simulations::mem::{self, CountingAlloc};
use simulations::{Scenario, SimOptions, report};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Debug, Parser)]
#[command(version, about = "Deterministic simulations of kaapana-node federations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a scenario file: prints a summary table, writes `<name>.csv` (deterministic) and
    /// `<name>-perf.csv` (wall time, memory) into the results directory.
    Run {
        /// The scenario (TOML).
        file: PathBuf,
        /// Where to write the CSV files (default: `results/` beside the scenario's folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Check invariants at every step even in a release build (always on in debug).
        #[arg(long)]
        invariants: bool,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Draws the charts (SVG) from the CSV files in the results directory.
    Plot {
        /// The results directory (default: `simulations/results`, or `results` when run
        /// from inside `simulations/`).
        #[arg(long)]
        results: Option<PathBuf>,
    },
}

fn default_out(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap_or_else(|| Path::new("."));
    match dir.file_name() {
        Some(n) if n == "scenarios" => dir.parent().unwrap_or(dir).join("results"),
        _ => dir.join("results"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { file, out, invariants, seed } => {
            let mut scenario = Scenario::load(&file)?;
            if let Some(seed) = seed {
                scenario.seed = seed;
            }
            let out = out.unwrap_or_else(|| default_out(&file));
            let opts =
                SimOptions { invariants: invariants || cfg!(debug_assertions), trace: false };
            eprintln!(
                "{}: {} variant(s), seed {}, invariants {}",
                scenario.name,
                scenario.variants().len(),
                scenario.seed,
                if opts.invariants { "on" } else { "off" }
            );
            let started = Instant::now();
            let results = report::run_scenario(&scenario, opts, |row, perf| {
                eprintln!(
                    "  {:<28} {} events, {:.2} s wall, peak heap {}, done at t = {:.0} s",
                    row.variant,
                    row.events,
                    perf.wall_s,
                    report::human_bytes(perf.peak_heap as f64),
                    row.end_s
                );
            })?;
            print!("{}", report::table(&results));
            print!("{}", report::training_table(&results));
            report::write_results(&out, &scenario.name, &results)
                .with_context(|| format!("writing results to {}", out.display()))?;
            let rss = mem::peak_rss()
                .map_or_else(|| "unknown".to_owned(), |b| report::human_bytes(b as f64));
            let trainings = results.iter().any(|(r, _)| !r.trainings.is_empty());
            println!(
                "total wall time {:.2} s, peak RSS {rss}; wrote {}/{}.csv and {}-perf.csv{}",
                started.elapsed().as_secs_f64(),
                out.display(),
                scenario.name,
                scenario.name,
                if trainings { ", -trainings.csv and -rounds.csv" } else { "" }
            );
        }
        Command::Plot { results } => {
            let results = results.unwrap_or_else(|| {
                let nested = PathBuf::from("simulations/results");
                if nested.is_dir() { nested } else { PathBuf::from("results") }
            });
            let written = simulations::plot::plot_all(&results)?;
            for f in written {
                println!("wrote {}", f.display());
            }
        }
    }
    Ok(())
}
