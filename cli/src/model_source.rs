//! A spec's model directory: whether it can be split, and where to get it when it is
//! missing (the checkpoints the shipped specs name, by HuggingFace repository).

use std::path::Path;

/// HuggingFace repositories of the checkpoints the shipped specs use, by directory name.
const KNOWN_REPOS: &[(&str, &str)] = &[
    (
        "SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
    ),
    (
        "Qwen2.5-Coder-0.5B-Instruct",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
];

/// The directory holds a checkpoint `split` can read (config.json and safetensors);
/// otherwise the problem and how to get the checkpoint.
pub fn readable(dir: &Path) -> Result<(), String> {
    let problem = if !dir.is_dir() {
        "it does not exist".to_string()
    } else {
        match unfed_model::ModelConfig::from_dir(dir) {
            Err(e) => format!("{e:#}"),
            Ok(_) if !has_safetensors(dir) => "it holds no *.safetensors weights".to_string(),
            // A vision-language model's tiles come from its image processor settings.
            Ok(config) if config.vision.is_some() => {
                match unfed_node::client::image::ImageProcessorConfig::from_dir(dir) {
                    Ok(_) => return Ok(()),
                    Err(e) => format!("{e:#}"),
                }
            }
            Ok(_) => return Ok(()),
        }
    };
    Err(format!("{problem}; {}", how_to_get(dir)))
}

fn has_safetensors(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
    })
}

/// A download command for the checkpoint (run where there is network access, then copy
/// the directory here: nothing is downloaded at run time).
pub fn how_to_get(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let repo = KNOWN_REPOS
        .iter()
        .find(|(dir_name, _)| *dir_name == name)
        .map_or("OWNER/NAME", |(_, repo)| repo);
    let what = if repo == "OWNER/NAME" {
        "a HuggingFace checkpoint directory (config.json, *.safetensors, tokenizer.json)"
            .to_string()
    } else {
        format!("the HuggingFace repository {repo}")
    };
    format!(
        "it must hold {what}: download it on a machine with network access with \
         `huggingface-cli download {repo} --local-dir {}` (pip install huggingface_hub) and copy the directory here",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_shipped_checkpoint_names_its_repository_and_a_download_command() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("models/SmolVLM-256M-Instruct");
        let err = readable(&missing).unwrap_err();
        assert!(err.starts_with("it does not exist;"), "{err}");
        assert!(
            err.contains(&format!(
                "huggingface-cli download HuggingFaceTB/SmolVLM-256M-Instruct --local-dir {}",
                missing.display()
            )),
            "{err}"
        );
        // A directory without weights is no checkpoint either.
        std::fs::create_dir_all(&missing).unwrap();
        unfed_model::builtin::write_tiny(&missing).unwrap();
        assert_eq!(readable(&missing), Ok(()));
        for f in std::fs::read_dir(&missing).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(f).unwrap();
            }
        }
        assert!(readable(&missing).unwrap_err().contains("no *.safetensors"));
    }
}
