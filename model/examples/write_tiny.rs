//! Writes builtin:tiny to a directory: `cargo run -p unfed-model --example write_tiny -- DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: write_tiny DIR")?;
    unfed_model::builtin::write_tiny(std::path::Path::new(&dir))?;
    Ok(())
}
