//! Which partition of the customer-id space a customer belongs to, as `crm.v1.PartitionFilter`
//! defines it for every client: bytes 8 to 15 of the id, big-endian, modulo the partition
//! count. Customer ids are UUIDv7, whose last 8 bytes are random, so partitions come out even.

use uuid::Uuid;

/// Most partitions a filter may name.
pub const MAX_PARTITIONS: u32 = 4096;

/// The partition of `customer_id` among `count` (at least 1).
pub fn of(customer_id: &Uuid, count: u32) -> u32 {
    let bytes = customer_id.as_bytes();
    let tail = u64::from_be_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]);
    // Less than `count`, so it fits in a u32.
    (tail % u64::from(count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_is_the_ids_last_eight_bytes_modulo_the_count() {
        let id = Uuid::parse_str("0190f2a4-1b2c-7d3e-8f40-000000000105").unwrap();
        // 0x8f40_0000_0000_0105 = 10322726153207513349.
        assert_eq!(of(&id, 64), (10_322_726_153_207_513_349u64 % 64) as u32);
        assert_eq!(of(&id, 1), 0);
        assert_eq!(of(&id, 0), 0, "a zero count is read as one partition");
    }

    #[test]
    fn time_ordered_ids_spread_evenly() {
        let mut counts = [0u32; 16];
        for _ in 0..16_000 {
            counts[of(&Uuid::now_v7(), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }
}
