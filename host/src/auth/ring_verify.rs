//! Token signatures (HS256, RS256, ES256) verified with ring, the library that already serves
//! TLS here: the RustCrypto backend of `jsonwebtoken` spends about 150 µs of CPU on one RS256
//! verification, ring a fraction of it (docs/benchmarks.md, "Connection setup with tokens").
//! Signing, and any other algorithm, stay with the RustCrypto backend.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, rust_crypto};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{Error as SignatureError, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::{hmac, signature};

/// Makes ring verify tokens in this process. Harmless when a provider was already chosen (the
/// RustCrypto one, if a token was handled before): verification is the same, only slower.
pub(super) fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| CryptoProvider {
        verifier_factory: new_verifier,
        ..rust_crypto::DEFAULT_PROVIDER.clone()
    });
    let _ = provider.install_default();
}

enum Key {
    Hmac(hmac::Key),
    /// PKCS#1 `RSAPublicKey` DER (from PEM).
    RsaDer(Vec<u8>),
    /// Modulus and exponent, big-endian (from a JWK).
    RsaParts {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed P-256 point.
    EcPoint(Vec<u8>),
}

struct RingVerifier {
    alg: Algorithm,
    key: Key,
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let family = |f: AlgorithmFamily| {
        if key.family() == f {
            Ok(())
        } else {
            Err(ErrorKind::InvalidKeyFormat)
        }
    };
    let key = match (alg, key.kind()) {
        (Algorithm::HS256, _) => {
            family(AlgorithmFamily::Hmac)?;
            Key::Hmac(hmac::Key::new(
                hmac::HMAC_SHA256,
                key.try_get_hmac_secret()?,
            ))
        }
        (Algorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
            family(AlgorithmFamily::Rsa)?;
            Key::RsaDer(der.clone())
        }
        (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            family(AlgorithmFamily::Rsa)?;
            Key::RsaParts {
                n: n.clone(),
                e: e.clone(),
            }
        }
        (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
            family(AlgorithmFamily::Ec)?;
            Key::EcPoint(point.clone())
        }
        _ => return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key),
    };
    Ok(Box::new(RingVerifier { alg: *alg, key }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        let outcome = match &self.key {
            Key::Hmac(key) => hmac::verify(key, msg, sig),
            Key::RsaDer(der) => {
                signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
                    .verify(msg, sig)
            }
            Key::RsaParts { n, e } => signature::RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                msg,
                sig,
            ),
            Key::EcPoint(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
            }
        };
        outcome.map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/auth");
        std::fs::read(dir.join(name)).expect("a test key")
    }

    /// Signs with the RustCrypto backend, verifies with ring: the signature, then a flipped one.
    fn check(alg: Algorithm, signing: &EncodingKey, verifying: &DecodingKey) {
        let token =
            jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({"sub": "x"}), signing)
                .expect("signing");
        let (message, sig_b64) = token.rsplit_once('.').unwrap();
        let mut sig = base64_decode(sig_b64);
        let verifier = new_verifier(&alg, verifying).expect("a ring verifier");
        assert!(verifier.verify(message.as_bytes(), &sig).is_ok(), "{alg:?}");
        sig[5] ^= 1;
        assert!(
            verifier.verify(message.as_bytes(), &sig).is_err(),
            "{alg:?}"
        );
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in text.bytes() {
            let v = ALPHABET.iter().position(|a| *a == c).expect("base64url") as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }

    #[test]
    fn ring_verifies_what_the_rustcrypto_backend_signs() {
        check(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"secret"),
            &DecodingKey::from_secret(b"secret"),
        );
        let rsa = EncodingKey::from_rsa_pem(&fixture("rs256-private.pem")).unwrap();
        check(
            Algorithm::RS256,
            &rsa,
            &DecodingKey::from_rsa_pem(&fixture("rs256-public.pem")).unwrap(),
        );
        let ec = EncodingKey::from_ec_pem(&fixture("es256-private.pem")).unwrap();
        check(
            Algorithm::ES256,
            &ec,
            &DecodingKey::from_ec_pem(&fixture("es256-public.pem")).unwrap(),
        );
        // The same keys as JWKs (modulus and exponent; x and y).
        let set: JwkSet = serde_json::from_slice(&fixture("jwks.json")).unwrap();
        let jwk =
            |kid: &str| DecodingKey::from_jwk(set.find(kid).expect("the kid")).expect("a key");
        check(Algorithm::RS256, &rsa, &jwk("rsa-1"));
        check(Algorithm::ES256, &ec, &jwk("ec-1"));
        // A key of another family is refused.
        assert!(new_verifier(&Algorithm::RS256, &DecodingKey::from_secret(b"s")).is_err());
    }
}
