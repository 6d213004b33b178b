//! `unfedctl render SPEC --target kubernetes --image IMAGE -o DIR`: the launch plan as
//! deployment manifests, one YAML file per object, applied in file-name order by
//! `kubectl apply -f DIR`. Key material (a CA and a certificate per node) is generated
//! afresh at every render and written only into Secret files (mode 0600).

pub mod kube;
pub mod sizing;
pub mod wait;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::plan::LaunchPlan;
use crate::spec::LoadedSpec;

/// Where manifests are deployed.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Target {
    Kubernetes,
}

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
    pub spec: Option<PathBuf>,
    /// What to render for.
    #[arg(long, value_enum)]
    pub target: Target,
    /// The container image holding `unfedctl` and `unfed-node` (built from the
    /// Dockerfile at the repository root).
    #[arg(long)]
    pub image: Option<String>,
    /// Directory to write the manifests to (created; must be empty if it exists).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Image running Anvil (chain.mode = "anvil") with `anvil` on PATH. Default: --image
    /// (the Dockerfile puts Anvil in it).
    #[arg(long)]
    pub anvil_image: Option<String>,
    /// StorageClass of the shared data volume (it must offer --data-access); default:
    /// the cluster's default class.
    #[arg(long)]
    pub storage_class: Option<String>,
    /// Size of the shared data volume (checkpoint + shards + chain state).
    #[arg(long, default_value = "20Gi")]
    pub storage_size: String,
    /// Access mode of the shared data volume.
    #[arg(long, value_enum, default_value = "read-write-many")]
    pub data_access: DataAccess,
}

/// How the shared data volume may be mounted.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DataAccess {
    /// Pods on any machine (the Jobs write, every node reads): needs an RWX class (NFS,
    /// CephFS, a cloud file store).
    ReadWriteMany,
    /// Every pod on one machine (kind, minikube, a single-node k3s): any class works.
    ReadWriteOnce,
}

impl DataAccess {
    pub fn mode(self) -> &'static str {
        match self {
            DataAccess::ReadWriteMany => "ReadWriteMany",
            DataAccess::ReadWriteOnce => "ReadWriteOnce",
        }
    }
}

/// What a render needs besides the spec and plan.
#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    pub anvil_image: String,
    pub storage_class: Option<String>,
    pub storage_size: String,
    pub data_access: DataAccess,
}

/// One rendered object.
pub struct Document {
    pub file: String,
    pub kind: &'static str,
    pub yaml: String,
}

pub fn run(args: RenderArgs) -> anyhow::Result<ExitCode> {
    let Target::Kubernetes = args.target;
    let image = args.image.clone().filter(|i| !i.trim().is_empty()).context(
        "--image is required with --target kubernetes: the image holding unfedctl and unfed-node, \
         built from the Dockerfile at the repository root (`docker build -t REGISTRY/unfed:TAG .`, \
         then push it); pass --image REGISTRY/unfed:TAG",
    )?;
    check_output_dir(&args.output)?;
    let loaded = crate::spec::load(args.spec.as_deref())?;
    let plan = LaunchPlan::build(&loaded, crate::plan::model_facts(&loaded))?;
    let opts = Options {
        anvil_image: args.anvil_image.unwrap_or_else(|| image.clone()),
        image,
        storage_class: args.storage_class,
        storage_size: args.storage_size,
        data_access: args.data_access,
    };
    let (namespace, docs) = render(&loaded, &plan, &opts)?;
    write(&args.output, &docs)?;
    println!(
        "wrote {} manifests for testnet '{}' to {} (namespace {namespace})",
        docs.len(),
        plan.name,
        args.output.display()
    );
    println!(
        "apply them with: kubectl apply -f {}",
        args.output.display()
    );
    if !plan.hosts.is_empty() {
        // Pods are placed by the scheduler; node affinity is for the cluster's operator.
        println!(
            "note: the spec's [[host]] placement is not rendered: Kubernetes schedules the pods"
        );
    }
    if loaded.spec.model.path.is_some() {
        println!(
            "then copy the checkpoint into the split Job's pod (see README, \"On Kubernetes\")"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The output directory is created; an existing one must be empty, so that no stale
/// manifest of an earlier render is applied with the new ones.
fn check_output_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => bail!(
            "-o {}: that is a file, not a directory; pass a new directory path for the manifests",
            dir.display()
        ),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir)
                .with_context(|| format!("reading the output directory {}", dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "-o {}: the directory is not empty; pass a new directory (or remove this one) so that no stale manifest is applied",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("-o {}", dir.display())),
    }
}

/// Renders the plan; returns the namespace and the objects in apply order.
pub fn render(
    loaded: &LoadedSpec,
    plan: &LaunchPlan,
    opts: &Options,
) -> anyhow::Result<(String, Vec<Document>)> {
    if !loaded.spec.testnet.tls {
        bail!(
            "{}: testnet.tls = false is for loopback only, and pods talk over the cluster network; remove `tls = false` from [testnet]",
            loaded.display_path
        );
    }
    let (cluster_spec, chain_keys) = cluster_spec(loaded, plan)?;
    let mut kube = kube::Kube::new(loaded, plan, opts)?;
    kube.render(cluster_spec, chain_keys)?;
    Ok((kube.namespace().to_string(), kube.docs))
}

/// Writes one file per object; Secrets with mode 0600 (they hold private keys).
pub fn write(dir: &Path, docs: &[Document]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for doc in docs {
        let path = dir.join(&doc.file);
        if doc.kind == "Secret" {
            unfed_chain::keys::create_private_file(&path, doc.yaml.as_bytes())
        } else {
            std::fs::write(&path, &doc.yaml)
        }
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The spec as the in-cluster Jobs read it (ConfigMap `spec`): the same file with its
/// name fixed, the run directory and the model on the data volume, and key files the
/// spec names moved to the `chain-keys` Secret's mount (their contents returned, for
/// that Secret; the ConfigMap holds only paths).
fn cluster_spec(
    loaded: &LoadedSpec,
    plan: &LaunchPlan,
) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let mut doc: toml_edit::DocumentMut = loaded
        .source
        .parse()
        .with_context(|| format!("re-reading {}", loaded.display_path))?;
    doc["testnet"]["name"] = toml_edit::value(plan.name.clone());
    doc["testnet"]["run_dir"] = toml_edit::value(kube::RUN_DIR);
    if loaded.spec.model.path.is_some() {
        doc["model"]["path"] = toml_edit::value(kube::MODEL_DIR);
    }
    let mut keys = BTreeMap::new();
    let mut move_key =
        |item: &mut toml_edit::Item, file: &str, name: String| -> anyhow::Result<()> {
            let text = unfed_chain::keys::read_private_file(&loaded.resolve(file))
                .with_context(|| format!("the key file {file} named in {}", loaded.display_path))?;
            *item = toml_edit::value(format!("{}/{name}", kube::CHAIN_KEYS_DIR));
            keys.insert(name, text);
            Ok(())
        };
    for key in crate::spec::CHAIN_KEY_FILES {
        if let Some(file) = loaded.spec.chain.key_file(key) {
            let duty = key.trim_end_matches("_key_file");
            move_key(&mut doc["chain"][key], file, format!("{duty}.key"))?;
        }
    }
    for (i, node) in loaded.spec.node_overrides.iter().enumerate() {
        if let Some(file) = &node.eth_key {
            move_key(
                &mut doc["node"][i]["eth_key"],
                file,
                format!("node-{i}.key"),
            )?;
        }
    }
    let header = format!(
        "# {} as the in-cluster Jobs read it (unfedctl render): run_dir and model.path are\n# on the data volume; key files are in the chain-keys Secret.\n",
        loaded.display_path
    );
    Ok((header + &doc.to_string(), keys))
}
