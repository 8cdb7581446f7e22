//! Advisory lock keys: which `(namespace, key)` pair a job's lock uses.
//!
//! Postgres has two advisory keyspaces: one `bigint`, and pairs of `int4`. They
//! never collide with each other (`pg_locks.objsubid` is 1 for bigint locks and
//! 2 for pairs). sqlx's migrator and most applications use the bigint space, so
//! jobhost uses the pair space with a fixed namespace: a job's lock can never
//! be taken by accident by code that is not jobhost.
//!
//! The key is derived from the job name so that every host of a fleet agrees on
//! it without coordination: the first four bytes of SHA-256(name), big-endian,
//! as a signed `int4`. `lock-key` in `jobs.toml` overrides it (e.g. to keep a
//! key stable across a rename); config validation rejects two jobs on one key.

use sha2::{Digest, Sha256};

/// The first `int4` of every jobhost lock: the ASCII bytes `"jobh"`.
pub const LOCK_NAMESPACE: i32 = i32::from_be_bytes(*b"jobh");

/// A job's advisory lock identity in the two-int keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockKey {
    /// Always [`LOCK_NAMESPACE`].
    pub namespace: i32,
    /// Per job.
    pub key: i32,
}

impl LockKey {
    /// The key derived from a job name (see the module docs).
    pub fn derive(job_name: &str) -> Self {
        let digest = Sha256::digest(job_name.as_bytes());
        let key = i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        Self::explicit(key)
    }

    /// An explicitly configured key.
    pub fn explicit(key: i32) -> Self {
        Self {
            namespace: LOCK_NAMESPACE,
            key,
        }
    }
}

impl std::fmt::Display for LockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.namespace, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_key_is_stable_and_documented() {
        // Pinned: changing the derivation would let two host versions of one
        // fleet run the same job concurrently.
        // Literal values (first four bytes of SHA-256 of the name, signed
        // big-endian), computed outside this code.
        assert_eq!(LockKey::derive("integrity-hash-retry").key, -1_048_503_536);
        assert_eq!(LockKey::derive("a").key, -896_040_686);
        assert_eq!(LockKey::derive("b").key, 1_042_540_566);
        assert_eq!(LockKey::derive("b").namespace, 0x6a6f_6268);
        assert_eq!(LOCK_NAMESPACE, 0x6a6f_6268);
        assert_ne!(LockKey::derive("a"), LockKey::derive("b"));
    }
}
