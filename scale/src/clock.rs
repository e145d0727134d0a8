//! Virtual time: a discrete-event loop over ordinary async code.
//!
//! Every task of the model runs on one local executor. When none of them
//! can go on, the clock jumps to the earliest timer and wakes what waits on
//! it, so a night of hours runs in seconds and its timings are exact and
//! repeatable.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::executor::{LocalPool, LocalSpawner};
use futures::task::LocalSpawnExt;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The model's clock; time starts at zero.
#[derive(Debug, Default)]
pub struct Clock {
    state: Mutex<Timers>,
}

#[derive(Debug, Default)]
struct Timers {
    now: Duration,
    next_id: u64,
    /// (when, id) of every timer armed, earliest first.
    due: BinaryHeap<Reverse<(Duration, u64)>>,
    /// The waker of each timer still armed.
    wakers: HashMap<u64, Waker>,
}

impl Clock {
    pub fn now(&self) -> Duration {
        lock(&self.state).now
    }

    /// A future that is ready once the clock reads `at`.
    pub fn sleep_until(self: &Arc<Self>, at: Duration) -> Sleep {
        Sleep {
            clock: Arc::clone(self),
            at,
            id: None,
        }
    }

    pub fn sleep(self: &Arc<Self>, span: Duration) -> Sleep {
        self.sleep_until(self.now() + span)
    }

    /// Moves to the earliest armed timer and wakes every timer due then.
    /// `false` when no timer is armed: nothing can ever happen again.
    fn advance(&self) -> bool {
        let mut timers = lock(&self.state);
        while let Some(Reverse((at, id))) = timers.due.pop() {
            let Some(waker) = timers.wakers.remove(&id) else {
                continue; // dropped before it was due
            };
            timers.now = timers.now.max(at);
            waker.wake();
            while let Some(Reverse((next, _))) = timers.due.peek() {
                if *next > timers.now {
                    break;
                }
                let Some(Reverse((_, id))) = timers.due.pop() else {
                    break;
                };
                if let Some(waker) = timers.wakers.remove(&id) {
                    waker.wake();
                }
            }
            return true;
        }
        false
    }
}

/// See [`Clock::sleep_until`].
#[derive(Debug)]
pub struct Sleep {
    clock: Arc<Clock>,
    at: Duration,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut timers = lock(&self.clock.state);
        if timers.now >= self.at {
            if let Some(id) = self.id {
                timers.wakers.remove(&id);
            }
            return Poll::Ready(());
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                timers.next_id += 1;
                let id = timers.next_id;
                timers.due.push(Reverse((self.at, id)));
                id
            }
        };
        timers.wakers.insert(id, cx.waker().clone());
        drop(timers);
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.clock.state).wakers.remove(&id);
        }
    }
}

/// Runs `main` (and whatever it spawns) to its end in virtual time.
/// `None` if every task waits and no timer is armed: a deadlock.
pub fn run<T: 'static>(
    clock: &Arc<Clock>,
    main: impl FnOnce(LocalSpawner) -> Pin<Box<dyn Future<Output = T>>>,
) -> Option<T> {
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let output = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&output);
    let task = main(spawner.clone());
    spawner
        .spawn_local(async move {
            let value = task.await;
            *lock(&slot) = Some(value);
        })
        .ok()?;
    loop {
        pool.run_until_stalled();
        if let Some(value) = lock(&output).take() {
            return Some(value);
        }
        if !clock.advance() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_order_at_their_time() {
        let clock = Arc::new(Clock::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (Arc::clone(&clock), Arc::clone(&seen));
        let end = run(&clock, move |spawner| {
            Box::pin(async move {
                for (name, ms) in [("b", 300), ("a", 100), ("c", 300)] {
                    let (c, s) = (Arc::clone(&c), Arc::clone(&s));
                    spawner
                        .spawn_local(async move {
                            c.sleep(Duration::from_millis(ms)).await;
                            lock(&s).push((name, c.now()));
                        })
                        .ok();
                }
                c.sleep(Duration::from_secs(1)).await;
                c.now()
            })
        });
        assert_eq!(end, Some(Duration::from_secs(1)));
        let ms = Duration::from_millis;
        assert_eq!(
            *lock(&seen),
            vec![("a", ms(100)), ("b", ms(300)), ("c", ms(300))]
        );
    }

    #[test]
    fn a_model_that_can_never_go_on_is_a_deadlock() {
        let clock = Arc::new(Clock::default());
        let end = run(&clock, |_| Box::pin(futures::future::pending::<()>()));
        assert_eq!(end, None);
    }
}
