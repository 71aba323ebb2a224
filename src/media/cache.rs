//! A fixed-size ring of recent packets indexed by RTP sequence number, kept once per producer
//! stream so that retransmissions to any number of consumers are served from one copy.

/// Recent items by 16-bit sequence number. Capacity is fixed at construction; inserting never
/// allocates.
pub struct PacketCache<T> {
    slots: Vec<Option<(u16, T)>>,
    mask: usize,
}

impl<T> PacketCache<T> {
    /// A cache holding the last `capacity` sequence numbers (rounded up to a power of two).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.clamp(1, 1 << 15).next_power_of_two();
        Self {
            slots: (0..cap).map(|_| None).collect(),
            mask: cap - 1,
        }
    }

    pub fn insert(&mut self, seq: u16, item: T) {
        self.slots[seq as usize & self.mask] = Some((seq, item));
    }

    /// The item stored under exactly `seq`, if it has not been overwritten.
    pub fn get(&self, seq: u16) -> Option<&T> {
        match &self.slots[seq as usize & self.mask] {
            Some((s, item)) if *s == seq => Some(item),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_packets_are_found_and_overwritten_ones_are_not() {
        let mut c = PacketCache::new(4);
        for seq in 65534u16..=65535 {
            c.insert(seq, seq as u32);
        }
        for seq in 0u16..3 {
            c.insert(seq, seq as u32);
        }
        assert_eq!(c.get(1), Some(&1));
        assert_eq!(c.get(65535), Some(&65535));
        assert_eq!(c.get(65534), None, "overwritten by seq 2");
        assert_eq!(c.get(7), None);
    }
}
