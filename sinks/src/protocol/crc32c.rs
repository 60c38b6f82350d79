//! CRC-32C (Castagnoli), table-driven and `no_std`.
//!
//! The `crc32c` crate needs `std` for CPU feature detection, so the protocol
//! carries its own slice-by-8 implementation. Runs of zero bytes (holes) are
//! folded in O(log n) by multiplying the register by x^(8n) modulo the
//! polynomial, the method zlib's `crc32_combine` uses.

/// The CRC-32C polynomial 0x1EDC6F41 in reflected (LSB-first) form.
const POLYNOMIAL: u32 = 0x82F6_3B78;

/// Slice-by-8 lookup tables: `TABLES[k][b]` is the CRC register contribution of
/// byte `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = build_tables();

/// A zero run of up to 2^64 - 1 bytes is up to 2^67 bits, so x^(2^66) is the
/// largest power [`Crc32c::update_zeros`] needs.
const POWER_COUNT: usize = 67;

/// `POWERS[k]` is x^(2^k) modulo the polynomial, for folding zero runs.
static POWERS: [u32; POWER_COUNT] = build_powers();

const fn build_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLYNOMIAL
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][byte] = crc;
        byte += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut byte = 0;
        while byte < 256 {
            let previous = tables[k - 1][byte];
            tables[k][byte] = (previous >> 8) ^ tables[0][(previous & 0xFF) as usize];
            byte += 1;
        }
        k += 1;
    }
    tables
}

/// Multiplies two polynomials modulo [`POLYNOMIAL`], both in reflected form.
const fn multiply_mod(a: u32, mut b: u32) -> u32 {
    let mut mask = 1u32 << 31;
    let mut product = 0u32;
    while mask != 0 {
        if a & mask != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 {
            (b >> 1) ^ POLYNOMIAL
        } else {
            b >> 1
        };
        mask >>= 1;
    }
    product
}

const fn build_powers() -> [u32; POWER_COUNT] {
    let mut powers = [0u32; POWER_COUNT];
    // x^1 in reflected form is bit 30.
    let mut power = 1u32 << 30;
    let mut k = 0;
    while k < POWER_COUNT {
        powers[k] = power;
        power = multiply_mod(power, power);
        k += 1;
    }
    powers
}

/// A running CRC-32C over a stream of bytes and zero runs.
#[derive(Clone, Copy, Debug)]
pub struct Crc32c {
    /// The CRC register, pre-inverted as the algorithm requires.
    register: u32,
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// Creates the CRC of the empty input.
    pub const fn new() -> Self {
        Crc32c { register: !0 }
    }

    /// Appends `bytes` to the input.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut crc = self.register;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let low = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ crc;
            let high = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            crc = TABLES[7][(low & 0xFF) as usize]
                ^ TABLES[6][((low >> 8) & 0xFF) as usize]
                ^ TABLES[5][((low >> 16) & 0xFF) as usize]
                ^ TABLES[4][(low >> 24) as usize]
                ^ TABLES[3][(high & 0xFF) as usize]
                ^ TABLES[2][((high >> 8) & 0xFF) as usize]
                ^ TABLES[1][((high >> 16) & 0xFF) as usize]
                ^ TABLES[0][(high >> 24) as usize];
        }
        for &byte in chunks.remainder() {
            crc = (crc >> 8) ^ TABLES[0][((crc ^ byte as u32) & 0xFF) as usize];
        }
        self.register = crc;
    }

    /// Appends `length` zero bytes to the input in O(log `length`) time.
    pub fn update_zeros(&mut self, length: u64) {
        // Feeding a zero byte multiplies the register by x^8, so a run of n
        // zero bytes multiplies it by x^(8n) = product of x^(2^k) over the
        // set bits k of 8n. 8n can exceed 64 bits, so walk n from bit 3 up.
        let mut remaining = length;
        let mut k = 3;
        while remaining != 0 {
            if remaining & 1 != 0 {
                self.register = multiply_mod(POWERS[k], self.register);
            }
            remaining >>= 1;
            k += 1;
        }
    }

    /// Returns the CRC of everything appended so far.
    pub const fn value(&self) -> u32 {
        !self.register
    }
}

/// Returns the CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(bytes);
    crc.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time reference implementation.
    fn reference(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLYNOMIAL
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc_known_vectors() {
        // Check values from RFC 3720 (iSCSI), appendix B.4.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn crc_matches_reference() {
        let mut bytes = [0u8; 300];
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        for byte in bytes.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        for length in 0..bytes.len() {
            assert_eq!(crc32c(&bytes[..length]), reference(&bytes[..length]));
        }
    }

    #[test]
    fn crc_zero_run_matches_bytes() {
        let zeros = [0u8; 5000];
        for &(prefix, run) in &[(0usize, 1u64), (3, 7), (9, 4096), (1, 4999), (0, 0)] {
            let mut folded = Crc32c::new();
            folded.update(&b"abcdefghijk"[..prefix]);
            folded.update_zeros(run);
            let mut bytewise = Crc32c::new();
            bytewise.update(&b"abcdefghijk"[..prefix]);
            bytewise.update(&zeros[..run as usize]);
            assert_eq!(
                folded.value(),
                bytewise.value(),
                "prefix {prefix} run {run}"
            );
        }
    }

    #[test]
    fn crc_huge_zero_run_terminates() {
        let mut crc = Crc32c::new();
        crc.update_zeros(u64::MAX);
        // The value itself has no independent reference; the call must return.
        let _ = crc.value();
    }
}
