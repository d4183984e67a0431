//! The communication thread: runs every collective of the engine in submission order, so reductions
//! and stage-3 gathers overlap computation while all ranks still issue collectives in one order.
//!
//! The engine never calls the communicator directly once it has a worker: two threads calling it
//! concurrently could interleave collectives differently on different ranks.

use super::error::EngineError;
use crate::comm::Communicator;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(&dyn Communicator) + Send>;

/// A collective submitted to the worker; `wait` returns its result.
#[must_use = "a pending collective must be waited for"]
pub struct Pending<R> {
    rx: Receiver<R>,
}

impl<R> Pending<R> {
    /// A result that needs no communication (e.g. a reduction over one rank), already available.
    pub fn ready(value: R) -> Self {
        let (tx, rx) = sync_channel(1);
        let _ = tx.send(value);
        Self { rx }
    }

    /// Block until the collective has run and return its result; an error if the communication
    /// thread stopped before running it.
    pub fn wait(self) -> Result<R, EngineError> {
        self.rx.recv().map_err(|_| EngineError::Unsupported("the communication thread stopped".into()))
    }
}

/// Owns the communicator and the thread that uses it.
pub struct CommWorker {
    comm: Arc<dyn Communicator>,
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl CommWorker {
    /// Start the communication thread on `comm`. If no thread can be started, collectives run in
    /// place on the caller's thread, still in submission order.
    pub fn spawn(comm: Arc<dyn Communicator>) -> Self {
        let (tx, rx) = channel::<Job>();
        let worker_comm = comm.clone();
        let thread = std::thread::Builder::new()
            .name("comm".into())
            .spawn(move || {
                for job in rx {
                    job(worker_comm.as_ref());
                }
            })
            .ok();
        Self { comm, tx: Some(tx), thread }
    }

    /// This process's rank in the communicator.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The communicator itself, for set-up that must run on the caller's thread (NCCL's) while no
    /// collective is queued.
    pub(crate) fn communicator(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// Number of ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Queue `f` after every collective submitted before it.
    pub fn submit<R: Send + 'static>(&self, f: impl FnOnce(&dyn Communicator) -> R + Send + 'static) -> Pending<R> {
        let (tx, rx) = sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        match (&self.tx, &self.thread) {
            (Some(queue), Some(_)) => {
                let _ = queue.send(job);
            }
            // No thread could be started: run in place, still in submission order.
            _ => job(self.comm.as_ref()),
        }
        Pending { rx }
    }

    /// Submit and wait.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce(&dyn Communicator) -> R + Send + 'static) -> Result<R, EngineError> {
        self.submit(f).wait()
    }
}

impl Drop for CommWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
