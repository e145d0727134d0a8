//! One worker process per emulated EC2 instance: when the dispatcher's
//! fleet request makes an instance `running`, a worker starts for it with
//! its own metadata endpoint; when the process ends, the instance ends too.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use tokio::process::{Child, Command};

use super::imds::MetadataEndpoint;

struct Worker {
    child: Child,
    metadata: MetadataEndpoint,
}

/// What the control endpoint and the status command see.
#[derive(Default)]
pub struct Registry {
    interrupt: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
}

impl Registry {
    /// Announces a spot interruption to one instance; `false` if unknown.
    pub fn interrupt(&self, instance_id: &str) -> bool {
        let flags = self
            .interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        flags
            .get(instance_id)
            .map(|flag| flag.store(true, Ordering::SeqCst))
            .is_some()
    }

    pub fn running(&self) -> Vec<String> {
        let flags = self
            .interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        flags.keys().cloned().collect()
    }

    fn set(&self, instance_id: &str, flag: Option<Arc<std::sync::atomic::AtomicBool>>) {
        let mut flags = self
            .interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match flag {
            Some(flag) => flags.insert(instance_id.to_owned(), flag),
            None => flags.remove(instance_id),
        };
    }
}

pub struct Supervisor {
    pub ec2: Client,
    pub worker_bin: PathBuf,
    pub env: BTreeMap<String, String>,
    pub dir: PathBuf,
    pub registry: Arc<Registry>,
}

impl Supervisor {
    /// Runs until `stop` turns true, then stops every worker (SIGTERM, as
    /// systemd would) and waits for them.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let _ = std::fs::create_dir_all(&self.dir);
        loop {
            match self.running_instances().await {
                Ok(running) => {
                    let new: Vec<String> = running.difference(&seen).cloned().collect();
                    for id in new {
                        seen.insert(id.clone());
                        match self.start(&id).await {
                            Ok(worker) => {
                                tracing::info!(instance_id = %id, pid = worker.child.id(), "worker started");
                                workers.insert(id, worker);
                            }
                            Err(error) => {
                                tracing::error!(instance_id = %id, %error, "could not start a worker")
                            }
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "could not list instances"),
            }
            self.reap(&mut workers).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => break,
            }
        }
        for (id, worker) in &mut workers {
            if let Some(pid) = worker.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            tracing::info!(instance_id = %id, "stopping worker");
        }
        for (_, mut worker) in workers {
            if tokio::time::timeout(Duration::from_secs(15), worker.child.wait())
                .await
                .is_err()
            {
                let _ = worker.child.kill().await;
            }
            worker.metadata.abort();
        }
    }

    async fn running_instances(&self) -> Result<BTreeSet<String>, aws_sdk_ec2::Error> {
        let output = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:nightshift:role")
                    .values("worker")
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .send()
            .await?;
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running))
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect())
    }

    async fn start(&self, instance_id: &str) -> std::io::Result<Worker> {
        let metadata = MetadataEndpoint::start(instance_id).await?;
        let log = std::fs::File::create(self.dir.join(format!("{instance_id}.log")))?;
        let child = Command::new(&self.worker_bin)
            .envs(&self.env)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &metadata.url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        if let Some(pid) = child.id() {
            std::fs::write(self.dir.join(format!("{instance_id}.pid")), pid.to_string())?;
        }
        self.registry
            .set(instance_id, Some(metadata.interrupted.clone()));
        Ok(Worker { child, metadata })
    }

    /// A worker process that ended leaves an instance with nothing on it:
    /// as on EC2, where the instance and its process end together, it is
    /// terminated (workers that stop themselves have done so already).
    async fn reap(&self, workers: &mut HashMap<String, Worker>) {
        let mut ended = Vec::new();
        for (id, worker) in workers.iter_mut() {
            if let Ok(Some(status)) = worker.child.try_wait() {
                tracing::info!(instance_id = %id, %status, "worker exited");
                ended.push(id.clone());
            }
        }
        for id in ended {
            if let Some(worker) = workers.remove(&id) {
                worker.metadata.abort();
            }
            self.registry.set(&id, None);
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.pid")));
            if let Err(error) = self
                .ec2
                .terminate_instances()
                .instance_ids(&id)
                .send()
                .await
            {
                tracing::warn!(instance_id = %id, %error, "could not terminate the instance");
            }
        }
    }
}
