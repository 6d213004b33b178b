//! The plan as Kubernetes objects. Everything here is in-cluster: a node is reached at
//! its StatefulSet pod's stable DNS name, files are container paths, secrets are
//! Secrets. Startup order is the plan's: every pod has one init container per step it
//! depends on (transitively), in wave order, each an `unfedctl wait` on that step.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, GRPCAction, HTTPGetAction, Namespace, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Secret, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use unfed_chain::PrivateKeySigner;
use unfed_node::net::pki::Ca;

use super::sizing::{KV_CACHE_MB, Sizes};
use super::{Document, Options};
use crate::launch::steps::Duty;
use crate::plan::{LaunchPlan, Step, StepKind};
use crate::spec::{ChainMode, LoadedSpec, MpcOutput};

/// Container paths.
pub const SPEC_DIR: &str = "/etc/unfed/spec";
pub const SPEC_FILE: &str = "/etc/unfed/spec/testnet.toml";
/// The shared data volume: model/ (a checkpoint you copy in), shards/ (the split Job's
/// output), run/ (the chain Job's state.json and markers).
pub const DATA: &str = "/data";
pub const MODEL_DIR: &str = "/data/model";
/// Created by you after copying a checkpoint in: the split Job waits for it.
pub const MODEL_COMPLETE: &str = "/data/model/.complete";
pub const SHARDS_DIR: &str = "/data/shards";
pub const RUN_DIR: &str = "/data/run";
pub const STATE_JSON: &str = "/data/run/state.json";
/// Written by the chain Job once every wallet is funded and staked.
pub const STAKED_MARKER: &str = "/data/run/fund-stake.done";
pub const CHAIN_KEYS_DIR: &str = "/etc/unfed/chain-keys";
const TLS_DIR: &str = "/etc/unfed/tls";
const KEYS_DIR: &str = "/etc/unfed/keys";
/// Per-pod writable state (share spools, SQLite files): an emptyDir.
const STATE_DIR: &str = "/var/lib/unfed";
/// Shared by a pod's init containers and its node: the chain env file.
const ENV_DIR: &str = "/run/unfed";
const CHAIN_ENV: &str = "/run/unfed/chain.env";

/// Every pod has its own IP, so one health port number serves them all.
const HEALTH_PORT: u16 = 8081;
const ANVIL_PORT: u16 = 8545;
/// Days the node certificates issued at render time are valid.
const NODE_CERT_DAYS: i64 = 90;
/// Owner-read only: the key checks refuse group/other bits. Kubelet makes Secret files
/// root-owned, so the containers run as root (with every capability dropped).
const SECRET_MODE: i32 = 0o400;
/// An init container gives up after this long; Kubernetes then restarts it with backoff.
const WAIT_TIMEOUT: &str = "600s";

pub struct Kube<'a> {
    loaded: &'a LoadedSpec,
    plan: &'a LaunchPlan,
    opts: &'a Options,
    ns: String,
    /// Step name → Kubernetes object name (a DNS label).
    names: BTreeMap<String, String>,
    ca: Ca,
    sizes: Sizes,
    pub docs: Vec<Document>,
}

/// `name` as a DNS-1035 label (a Service name): lowercase alphanumerics and '-',
/// starting with a letter; short enough that the pod name `<name>-0` is a label too.
pub fn dns_label(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "n-");
    }
    out.truncate(55);
    out.trim_matches('-').to_string()
}

fn s(v: &str) -> String {
    v.to_string()
}

fn quantity_mi(mebibytes: u64) -> Quantity {
    Quantity(format!("{mebibytes}Mi"))
}

/// One shell word: single-quoted, so nothing in it is expanded.
fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: s(name),
        secret: Some(SecretVolumeSource {
            secret_name: Some(s(secret)),
            default_mode: Some(SECRET_MODE),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: s(name),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: s(name),
        mount_path: s(path),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec![s("ALL")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(s(name)),
        container_port: i32::from(number),
        ..Default::default()
    }
}

/// The text of a key file for `signer`, exactly as `unfed_chain::write_key_file` writes it.
fn key_file_text(signer: &PrivateKeySigner) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("key");
    unfed_chain::write_key_file(&path, signer)?;
    Ok(std::fs::read_to_string(path)?)
}

/// The text of a key file the spec names, checked to hold a private key (mode 0600).
fn spec_key_text(loaded: &LoadedSpec, file: &str) -> anyhow::Result<String> {
    let path = loaded.resolve(file);
    unfed_chain::read_key_file(&path)
        .with_context(|| format!("the key file {file} named in {}", loaded.display_path))?;
    unfed_chain::keys::read_private_file(&path)
}

impl<'a> Kube<'a> {
    pub fn new(
        loaded: &'a LoadedSpec,
        plan: &'a LaunchPlan,
        opts: &'a Options,
    ) -> anyhow::Result<Self> {
        let ns = dns_label(&plan.name);
        if ns.is_empty() {
            bail!(
                "testnet name {:?} has no letter or digit to name a namespace; set [testnet] name",
                plan.name
            );
        }
        let mut names = BTreeMap::new();
        let mut taken = BTreeSet::new();
        for step in &plan.steps {
            let name = dns_label(&step.name);
            if !taken.insert(name.clone()) {
                bail!(
                    "two steps are named {name:?} in Kubernetes (names are lowercased, other characters become '-'); rename one with [[node]] name"
                );
            }
            names.insert(step.name.clone(), name);
        }
        Ok(Self {
            loaded,
            plan,
            opts,
            ns,
            names,
            ca: Ca::generate(&plan.name)?,
            sizes: Sizes::of(loaded, plan),
            docs: Vec::new(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn name(&self, step: &Step) -> &str {
        &self.names[&step.name]
    }

    fn push<T: serde::Serialize + k8s_openapi::Resource>(
        &mut self,
        name: &str,
        obj: &T,
    ) -> anyhow::Result<()> {
        let yaml = serde_yaml_ng::to_string(obj)?;
        self.docs.push(Document {
            file: format!(
                "{:03}-{}-{name}.yaml",
                self.docs.len(),
                T::KIND.to_ascii_lowercase()
            ),
            kind: T::KIND,
            yaml,
        });
        Ok(())
    }

    fn meta(&self, name: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(s(name)),
            namespace: Some(self.ns.clone()),
            labels: Some(self.labels(name, component)),
            ..Default::default()
        }
    }

    fn labels(&self, name: &str, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (s("app.kubernetes.io/name"), s("unfed")),
            (s("app.kubernetes.io/instance"), self.ns.clone()),
            (s("app.kubernetes.io/component"), s(component)),
            (s("unfed.dev/step"), s(name)),
        ])
    }

    fn selector(&self, name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (s("app.kubernetes.io/instance"), self.ns.clone()),
            (s("unfed.dev/step"), s(name)),
        ])
    }

    /// `<pod>.<service>.<namespace>.svc`: the stable name of a step's one pod.
    fn host(&self, step: &Step) -> String {
        let n = self.name(step);
        format!("{n}-0.{n}.{}.svc", self.ns)
    }

    /// Every name a node's certificate must carry.
    fn cert_hosts(&self, step: &Step) -> Vec<String> {
        let n = self.name(step);
        let pod = self.host(step);
        vec![
            pod.clone(),
            format!("{pod}.cluster.local"),
            format!("{n}-0.{n}"),
            format!("{n}.{}.svc", self.ns),
            format!("{n}.{}.svc.cluster.local", self.ns),
        ]
    }

    fn node_port(step: &Step) -> u16 {
        step.port.unwrap_or(match step.kind {
            StepKind::Web => 8080,
            _ => 50050,
        })
    }

    fn health_port(step: &Step) -> u16 {
        if Self::node_port(step) == HEALTH_PORT {
            HEALTH_PORT + 1
        } else {
            HEALTH_PORT
        }
    }

    fn addr(&self, step: &Step) -> String {
        format!("{}:{}", self.host(step), Self::node_port(step))
    }

    fn chain_rpc(&self) -> Option<String> {
        match self.loaded.spec.chain.mode {
            ChainMode::None => None,
            ChainMode::Anvil => Some(format!(
                "http://anvil.{}.svc:{}",
                self.ns,
                self.anvil_port()
            )),
            ChainMode::External => self.loaded.spec.chain.rpc_url.clone(),
        }
    }

    fn anvil_port(&self) -> u16 {
        self.plan
            .steps
            .iter()
            .find(|s| s.kind == StepKind::Anvil)
            .and_then(|s| s.port)
            .unwrap_or(ANVIL_PORT)
    }

    fn staked(&self) -> bool {
        self.loaded.spec.chain.mode != ChainMode::None
    }

    /// Every step `step` waits for, directly or not, in wave (then plan) order.
    pub fn dependencies(plan: &LaunchPlan, names: &[&str]) -> Vec<String> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut todo: Vec<&str> = names.to_vec();
        while let Some(n) = todo.pop() {
            if let Some(step) = plan.step(n) {
                for d in &step.after {
                    if seen.insert(d) {
                        todo.push(d);
                    }
                }
            }
        }
        for n in names {
            seen.remove(n);
        }
        plan.waves()
            .into_values()
            .flatten()
            .filter(|s| seen.contains(s.name.as_str()))
            .map(|s| s.name.clone())
            .collect()
    }

    fn wait_container(&self, dep: &Step) -> Container {
        let mut args = vec![s("wait")];
        match dep.kind {
            StepKind::Anvil => args.extend([
                s("--tcp"),
                format!("anvil.{}.svc:{}", self.ns, self.anvil_port()),
            ]),
            StepKind::Split => args.extend([s("--file"), format!("{SHARDS_DIR}/manifest.json")]),
            StepKind::Contracts => args.extend([
                s("--chain-state"),
                s(STATE_JSON),
                s("--env-file"),
                s(CHAIN_ENV),
            ]),
            StepKind::FundStake => args.extend([s("--file"), s(STAKED_MARKER)]),
            _ => args.extend([
                s("--grpc-health"),
                format!("{}:{}", self.host(dep), Self::health_port(dep)),
            ]),
        }
        args.extend([s("--timeout"), s(WAIT_TIMEOUT)]);
        Container {
            name: format!("wait-{}", self.name(dep)),
            image: Some(self.opts.image.clone()),
            command: Some(vec![s("unfedctl")]),
            args: Some(args),
            volume_mounts: Some(vec![
                mount("data", DATA, true),
                mount("run", ENV_DIR, false),
            ]),
            security_context: Some(hardened()),
            ..Default::default()
        }
    }

    fn init_containers(&self, steps: &[&str]) -> Vec<Container> {
        Self::dependencies(self.plan, steps)
            .iter()
            .filter_map(|d| self.plan.step(d))
            .map(|d| self.wait_container(d))
            .collect()
    }

    pub fn render(
        &mut self,
        cluster_spec: String,
        chain_keys: BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(self.ns.clone()),
                labels: Some(BTreeMap::from([
                    (s("app.kubernetes.io/name"), s("unfed")),
                    (s("app.kubernetes.io/instance"), self.ns.clone()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        self.push(&self.ns.clone(), &ns)?;
        let spec = ConfigMap {
            metadata: self.meta("spec", "spec"),
            data: Some(BTreeMap::from([(s("testnet.toml"), cluster_spec)])),
            ..Default::default()
        };
        self.push("spec", &spec)?;
        let has_chain_keys = !chain_keys.is_empty();
        if has_chain_keys {
            let secret = self.secret("chain-keys", "chain", chain_keys.into_iter().collect());
            self.push("chain-keys", &secret)?;
        }
        self.data_volume()?;
        if self.loaded.spec.chain.mode == ChainMode::Anvil {
            self.anvil()?;
        }
        self.split_job()?;
        if self.staked() {
            self.chain_job(has_chain_keys)?;
        }
        let plan = self.plan;
        for step in plan
            .steps
            .iter()
            .filter(|s| s.kind.is_process() && s.kind != StepKind::Anvil)
        {
            self.node(step)?;
        }
        Ok(())
    }

    fn secret(&self, name: &str, component: &str, data: Vec<(String, String)>) -> Secret {
        Secret {
            metadata: self.meta(name, component),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            type_: Some(s("Opaque")),
            ..Default::default()
        }
    }

    fn data_volume(&mut self) -> anyhow::Result<()> {
        let pvc = PersistentVolumeClaim {
            metadata: self.meta("data", "data"),
            spec: Some(PersistentVolumeClaimSpec {
                // Written by the Jobs, read by every node pod (read-only mounts).
                access_modes: Some(vec![s(self.opts.data_access.mode())]),
                storage_class_name: self.opts.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        s("storage"),
                        Quantity(self.opts.storage_size.clone()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.push("data", &pvc)
    }

    fn data_volumes(&self) -> Vec<Volume> {
        vec![
            Volume {
                name: s("data"),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: s("data"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: s("spec"),
                config_map: Some(ConfigMapVolumeSource {
                    name: s("spec"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            empty_dir("run"),
            empty_dir("tmp"),
        ]
    }

    fn anvil(&mut self) -> anyhow::Result<()> {
        let chain = &self.loaded.spec.chain;
        let port = self.anvil_port();
        // As `up` starts it: enough prefunded dev accounts for every wallet of the plan.
        let wallets = self
            .plan
            .steps
            .iter()
            .filter(|s| s.wallet.is_some())
            .count()
            + 2;
        let mut args = vec![
            s("--host"),
            s("0.0.0.0"),
            s("--port"),
            port.to_string(),
            s("--chain-id"),
            chain.chain_id.to_string(),
            s("--accounts"),
            wallets.max(10).to_string(),
        ];
        if chain.block_time > 0 {
            args.extend([s("--block-time"), chain.block_time.to_string()]);
        }
        let labels = self.labels("anvil", "anvil");
        let deployment = Deployment {
            metadata: self.meta("anvil", "anvil"),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(self.selector("anvil")),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: s("anvil"),
                            image: Some(self.opts.anvil_image.clone()),
                            command: Some(vec![s("anvil")]),
                            args: Some(args),
                            ports: Some(vec![container_port("rpc", port)]),
                            readiness_probe: Some(Probe {
                                tcp_socket: Some(TCPSocketAction {
                                    port: IntOrString::String(s("rpc")),
                                    ..Default::default()
                                }),
                                period_seconds: Some(2),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        self.push("anvil", &deployment)?;
        let service = Service {
            metadata: self.meta("anvil", "anvil"),
            spec: Some(ServiceSpec {
                selector: Some(self.selector("anvil")),
                ports: Some(vec![ServicePort {
                    name: Some(s("rpc")),
                    port: i32::from(port),
                    target_port: Some(IntOrString::String(s("rpc"))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.push("anvil", &service)
    }

    fn job(
        &self,
        name: &str,
        steps: &[&str],
        script: String,
        env: Vec<EnvVar>,
        extra: Vec<(Volume, VolumeMount)>,
    ) -> Job {
        let (volumes, mounts): (Vec<_>, Vec<_>) = extra.into_iter().unzip();
        let mut all_mounts = vec![
            mount("data", DATA, false),
            mount("spec", SPEC_DIR, true),
            mount("tmp", "/tmp", false),
        ];
        all_mounts.extend(mounts);
        let mut all_volumes = self.data_volumes();
        all_volumes.extend(volumes);
        Job {
            metadata: self.meta(name, name),
            spec: Some(JobSpec {
                backoff_limit: Some(6),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.labels(steps[0], name)),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some(s("OnFailure")),
                        init_containers: Some(self.init_containers(steps))
                            .filter(|c| !c.is_empty()),
                        containers: vec![Container {
                            name: s(name),
                            image: Some(self.opts.image.clone()),
                            command: Some(vec![s("/bin/sh"), s("-c"), script]),
                            env: Some(env).filter(|e| !e.is_empty()),
                            volume_mounts: Some(all_mounts),
                            security_context: Some(hardened()),
                            ..Default::default()
                        }],
                        volumes: Some(all_volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Splits the model onto the data volume once: a finished split (its manifest) is kept.
    fn split_job(&mut self) -> anyhow::Result<()> {
        let spec = &self.loaded.spec;
        let (wait_model, source) = match &spec.model.path {
            // You copy the checkpoint in (see the README); the Job waits for your marker.
            Some(_) => (
                format!("unfedctl wait --file {MODEL_COMPLETE} --timeout 24h && "),
                s(MODEL_DIR),
            ),
            None => (
                String::new(),
                spec.model
                    .source
                    .clone()
                    .unwrap_or_else(|| s(crate::spec::BUILTIN_TINY)),
            ),
        };
        let script = format!(
            "set -e; if [ -f {SHARDS_DIR}/manifest.json ]; then echo 'already split'; exit 0; fi; {wait_model}exec unfedctl split {} -o {SHARDS_DIR} --text-shards {} --vision-shards {}",
            sh_quote(&source),
            spec.model.text_shards,
            spec.model.vision_shards
        );
        let job = self.job("split", &["split"], script, vec![], vec![]);
        self.push("split", &job)
    }

    /// Deploys the contracts, funds and stakes every wallet (`unfedctl chain` verbs, which
    /// record state.json in the run directory on the data volume), then leaves a marker.
    fn chain_job(&mut self, has_keys: bool) -> anyhow::Result<()> {
        let rpc = match self.loaded.spec.chain.mode {
            ChainMode::Anvil => format!(
                " --rpc-url {}",
                sh_quote(&self.chain_rpc().unwrap_or_default())
            ),
            _ => String::new(),
        };
        let script = format!(
            "set -e; unfedctl chain deploy {SPEC_FILE}{rpc}; unfedctl chain fund {SPEC_FILE}; unfedctl chain stake {SPEC_FILE}; touch {STAKED_MARKER}"
        );
        let extra = if has_keys {
            vec![(
                secret_volume("chain-keys", "chain-keys"),
                mount("chain-keys", CHAIN_KEYS_DIR, true),
            )]
        } else {
            vec![]
        };
        let steps: Vec<&str> = self
            .plan
            .steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Contracts | StepKind::FundStake))
            .map(|s| s.name.as_str())
            .collect();
        let job = self.job("chain", &steps, script, vec![], extra);
        self.push("chain", &job)
    }

    /// The stake wallet of a node: its key file's text and address.
    fn wallet(&self, step: &Step) -> anyhow::Result<Option<(String, String)>> {
        let Some(index) = step.wallet else {
            return Ok(None);
        };
        let (signer, text) = match &step.eth_key {
            Some(path) => {
                let signer = unfed_chain::read_key_file(path)
                    .with_context(|| format!("the eth_key of {}", step.name))?;
                (signer, unfed_chain::keys::read_private_file(path)?)
            }
            None => {
                let signer = unfed_chain::dev_signer(index as u32)?;
                let text = key_file_text(&signer)?;
                (signer, text)
            }
        };
        Ok(Some((signer.address().to_string(), text)))
    }

    /// A duty key (settler, slasher): the spec's file, else its dev key on Anvil.
    fn duty(&self, duty: Duty, spec_key: &str) -> anyhow::Result<String> {
        if let Some(file) = self.loaded.spec.chain.key_file(spec_key) {
            return spec_key_text(self.loaded, file);
        }
        let index = crate::launch::steps::DEV_DUTY_WALLET + duty as u32;
        key_file_text(&unfed_chain::dev_signer(index)?)
    }

    fn client_key(&self) -> anyhow::Result<Option<String>> {
        let Some(index) = self.plan.client_wallet else {
            return Ok(None);
        };
        if let Some(file) = &self.loaded.spec.chain.client_key_file {
            return spec_key_text(self.loaded, file).map(Some);
        }
        Ok(Some(key_file_text(&unfed_chain::dev_signer(
            index as u32,
        )?)?))
    }

    fn daemons(&self) -> usize {
        self.plan
            .steps
            .iter()
            .filter(|s| s.kind == StepKind::Daemon)
            .count()
    }

    fn registry(&self) -> Option<&Step> {
        self.plan
            .steps
            .iter()
            .find(|s| s.kind == StepKind::Registry)
    }

    /// The node's `unfed-node` arguments (after the role), and whether it needs the
    /// contract addresses from the chain env file.
    fn node_args(
        &self,
        step: &Step,
        keys: &mut Vec<(String, String)>,
    ) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let spec = &self.loaded.spec;
        let port = Self::node_port(step);
        let mut a = vec![s("--host"), s("0.0.0.0"), s("--port"), port.to_string()];
        let registry = self.registry().map(|r| self.addr(r)).unwrap_or_default();
        let pays = self.staked() && self.daemons() > 0;
        let mut contracts = Vec::new();
        let identity =
            |a: &mut Vec<String>, keys: &mut Vec<(String, String)>| -> anyhow::Result<()> {
                match self.wallet(step)? {
                    Some((address, text)) => {
                        a.extend([s("--eth-address"), address]);
                        keys.push((s("wallet.key"), text));
                    }
                    None => a.extend([s("--node-id"), step.name.clone()]),
                }
                Ok(())
            };
        let prices = |a: &mut Vec<String>| {
            a.extend([
                s("--price-per-input-token"),
                spec.economics.price_per_input_token.to_string(),
                s("--price-per-output-token"),
                spec.economics.price_per_output_token.to_string(),
            ])
        };
        let heartbeat = [
            s("--heartbeat-secs"),
            spec.nodes.heartbeat_seconds.to_string(),
        ];
        let role = match step.kind {
            StepKind::Registry => {
                a.extend([s("--shards-dir"), s(SHARDS_DIR)]);
                a.extend(heartbeat);
                a.extend([
                    s("--daemon-required-count"),
                    self.daemons().to_string(),
                    s("--dispute-stage"),
                    spec.economics.he_dispute_rollout_stage.clone(),
                ]);
                if self.plan.steps.iter().any(|s| s.kind == StepKind::MpcA) {
                    a.extend([s("--require-mpc"), s("true")]);
                }
                if let Some(rpc) = self.chain_rpc() {
                    a.extend([s("--chain-rpc"), rpc]);
                    a.extend([s("--operator-key-file"), format!("{KEYS_DIR}/slasher.key")]);
                    a.extend([s("--state-db"), format!("{STATE_DIR}/registry-state.db")]);
                    keys.push((
                        s("slasher.key"),
                        self.duty(Duty::Slasher, "slasher_key_file")?,
                    ));
                    contracts.push(s("--escrow"));
                }
                "registry"
            }
            StepKind::Compute | StepKind::Vision => {
                let vision = step.kind == StepKind::Vision;
                a.extend([s("--advertise"), self.addr(step)]);
                a.extend([s("--shard-index"), step.shard.unwrap_or(0).to_string()]);
                if vision {
                    a.extend([s("--model-type"), s("smolvlm_vision")]);
                }
                a.extend([s("--shards-dir"), s(SHARDS_DIR), s("--registry"), registry]);
                a.extend(heartbeat);
                a.extend([s("--kv-cache-mb"), KV_CACHE_MB.to_string()]);
                if !vision {
                    a.extend([
                        s("--spot-check"),
                        spec.nodes.spot_check.to_string(),
                        s("--share-spool"),
                        format!("{STATE_DIR}/spool"),
                    ]);
                }
                if let Some(cheat) = &step.cheat {
                    a.extend([s("--cheat"), cheat.clone()]);
                    a.extend(
                        self.chain_rpc()
                            .map(|r| [s("--chain-rpc"), r])
                            .into_iter()
                            .flatten(),
                    );
                }
                if pays {
                    a.push(s("--require-voucher"));
                }
                identity(&mut a, keys)?;
                "compute"
            }
            StepKind::Daemon => {
                a.extend([s("--advertise"), self.addr(step), s("--registry"), registry]);
                a.extend([s("--db"), format!("{STATE_DIR}/chain.db")]);
                a.extend(heartbeat);
                a.extend([
                    s("--block-interval-secs"),
                    spec.daemon.block_interval_seconds.to_string(),
                    s("--settlement-blocks"),
                    spec.daemon.settlement_blocks.to_string(),
                ]);
                prices(&mut a);
                if let Some(rpc) = self.chain_rpc() {
                    a.extend([s("--chain-rpc"), rpc]);
                    a.extend([s("--operator-key-file"), format!("{KEYS_DIR}/settler.key")]);
                    keys.push((
                        s("settler.key"),
                        self.duty(Duty::Settler, "settler_key_file")?,
                    ));
                    contracts.extend([s("--escrow"), s("--token")]);
                }
                identity(&mut a, keys)?;
                "daemon"
            }
            StepKind::MpcA | StepKind::MpcB => {
                let is_a = step.kind == StepKind::MpcA;
                a.extend([s("--advertise"), self.addr(step)]);
                a.extend([s("--role"), s(if is_a { "A" } else { "B" })]);
                if is_a {
                    let b = self
                        .plan
                        .steps
                        .iter()
                        .find(|b| b.kind == StepKind::MpcB && b.shard == step.shard)
                        .context("an MPC party A without its B")?;
                    a.extend([s("--peer"), self.addr(b)]);
                }
                a.extend([s("--shards-dir"), s(SHARDS_DIR), s("--registry"), registry]);
                a.extend(heartbeat);
                a.extend([s("--share-spool"), format!("{STATE_DIR}/spool")]);
                if spec.mpc.output == MpcOutput::FullOutput2pc {
                    a.push(s("--full-output"));
                } else if let Some(layers) = &step.layers {
                    a.extend([s("--layers"), layers.len().to_string()]);
                }
                if pays {
                    a.push(s("--require-voucher"));
                }
                identity(&mut a, keys)?;
                "mpc"
            }
            StepKind::Web => {
                a.extend([s("--registry"), registry]);
                a.extend([
                    s("--db"),
                    format!("{STATE_DIR}/web.db"),
                    s("--public-cache"),
                    format!("{STATE_DIR}/public-cache"),
                ]);
                if spec.mpc.output == MpcOutput::DecodeClientSample {
                    a.push(s("--decode-client-sample"));
                }
                prices(&mut a);
                if spec.web.tls {
                    a.extend([
                        s("--https-cert"),
                        format!("{TLS_DIR}/https.crt"),
                        s("--https-key"),
                        format!("{TLS_DIR}/https.key"),
                    ]);
                }
                if let Some(rpc) = self.chain_rpc() {
                    a.extend([s("--chain-rpc"), rpc]);
                    contracts.extend([s("--escrow"), s("--token")]);
                    if let Some(text) = self.client_key()? {
                        // Demo sessions pay as the dev client, signing its vouchers.
                        a.extend([
                            s("--demo-wallet-key-file"),
                            format!("{KEYS_DIR}/client.key"),
                        ]);
                        keys.push((s("client.key"), text));
                    }
                }
                "web"
            }
            other => bail!("{other:?} is not a node"),
        };
        let mut args = vec![s(role)];
        args.extend(a);
        args.extend([s("--log-format"), spec.testnet.log_format.clone()]);
        args.extend([s("--tls-ca"), format!("{TLS_DIR}/ca.crt")]);
        if step.kind != StepKind::Web {
            args.extend([
                s("--tls-cert"),
                format!("{TLS_DIR}/tls.crt"),
                s("--tls-key"),
                format!("{TLS_DIR}/tls.key"),
                s("--health-port"),
                Self::health_port(step).to_string(),
            ]);
        }
        Ok((args, contracts))
    }

    /// A node step: its TLS and key Secrets, its headless Service and its StatefulSet.
    fn node(&mut self, step: &Step) -> anyhow::Result<()> {
        let name = self.name(step).to_string();
        let component = format!("{:?}", step.kind).to_ascii_lowercase();
        let mut keys = Vec::new();
        let (args, contracts) = self.node_args(step, &mut keys)?;

        // TLS: the CA certificate for every node, its own certificate for a server.
        let mut tls = vec![(s("ca.crt"), self.ca.cert_pem.clone())];
        if step.kind != StepKind::Web {
            let issued = self
                .ca
                .issue(&step.name, &self.cert_hosts(step), NODE_CERT_DAYS)?;
            tls.extend([
                (s("tls.crt"), issued.cert_pem),
                (s("tls.key"), issued.key_pem),
            ]);
        } else if self.loaded.spec.web.tls {
            let mut hosts = self.cert_hosts(step);
            hosts.extend([s("localhost"), s("127.0.0.1")]);
            let issued = self.ca.issue("web-https", &hosts, NODE_CERT_DAYS)?;
            tls.extend([
                (s("https.crt"), issued.cert_pem),
                (s("https.key"), issued.key_pem),
            ]);
        }
        let tls_secret = format!("{name}-tls");
        let secret = self.secret(&tls_secret, &component, tls);
        self.push(&tls_secret, &secret)?;
        let keys_secret = format!("{name}-keys");
        let has_keys = !keys.is_empty();
        if has_keys {
            let secret = self.secret(&keys_secret, &component, keys);
            self.push(&keys_secret, &secret)?;
        }

        let port = Self::node_port(step);
        let web = step.kind == StepKind::Web;
        let mut ports = vec![container_port(if web { "http" } else { "grpc" }, port)];
        let probe = if web {
            Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(s("/api/config")),
                    port: IntOrString::String(s("http")),
                    scheme: Some(s(if self.loaded.spec.web.tls {
                        "HTTPS"
                    } else {
                        "HTTP"
                    })),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                ..Default::default()
            }
        } else {
            ports.push(container_port("health", Self::health_port(step)));
            Probe {
                grpc: Some(GRPCAction {
                    port: i32::from(Self::health_port(step)),
                    service: None,
                }),
                period_seconds: Some(5),
                failure_threshold: Some(3),
                ..Default::default()
            }
        };
        let service_ports = ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.container_port,
                target_port: p.name.clone().map(IntOrString::String),
                ..Default::default()
            })
            .collect();

        let command = if contracts.is_empty() {
            let mut c = vec![s("unfed-node")];
            c.extend(args);
            c
        } else {
            // The contract addresses exist only once the chain Job has run: the init
            // container waiting for it wrote them to the env file this sources.
            let mut line = String::from("set -a; . ");
            line.push_str(CHAIN_ENV);
            line.push_str("; set +a; exec unfed-node");
            for arg in &args {
                line.push(' ');
                line.push_str(&sh_quote(arg));
            }
            for flag in &contracts {
                let var = if flag == "--escrow" {
                    "UNFED_ESCROW"
                } else {
                    "UNFED_TOKEN"
                };
                line.push_str(&format!(" {flag} \"${var}\""));
            }
            vec![s("/bin/sh"), s("-c"), line]
        };
        let estimate = self.sizes.estimate(self.plan, step);
        let mut env = Vec::new();
        let mut mounts = vec![
            mount("data", DATA, true),
            mount("run", ENV_DIR, true),
            mount("tmp", "/tmp", false),
            mount("state", STATE_DIR, false),
            mount("tls", TLS_DIR, true),
        ];
        // Nodes read no spec: everything they need is in their arguments.
        let mut volumes: Vec<Volume> = self
            .data_volumes()
            .into_iter()
            .filter(|v| v.name != "spec")
            .collect();
        volumes.extend([empty_dir("state"), secret_volume("tls", &tls_secret)]);
        if has_keys {
            mounts.push(mount("keys", KEYS_DIR, true));
            volumes.push(secret_volume("keys", &keys_secret));
            if step.wallet.is_some() {
                env.push(EnvVar {
                    name: s(unfed_chain::STAKE_KEY_FILE_ENV),
                    value: Some(format!("{KEYS_DIR}/wallet.key")),
                    ..Default::default()
                });
            }
        }
        let cpu = if matches!(
            step.kind,
            StepKind::Compute | StepKind::Vision | StepKind::MpcA | StepKind::MpcB
        ) {
            "500m"
        } else {
            "100m"
        };
        let container = Container {
            name: s("node"),
            image: Some(self.opts.image.clone()),
            command: Some(command),
            env: Some(env).filter(|e| !e.is_empty()),
            ports: Some(ports),
            readiness_probe: Some(probe),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    (s("cpu"), Quantity(s(cpu))),
                    (s("memory"), quantity_mi(estimate.mebibytes)),
                ])),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            security_context: Some(hardened()),
            ..Default::default()
        };
        let service = Service {
            metadata: self.meta(&name, &component),
            spec: Some(ServiceSpec {
                // Headless: each pod keeps a stable DNS name, the one in its certificate.
                cluster_ip: Some(s("None")),
                // A node must be dialled by name before it is ready: the registry checks
                // a registering node, and MPC party A dials B while both start.
                publish_not_ready_addresses: Some(true),
                selector: Some(self.selector(&name)),
                ports: Some(service_ports),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.push(&name, &service)?;
        let set = StatefulSet {
            metadata: self.meta(&name, &component),
            spec: Some(StatefulSetSpec {
                service_name: Some(name.clone()),
                replicas: Some(1),
                // Order comes from the init containers, not from pod creation.
                pod_management_policy: Some(s("Parallel")),
                selector: LabelSelector {
                    match_labels: Some(self.selector(&name)),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.labels(&name, &component)),
                        annotations: Some(BTreeMap::from([(
                            s("unfed.dev/memory-estimate"),
                            estimate.how,
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        init_containers: Some(self.init_containers(&[&step.name]))
                            .filter(|c| !c.is_empty()),
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        self.push(&name, &set)
    }
}

#[cfg(test)]
mod tests {
    use super::dns_label;

    #[test]
    fn names_become_service_names() {
        assert_eq!(dns_label("compute-0-r1"), "compute-0-r1");
        assert_eq!(dns_label("GPU_box.1"), "gpu-box-1");
        assert_eq!(dns_label("0gpu"), "n-0gpu");
        assert!(dns_label(&"x".repeat(80)).len() <= 55);
    }
}
