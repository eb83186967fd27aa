//! What a connection passes before HTTP: TLS ([`tls`]). Who may upgrade is decided by
//! [`crate::auth`].

pub mod tls;
