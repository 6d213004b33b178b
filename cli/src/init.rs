//! `unfedctl init`: write a commented spec from templates/.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// The built-in tiny model: runs anywhere, nothing to download.
    Tiny,
    /// Qwen2.5-Coder-0.5B-Instruct from a local directory, 2 text shards.
    Qwen,
    /// SmolVLM-256M-Instruct: 2 text shards, 1 vision shard, one MPC pair.
    Smolvlm,
}

impl Template {
    pub fn text(self) -> &'static str {
        match self {
            Template::Tiny => include_str!("../../templates/tiny.toml"),
            Template::Qwen => include_str!("../../templates/qwen.toml"),
            Template::Smolvlm => include_str!("../../templates/smolvlm.toml"),
        }
    }
}

/// Write the template to `path`; never overwrite without `force`.
pub fn write(template: Template, path: &Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; choose another path or pass --force to overwrite it",
            path.display()
        );
    }
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(template.text().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    println!(
        "next: unfedctl plan {0}   then   unfedctl up {0}",
        path.display()
    );
    Ok(())
}
