//! The session's wait, on rust-vmm's event-manager: epoll over the fds that
//! say something happened.
//!
//! - the event queue's eventfd, which every [`crate::event::EventSender`]
//!   signals after it queues a [`crate::event::VmEvent`];
//! - a timerfd, armed while GHES records wait for the guest's
//!   acknowledgement, so that the session looks at the sources again;
//! - the run's deadline, as the epoll timeout.
//!
//! The session takes events from the queue first and waits only when it is
//! empty; a send that lands between the two has already signalled the
//! eventfd, so no wake-up is lost.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// Errors setting up or running the loop.
#[derive(Debug, Error)]
pub enum Error {
    /// epoll failed.
    #[error("The session's event loop failed")]
    EventManager(#[source] event_manager::Error),
    /// The GHES timer cannot be created or armed.
    #[error("Cannot arm the GHES acknowledgement timer")]
    Timer(#[source] std::io::Error),
}

/// The queue's eventfd: drained when it fires.
struct QueueWatch {
    wake: Arc<EventFd>,
}

impl MutEventSubscriber for QueueWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading resets the counter; the events themselves are in the queue.
        let _ = self.wake.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&*self.wake, EventSet::IN));
    }
}

/// The GHES acknowledgement timer.
struct GhesTimer {
    timer: TimerFd,
    fired: bool,
}

impl MutEventSubscriber for GhesTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.fired = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// Something was queued (or may have been: look).
    Queue,
    /// The GHES timer fired.
    Ghes,
    /// Neither, within the timeout.
    Timeout,
}

/// The session's event loop.
pub struct EventLoop {
    manager: EventManager<Rc<RefCell<dyn MutEventSubscriber>>>,
    ghes: Rc<RefCell<GhesTimer>>,
}

impl EventLoop {
    /// A loop over the queue whose sends signal `wake`.
    pub fn new(wake: Arc<EventFd>) -> Result<Self, Error> {
        let mut manager: EventManager<Rc<RefCell<dyn MutEventSubscriber>>> =
            EventManager::new().map_err(Error::EventManager)?;
        let ghes = Rc::new(RefCell::new(GhesTimer {
            timer: TimerFd::new().map_err(|e| Error::Timer(e.into()))?,
            fired: false,
        }));
        manager.add_subscriber(Rc::new(RefCell::new(QueueWatch { wake })));
        manager.add_subscriber(ghes.clone());
        Ok(Self { manager, ghes })
    }

    /// Fires the GHES timer once after `after` (re-arming moves it).
    pub fn arm_ghes(&mut self, after: Duration) -> Result<(), Error> {
        self.ghes
            .borrow_mut()
            .timer
            .reset(after, None)
            .map_err(|e| Error::Timer(e.into()))
    }

    /// Waits at most `timeout` for the queue or the GHES timer.
    pub fn wait(&mut self, timeout: Duration) -> Result<Woke, Error> {
        // epoll's timeout is in whole milliseconds: round up, so a wait
        // never ends before its time and spins.
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let n = self
            .manager
            .run_with_timeout(ms)
            .map_err(Error::EventManager)?;
        let fired = std::mem::take(&mut self.ghes.borrow_mut().fired);
        Ok(match (n, fired) {
            (0, _) => Woke::Timeout,
            (_, true) => Woke::Ghes,
            _ => Woke::Queue,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use super::*;
    use crate::event::{queue, VmEvent};

    #[test]
    fn a_send_wakes_the_loop_and_a_quiet_queue_times_out() {
        let (tx, rx) = queue().unwrap();
        let mut l = EventLoop::new(rx.wake_fd()).unwrap();
        let t = Instant::now();
        assert_eq!(l.wait(Duration::from_millis(30)).unwrap(), Woke::Timeout);
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(VmEvent::Reset).unwrap();
            tx
        });
        assert_eq!(l.wait(Duration::from_secs(10)).unwrap(), Woke::Queue);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
        // Drained: the next wait times out again.
        assert_eq!(l.wait(Duration::from_millis(10)).unwrap(), Woke::Timeout);
        // A send before the wait is not lost.
        let tx = sender.join().unwrap();
        tx.send(VmEvent::PowerOff).unwrap();
        assert_eq!(l.wait(Duration::from_secs(10)).unwrap(), Woke::Queue);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::PowerOff)));
    }

    #[test]
    fn the_ghes_timer_fires_once() {
        let (_tx, rx) = queue().unwrap();
        let mut l = EventLoop::new(rx.wake_fd()).unwrap();
        l.arm_ghes(Duration::from_millis(5)).unwrap();
        assert_eq!(l.wait(Duration::from_secs(10)).unwrap(), Woke::Ghes);
        assert_eq!(l.wait(Duration::from_millis(20)).unwrap(), Woke::Timeout);
    }
}
