//! The key a client sends: `hf_live_<id>_<secret>`.
//!
//! - `hf_live_` says what the string is (secret scanners and people can
//!   recognise a leaked key by it);
//! - `<id>`, 12 characters of base32 (`a-z`, `2-7`), is public: it names the
//!   key in lists, logs and `holdfast key revoke`, and is how a request finds
//!   its row;
//! - `<secret>`, 40 characters of base62 (`0-9`, `A-Z`, `a-z`), carries 238
//!   bits from the operating system's random source.
//!
//! Only the SHA-256 of the whole key is stored. A slow password hash (bcrypt,
//! Argon2) protects guessable passwords; a key of 238 random bits cannot be
//! guessed from its hash, so one fast hash per request is enough.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every key starts with.
pub const PREFIX: &str = "hf_live_";
/// Characters of a key's public id.
pub const ID_CHARS: usize = 12;
/// Characters of a key's secret part.
pub const SECRET_CHARS: usize = 40;
/// Characters of a whole key.
pub const KEY_CHARS: usize = PREFIX.len() + ID_CHARS + 1 + SECRET_CHARS;

const ID_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const SECRET_ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The SHA-256 of a whole key: what the database keeps.
pub type KeyHash = [u8; 32];

/// A newly made key: its public id and the whole key (shown once).
pub struct NewToken {
    pub id: String,
    pub key: String,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewToken({PREFIX}{}_***)", self.id)
    }
}

/// The operating system gave no random bytes.
#[derive(Debug, thiserror::Error)]
#[error("no random bytes from the operating system: {0}")]
pub struct NoRandomness(getrandom::Error);

/// A new random key.
pub fn generate() -> Result<NewToken, NoRandomness> {
    let id = random_chars(ID_ALPHABET, ID_CHARS)?;
    let secret = random_chars(SECRET_ALPHABET, SECRET_CHARS)?;
    let key = format!("{PREFIX}{id}_{secret}");
    Ok(NewToken { id, key })
}

/// `n` characters drawn uniformly from `alphabet` (rejection sampling: a byte
/// past the last whole multiple of the alphabet's size is drawn again).
fn random_chars(alphabet: &[u8], n: usize) -> Result<String, NoRandomness> {
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(n);
    let mut bytes = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut bytes).map_err(NoRandomness)?;
        for &b in &bytes {
            if (b as usize) < limit && out.len() < n {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

/// The public id of `key` if it has the shape of a key, else `None` (such a
/// string is refused without a database look-up).
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != ID_CHARS + 1 + SECRET_CHARS {
        return None;
    }
    let (id, secret) = rest.split_at(ID_CHARS);
    let secret = secret.strip_prefix('_')?;
    let id_ok = id.bytes().all(|b| ID_ALPHABET.contains(&b));
    let secret_ok = secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some(id)
}

/// Whether `id` has the shape of a key's public id.
pub fn is_key_id(id: &str) -> bool {
    id.len() == ID_CHARS && id.bytes().all(|b| ID_ALPHABET.contains(&b))
}

/// The SHA-256 of a whole key.
pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `key` hashes to `stored`, compared in constant time.
pub fn matches(key: &str, stored: &[u8]) -> bool {
    hash(key).ct_eq(stored).into()
}

/// Constant-time equality of two secrets of any lengths: both are hashed to
/// a fixed length first, so neither content nor length shows in the timing.
pub fn same_secret(a: &str, b: &str) -> bool {
    hash(a).ct_eq(&hash(b)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let t = generate().unwrap();
        assert_eq!(t.key.len(), KEY_CHARS);
        assert!(t.key.starts_with("hf_live_"));
        assert_eq!(key_id(&t.key), Some(t.id.as_str()));
        assert!(is_key_id(&t.id));
        assert!(!format!("{t:?}").contains(&t.key[PREFIX.len() + ID_CHARS + 1..]));
        let other = generate().unwrap();
        assert_ne!(t.key, other.key);
        assert_ne!(t.id, other.id);
    }

    #[test]
    fn malformed_keys_have_no_id() {
        let t = generate().unwrap();
        for bad in [
            "",
            "hf_live_",
            &t.key[..t.key.len() - 1],
            &format!("{}x", t.key),
            &t.key.replace("hf_live_", "hf_test_"),
            &t.key.replacen('_', "-", 3),
            &format!("hf_live_ABCDEFGHIJKL_{}", &t.key[21..]),
            &format!("{}!", &t.key[..t.key.len() - 1]),
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn hashes_match_only_their_key() {
        let t = generate().unwrap();
        let stored = hash(&t.key);
        assert!(matches(&t.key, &stored));
        let mut wrong = t.key.clone();
        wrong.pop();
        wrong.push(if t.key.ends_with('a') { 'b' } else { 'a' });
        assert!(!matches(&wrong, &stored));
        assert!(!matches(&t.key, &stored[..31]));
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3cre"));
    }

    #[test]
    fn characters_are_spread_over_the_whole_alphabet() {
        let s = random_chars(SECRET_ALPHABET, 6200).unwrap();
        for &c in SECRET_ALPHABET {
            let n = s.bytes().filter(|&b| b == c).count();
            assert!((40..=170).contains(&n), "{} drawn {n} times", c as char);
        }
    }
}
