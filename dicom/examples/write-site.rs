//! Writes a synthetic CT site and prints its truth as statistics JSON, with the time taken:
//! `cargo run --release -p kaapana-dicom --example write-site -- DIR [SEED] [SERIES]`.

use std::path::PathBuf;
use std::time::Instant;

use kaapana_dicom::{SiteSpec, write_site};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: write-site DIR [SEED] [SERIES]")?);
    let seed = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let mut spec = SiteSpec::new(seed);
    if let Some(n) = args.next() {
        spec.series = n.parse()?;
    }
    let start = Instant::now();
    let truth = write_site(&spec, &dir)?;
    let took = start.elapsed();
    print!("{}", truth.stats().to_json()?);
    eprintln!(
        "wrote {} series, {} files, {} bytes in {:.3} s",
        truth.series.len(),
        truth.files,
        truth.bytes,
        took.as_secs_f64()
    );
    Ok(())
}
