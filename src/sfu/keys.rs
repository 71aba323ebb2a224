//! Typed keys into the worker's arenas, so a producer's key cannot be used where a
//! participant's is meant. Keys are slab indices: a key stays valid until its entry is removed,
//! and every map holding keys (by address, by id, per session) is updated in the same call that
//! removes the entry, so a key read from the worker's own maps always resolves. Keys that
//! outlive a turn in other places (timers, the dirty list) are looked up with `get` and skipped
//! when gone.

use std::marker::PhantomData;
use std::ops::{Index, IndexMut};

use slab::Slab;

/// A key into an [`Arena`].
pub(super) trait Key: Copy {
    fn from_index(i: usize) -> Self;
    fn index(self) -> usize;
}

macro_rules! keys {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(super) struct $name(usize);

        impl Key for $name {
            fn from_index(i: usize) -> Self {
                Self(i)
            }
            fn index(self) -> usize {
                self.0
            }
        }
    )*};
}

keys! {
    /// A peer connection (WebRTC transport).
    ConnKey;
    /// A participant joined on this worker.
    ParticipantKey;
    /// A producer, local or piped in.
    ProducerKey;
    /// A consumer.
    ConsumerKey;
}

/// A slab whose entries are reached by one kind of key.
pub(super) struct Arena<K, T> {
    slab: Slab<T>,
    _key: PhantomData<K>,
}

impl<K: Key, T> Default for Arena<K, T> {
    fn default() -> Self {
        Self {
            slab: Slab::new(),
            _key: PhantomData,
        }
    }
}

impl<K: Key, T> Arena<K, T> {
    pub(super) fn insert(&mut self, value: T) -> K {
        K::from_index(self.slab.insert(value))
    }

    /// Removes an entry. Panics when `key` is stale: callers remove what they just looked up.
    pub(super) fn remove(&mut self, key: K) -> T {
        self.slab.remove(key.index())
    }

    pub(super) fn get(&self, key: K) -> Option<&T> {
        self.slab.get(key.index())
    }

    pub(super) fn get_mut(&mut self, key: K) -> Option<&mut T> {
        self.slab.get_mut(key.index())
    }

    pub(super) fn contains(&self, key: K) -> bool {
        self.slab.contains(key.index())
    }

    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (K, &T)> {
        self.slab.iter().map(|(i, v)| (K::from_index(i), v))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (K, &mut T)> {
        self.slab.iter_mut().map(|(i, v)| (K::from_index(i), v))
    }
}

/// Indexing is for keys the worker's own maps just gave: a missing entry is a broken
/// invariant (see the module doc), so it panics like a slab would.
impl<K: Key, T> Index<K> for Arena<K, T> {
    type Output = T;
    fn index(&self, key: K) -> &T {
        &self.slab[key.index()]
    }
}

impl<K: Key, T> IndexMut<K> for Arena<K, T> {
    fn index_mut(&mut self, key: K) -> &mut T {
        &mut self.slab[key.index()]
    }
}
