//! Model tools: `inspect`, `split`, `verify`, `model tiny`.
//!
//! Exit codes: 0 ok, 1 verify found problems, 2 bad usage or unreadable input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use unfed_model::split::{SplitOptions, split};

const EXIT_PROBLEMS: u8 = 1;
const EXIT_INPUT: u8 = 2;

#[derive(Subcommand)]
pub enum Commands {
    /// Show a HuggingFace checkpoint's architecture, layers, sizes, dtype and parameters.
    Inspect {
        /// Directory holding config.json and *.safetensors (or `builtin:tiny`).
        model_dir: PathBuf,
        /// Print machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cut a checkpoint into per-shard safetensors files plus manifest.json.
    ///
    /// Layers are split into contiguous ranges, as evenly as possible; the first text
    /// shard holds the embedding, the last the final norm and LM head. The output is
    /// written to a temporary directory and renamed into place when complete.
    Split {
        /// Directory holding config.json, *.safetensors and tokenizer.json (or `builtin:tiny`).
        model_dir: PathBuf,
        /// Where to write the shards (must not exist, or be empty).
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        /// Number of text shards (1 ..= number of decoder layers).
        #[arg(long, visible_alias = "num-text-shards", value_name = "N")]
        text_shards: usize,
        /// Number of vision shards (vision-language models only; default 1 for them).
        #[arg(long, visible_alias = "num-vision-shards", value_name = "M")]
        vision_shards: Option<usize>,
        /// Model id recorded in the manifest [default: `_name_or_path` or the directory name].
        #[arg(long)]
        model_id: Option<String>,
    },
    /// Check a split directory: files, sizes, hashes, layer coverage and tensor shapes.
    ///
    /// Prints one line per problem and exits 1 if there is any.
    Verify {
        /// A directory written by `unfedctl split`.
        dir: PathBuf,
    },
    /// Built-in models.
    #[command(subcommand)]
    Model(ModelCommands),
}

#[derive(Subcommand)]
pub enum ModelCommands {
    /// Write the built-in tiny Qwen2-layout model (deterministic, HuggingFace format).
    Tiny {
        /// Directory to create.
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
    },
}

pub fn run(cmd: Commands) -> anyhow::Result<ExitCode> {
    match execute(cmd) {
        Ok(code) => Ok(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            Ok(ExitCode::from(EXIT_INPUT))
        }
    }
}

fn execute(cmd: Commands) -> anyhow::Result<ExitCode> {
    match cmd {
        Commands::Inspect { model_dir, json } => {
            let source = Source::resolve(&model_dir)?;
            let report = unfed_model::inspect::inspect(source.dir())?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&report)?));
            } else {
                out(&report.to_string());
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Split {
            model_dir,
            output,
            text_shards,
            vision_shards,
            model_id,
        } => {
            let source = Source::resolve(&model_dir)?;
            let opts = SplitOptions {
                text_shards,
                vision_shards,
                model_id: model_id.or_else(|| source.model_id()),
                progress: true,
            };
            let m = split(source.dir(), &output, &opts)?;
            println!(
                "split {} ({}, {}) into {} in {}",
                m.model_id,
                m.architecture,
                m.dtype,
                m.shards
                    .iter()
                    .map(|s| format!("{} [{}..{})", s.file, s.layer_start, s.layer_end))
                    .collect::<Vec<_>>()
                    .join(", "),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Commands::Verify { dir } => {
            if !dir.join(unfed_model::manifest::MANIFEST_FILE).is_file() {
                anyhow::bail!(
                    "{}: no manifest.json; pass a directory written by `unfedctl split`",
                    dir.display()
                );
            }
            let problems = unfed_model::verify::verify(&dir);
            if problems.is_empty() {
                println!("ok: {} verified", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            out(&problems
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>());
            eprintln!(
                "error: {} problem(s) in {}; re-run `unfedctl split` or re-copy the directory",
                problems.len(),
                dir.display()
            );
            Ok(ExitCode::from(EXIT_PROBLEMS))
        }
        Commands::Model(ModelCommands::Tiny { output }) => {
            unfed_model::builtin::write_tiny(&output)?;
            println!("wrote builtin:tiny to {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// A model argument: a directory, or `builtin:NAME` materialised in a temp dir.
enum Source {
    Dir(PathBuf),
    Builtin(unfed_model::builtin::Materialised),
}

impl Source {
    fn resolve(arg: &Path) -> anyhow::Result<Self> {
        match unfed_model::builtin::materialise(&arg.to_string_lossy())? {
            Some(m) => Ok(Self::Builtin(m)),
            None => Ok(Self::Dir(arg.to_path_buf())),
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Self::Dir(d) => d,
            Self::Builtin(m) => m.dir(),
        }
    }

    fn model_id(&self) -> Option<String> {
        match self {
            Self::Dir(_) => None,
            Self::Builtin(m) => Some(m.model_id().to_string()),
        }
    }
}
