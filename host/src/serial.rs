//! Room-serialized plugin calls: for routes with `serialize = "room"`, the calls of one plugin
//! for one room run one at a time, in the order they asked, across versions of the plugin. A
//! fair (FIFO) async mutex per (plugin id, room), created on first use and dropped when no call
//! holds or waits for it.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

type Key = (String, String);

/// The turn-takers of every serialized (plugin, room) pair of a host.
#[derive(Debug, Default)]
pub struct RoomLocks {
    locks: DashMap<Key, Arc<Mutex<()>>>,
}

/// One call's turn: while it lives, no other call of the same plugin for the same room runs.
#[derive(Debug)]
pub struct Turn<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    key: Key,
    locks: &'a RoomLocks,
}

impl RoomLocks {
    /// Waits for the turn of a call of plugin `plugin` for `room`, behind the calls that asked
    /// before it.
    pub async fn turn(&self, plugin: &str, room: &str) -> Turn<'_> {
        let key = (plugin.to_owned(), room.to_owned());
        // Cloned under the map's shard lock, so that `Turn::drop` never removes a mutex someone
        // holds or waits for.
        let lock = self.locks.entry(key.clone()).or_default().clone();
        let guard = lock.lock_owned().await;
        Turn {
            guard: Some(guard),
            key,
            locks: self,
        }
    }

    /// The (plugin, room) pairs with a call running or waiting.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // Release first, then forget the mutex if nobody else holds a reference to it.
        drop(self.guard.take());
        self.locks
            .locks
            .remove_if(&self.key, |_, lock| Arc::strong_count(lock) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::RoomLocks;

    #[tokio::test]
    async fn turns_are_taken_in_order_and_the_lock_is_dropped_when_unused() {
        let locks = RoomLocks::default();
        let first = locks.turn("editor", "doc:a").await;
        // Another room, or another plugin, is not blocked.
        drop(locks.turn("editor", "doc:b").await);
        drop(locks.turn("chat", "doc:a").await);
        let order = std::sync::Mutex::new(Vec::new());
        let second = async {
            let _t = locks.turn("editor", "doc:a").await;
            order.lock().unwrap().push(2);
        };
        let third = async {
            tokio::task::yield_now().await;
            let _t = locks.turn("editor", "doc:a").await;
            order.lock().unwrap().push(3);
        };
        let release = async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            order.lock().unwrap().push(1);
            drop(first);
        };
        tokio::join!(second, third, release);
        assert_eq!(*order.lock().unwrap(), [1, 2, 3]);
        assert!(locks.is_empty());
    }
}
