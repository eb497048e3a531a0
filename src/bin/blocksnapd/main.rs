//! `blocksnapd`: the snapshot daemon (see the daemon issue; placeholder until it lands).
fn main() {
    eprintln!("blocksnapd: not built yet");
    std::process::exit(1);
}
