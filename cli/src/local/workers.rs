//! One worker process per emulated EC2 instance: when the dispatcher's
//! fleet request makes an instance `running`, a worker starts for it with
//! its own metadata endpoint. What follows the worker's exit is what the
//! worker's systemd unit says (restart it, or power the instance off, which
//! the launch template's shutdown behaviour turns into termination), and
//! an instance terminated from outside stops its worker, as on EC2.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use tokio::process::{Child, Command};

use super::imds::MetadataEndpoint;
use super::unit::{AfterExit, Unit};

struct Worker {
    /// The process, while one runs.
    child: Option<Child>,
    metadata: MetadataEndpoint,
    starts: Vec<Instant>,
    restart_at: Option<Instant>,
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
    /// The worker's whole environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// The role of the instances' profile, whose credentials their
    /// metadata serves.
    pub role: String,
    pub dir: PathBuf,
    pub registry: Arc<Registry>,
    /// The worker's systemd unit.
    pub unit: Unit,
    /// The launch template's `InstanceInitiatedShutdownBehavior`.
    pub shutdown_behavior: String,
}

impl Supervisor {
    /// Runs until `stop` turns true, then stops every worker (SIGTERM, as
    /// systemd would) and waits for them.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        let _ = std::fs::create_dir_all(&self.dir);
        loop {
            match self.running_instances().await {
                Ok(running) => {
                    for (id, (run_id, instance_type)) in &running {
                        if seen.insert(id.clone()) {
                            match self.start(id, instance_type, run_id.as_deref()).await {
                                Ok(worker) => {
                                    workers.insert(id.clone(), worker);
                                }
                                Err(error) => {
                                    tracing::error!(instance_id = %id, %error, "could not start a worker")
                                }
                            }
                        }
                    }
                    self.stop_terminated(&mut workers, &running);
                }
                Err(error) => tracing::warn!(%error, "could not list instances"),
            }
            self.follow_unit(&mut workers).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => break,
            }
        }
        for worker in workers.values_mut() {
            signal_term(worker.child.as_ref());
        }
        for (_, mut worker) in workers {
            if let Some(mut child) = worker.child.take()
                && tokio::time::timeout(Duration::from_secs(15), child.wait())
                    .await
                    .is_err()
            {
                let _ = child.kill().await;
            }
            worker.metadata.abort();
        }
    }

    /// Each running worker instance: its run and its type.
    async fn running_instances(
        &self,
    ) -> Result<HashMap<String, (Option<String>, String)>, aws_sdk_ec2::Error> {
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
            .filter_map(|i| {
                let run = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(nightshift_core::aws::ec2::RUN_TAG))
                    .and_then(|t| t.value().map(str::to_owned));
                let instance_type = i.instance_type()?.as_str().to_owned();
                Some((i.instance_id()?.to_owned(), (run, instance_type)))
            })
            .collect())
    }

    async fn start(
        &self,
        instance_id: &str,
        instance_type: &str,
        run_id: Option<&str>,
    ) -> std::io::Result<Worker> {
        let metadata =
            MetadataEndpoint::start(instance_id, instance_type, run_id, &self.role).await?;
        self.registry
            .set(instance_id, Some(metadata.interrupted.clone()));
        let mut worker = Worker {
            child: None,
            metadata,
            starts: Vec::new(),
            restart_at: None,
        };
        self.spawn(instance_id, &mut worker)?;
        Ok(worker)
    }

    fn spawn(&self, instance_id: &str, worker: &mut Worker) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{instance_id}.log")))?;
        let child = Command::new(&self.worker_bin)
            .env_clear()
            .envs(&self.env)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &worker.metadata.url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        if let Some(pid) = child.id() {
            std::fs::write(self.dir.join(format!("{instance_id}.pid")), pid.to_string())?;
        }
        tracing::info!(instance_id, pid = child.id(), "worker started");
        worker.child = Some(child);
        worker.starts.push(Instant::now());
        worker.restart_at = None;
        Ok(())
    }

    /// An instance terminated from outside (the dispatcher, a spot
    /// reclaim) stops its worker, as EC2's shutdown would.
    fn stop_terminated(
        &self,
        workers: &mut HashMap<String, Worker>,
        running: &HashMap<String, (Option<String>, String)>,
    ) {
        let gone: Vec<String> = workers
            .keys()
            .filter(|id| !running.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(worker) = workers.remove(&id) {
                tracing::info!(instance_id = %id, "instance terminated; its worker is stopped");
                signal_term(worker.child.as_ref());
                worker.metadata.abort();
                self.registry.set(&id, None);
                // The process finishes handing back on its own; kill_on_drop
                // is only for a hung one.
                if let Some(mut child) = worker.child {
                    tokio::spawn(async move {
                        if tokio::time::timeout(Duration::from_secs(20), child.wait())
                            .await
                            .is_err()
                        {
                            let _ = child.kill().await;
                        }
                    });
                }
            }
        }
    }

    /// Does what the unit says after each worker exit, and the restarts it
    /// scheduled.
    async fn follow_unit(&self, workers: &mut HashMap<String, Worker>) {
        let now = Instant::now();
        let mut powered_off = Vec::new();
        for (id, worker) in workers.iter_mut() {
            if worker.restart_at.is_some_and(|at| at <= now) {
                if let Err(error) = self.spawn(id, worker) {
                    tracing::error!(instance_id = %id, %error, "could not restart the worker");
                }
                continue;
            }
            let Some(child) = worker.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            worker.child = None;
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.pid")));
            match self.unit.after_exit(status.success(), &worker.starts, now) {
                AfterExit::Restart { after } => {
                    tracing::warn!(instance_id = %id, %status, "worker failed; the unit restarts it");
                    worker.restart_at = Some(now + after);
                }
                AfterExit::PowerOff { because } => {
                    tracing::info!(instance_id = %id, %status, cause = because, "instance powered off");
                    powered_off.push(id.clone());
                }
                AfterExit::Nothing => {
                    tracing::warn!(instance_id = %id, %status, "worker exited; its unit leaves the instance up");
                }
            }
        }
        for id in powered_off {
            if let Some(worker) = workers.remove(&id) {
                worker.metadata.abort();
            }
            self.registry.set(&id, None);
            self.power_off(&id).await;
        }
    }

    /// A shutdown from inside: the launch template decides whether the
    /// instance stops or terminates.
    async fn power_off(&self, instance_id: &str) {
        let result = if self.shutdown_behavior == "terminate" {
            self.ec2
                .terminate_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map(drop)
                .map_err(aws_sdk_ec2::Error::from)
        } else {
            self.ec2
                .stop_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map(drop)
                .map_err(aws_sdk_ec2::Error::from)
        };
        if let Err(error) = result {
            tracing::warn!(instance_id, %error, "could not power the instance off");
        }
    }
}

fn signal_term(child: Option<&Child>) {
    if let Some(pid) = child.and_then(Child::id) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
