//! How `up` runs a node role: `unfedctl node ROLE ...` (the roles are linked into this
//! binary, so a sibling `unfed-node` can never be stale), or `$UNFED_NODE_BIN ROLE ...`.

use std::path::PathBuf;
use std::process::Command;

pub const NODE_BIN_ENV: &str = "UNFED_NODE_BIN";

#[derive(Debug, Clone)]
pub struct NodeCommand {
    program: PathBuf,
    /// Arguments before the role (`node` when re-executing unfedctl).
    prefix: Vec<String>,
}

impl NodeCommand {
    pub fn locate() -> anyhow::Result<Self> {
        if let Some(bin) = std::env::var_os(NODE_BIN_ENV) {
            return Ok(Self {
                program: bin.into(),
                prefix: Vec::new(),
            });
        }
        let me = std::env::current_exe()?;
        let sibling = me.with_file_name("unfed-node");
        if sibling.is_file() {
            return Ok(Self {
                program: sibling,
                prefix: Vec::new(),
            });
        }
        Ok(Self {
            program: me,
            prefix: vec!["node".into()],
        })
    }

    pub fn role(&self, role: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix).arg(role);
        cmd
    }
}
