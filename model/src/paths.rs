//! File names read from JSON (indexes, manifests) must stay inside their directory.

use std::path::{Component, Path};

/// True for a non-empty relative path with only normal components: no `..`, no root,
/// no drive prefix.
pub fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::is_plain_relative;

    #[test]
    fn rejects_escapes() {
        assert!(is_plain_relative("text_shard_0.safetensors"));
        assert!(is_plain_relative("sub/x.safetensors"));
        assert!(!is_plain_relative("../x"));
        assert!(!is_plain_relative("a/../../x"));
        assert!(!is_plain_relative("/etc/passwd"));
        assert!(!is_plain_relative(""));
        assert!(!is_plain_relative("..\\x"));
    }
}
