//! The keys tokens are verified with, loaded once at start: an HS256 secret, one public key in
//! PEM (RS256 or ES256 by its type), or a JWKS file whose keys a token names by `kid`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::{KeySource, TokenError};

/// Why the configured keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("the HS256 secret is empty")]
    EmptySecret,
}

/// Loaded verification keys.
#[derive(Debug)]
pub(super) enum Keys {
    One {
        alg: Algorithm,
        key: DecodingKey,
    },
    /// By `kid`.
    Set(HashMap<String, (Algorithm, DecodingKey)>),
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl Keys {
    pub(super) fn load(source: &KeySource) -> Result<Keys, KeyError> {
        match source {
            KeySource::Hs256Secret(secret) => Keys::secret(secret),
            KeySource::Hs256SecretFile(path) => {
                let mut secret = read(path)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                Keys::secret(&secret)
            }
            KeySource::PublicKeyPem(path) => {
                let pem = read(path)?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    return Ok(Keys::One {
                        alg: Algorithm::RS256,
                        key,
                    });
                }
                if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    return Ok(Keys::One {
                        alg: Algorithm::ES256,
                        key,
                    });
                }
                Err(invalid(
                    path,
                    "not an RSA or P-256 public key in PEM (-----BEGIN PUBLIC KEY-----)",
                ))
            }
            KeySource::Jwks(path) => {
                let text = read(path)?;
                let set: JwkSet = serde_json::from_slice(&text)
                    .map_err(|e| invalid(path, format!("not a JWKS document: {e}")))?;
                let mut keys = HashMap::new();
                for jwk in &set.keys {
                    let Some(kid) = jwk.common.key_id.clone() else {
                        return Err(invalid(path, "every key needs a `kid`"));
                    };
                    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => {
                            Algorithm::RS256
                        }
                        (
                            AlgorithmParameters::EllipticCurve(p),
                            None | Some(KeyAlgorithm::ES256),
                        ) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
                        _ => {
                            return Err(invalid(
                                path,
                                format!(
                                    "key `{kid}`: only RSA (RS256) and P-256 (ES256) keys are accepted"
                                ),
                            ));
                        }
                    };
                    let key = DecodingKey::from_jwk(jwk)
                        .map_err(|e| invalid(path, format!("key `{kid}`: {e}")))?;
                    if keys.insert(kid.clone(), (alg, key)).is_some() {
                        return Err(invalid(path, format!("key `{kid}` appears twice")));
                    }
                }
                if keys.is_empty() {
                    return Err(invalid(path, "the key set is empty"));
                }
                Ok(Keys::Set(keys))
            }
        }
    }

    fn secret(secret: &[u8]) -> Result<Keys, KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        Ok(Keys::One {
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        })
    }

    /// The key for a token signed with `alg`, naming `kid`.
    pub(super) fn find(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<(Algorithm, &DecodingKey), TokenError> {
        let (key_alg, key) = match self {
            Keys::One { alg, key } => (*alg, key),
            Keys::Set(keys) => {
                let kid = kid.ok_or_else(|| {
                    TokenError::BadSignature("the token names no key (`kid`)".into())
                })?;
                let (alg, key) = keys.get(kid).ok_or_else(|| {
                    let shown: String = kid.chars().take(64).collect();
                    TokenError::BadSignature(format!("no key `{}`", shown.escape_debug()))
                })?;
                (*alg, key)
            }
        };
        if alg != key_alg {
            return Err(TokenError::BadSignature(format!(
                "signed with {alg:?}, the key is for {key_alg:?}"
            )));
        }
        Ok((key_alg, key))
    }

    /// What is configured, for the start-up log.
    pub(super) fn describe(&self) -> String {
        match self {
            Keys::One { alg, .. } => format!("{alg:?}"),
            Keys::Set(keys) => {
                let mut kids: Vec<String> = keys
                    .iter()
                    .map(|(kid, (alg, _))| format!("{kid} ({alg:?})"))
                    .collect();
                kids.sort();
                format!("JWKS: {}", kids.join(", "))
            }
        }
    }
}
