//! Writes the seed inputs of every fuzz target into `<dir>/<target>/seed-<n>`, so libFuzzer
//! starts from well-formed frames, Hellos, records and configurations
//! (`fuzz/run-libfuzzer.sh` calls it before each run, into a temporary directory).
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    for (target, _) in relay_fuzz::TARGETS {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        for (n, seed) in relay_fuzz::seeds(target).iter().enumerate() {
            std::fs::write(target_dir.join(format!("seed-{n}")), seed)?;
        }
    }
    Ok(())
}
