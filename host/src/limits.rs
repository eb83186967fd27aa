//! Message rate limits: a token bucket per connection and one per identity (governor), and the
//! rule that closes a connection that keeps sending at more than twice its limit. Connection
//! limits: in all, per IP address and per identity, counted before an upgrade.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How fast a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Messages per second, sustained (per connection and per identity).
    pub per_second: NonZeroU32,
    /// Messages that may come at once after a quiet spell.
    pub burst: NonZeroU32,
    /// How long a connection may keep sending at more than twice its limit before it is closed
    /// (1008).
    pub close_after: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: NonZeroU32::new(100).expect("not zero"),
            burst: NonZeroU32::new(200).expect("not zero"),
            close_after: Duration::from_secs(5),
        }
    }
}

impl RateLimit {
    /// The token bucket of this limit.
    fn quota(&self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// What to do with a client's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Handle it.
    Yes,
    /// Refuse it with `rate_limited`.
    Limited,
    /// Refuse it and close the connection: it kept sending at more than twice its limit.
    Close,
}

/// The limits of one connection.
#[derive(Debug)]
pub struct ConnectionRate {
    limit: RateLimit,
    within: DefaultDirectRateLimiter,
    /// The messages `within` refuses, counted against the limit once more: past it, the
    /// connection sends at more than twice its limit (at a rate R it refuses R - limit a second;
    /// after a quiet spell, a burst of twice the burst gets there), and that counts towards
    /// closing. Only refused messages are counted, so that an admitted one takes a single check.
    refused: DefaultDirectRateLimiter,
    /// Since when the connection has been past twice its limit, and when it last was.
    over: Option<(Instant, Instant)>,
    /// The identity the connection speaks for and its bucket's key, hashed once (a resume may
    /// change the identity).
    identity: Option<(Arc<str>, u64)>,
}

impl ConnectionRate {
    pub fn new(limit: RateLimit) -> ConnectionRate {
        ConnectionRate {
            limit,
            within: RateLimiter::direct(limit.quota()),
            refused: RateLimiter::direct(limit.quota()),
            over: None,
            identity: None,
        }
    }

    /// Counts one message of this connection (and of its identity, in `identities`).
    pub fn admit(&mut self, identities: &IdentityRates, identity: &Arc<str>) -> Admit {
        let own = self.within.check().is_ok();
        let past_double = !own && self.refused.check().is_err();
        let within = own && identities.admit(self.key(identities, identity));
        if !past_double {
            // A second within twice the limit forgives what came before.
            if self
                .over
                .is_some_and(|(_, last)| last.elapsed() >= Duration::from_secs(1))
            {
                self.over = None;
            }
            return if within { Admit::Yes } else { Admit::Limited };
        }
        let now = Instant::now();
        let since = match self.over {
            Some((since, last)) if now.duration_since(last) < Duration::from_secs(1) => since,
            _ => now,
        };
        self.over = Some((since, now));
        if now.duration_since(since) >= self.limit.close_after {
            Admit::Close
        } else {
            Admit::Limited
        }
    }

    /// The key of `identity`'s bucket in `identities`.
    fn key(&mut self, identities: &IdentityRates, identity: &Arc<str>) -> u64 {
        match &self.identity {
            Some((known, key)) if Arc::ptr_eq(known, identity) => *key,
            _ => {
                let key = identities.key(identity);
                self.identity = Some((identity.clone(), key));
                key
            }
        }
    }
}

/// The limits of every identity (several connections may share one). Identities are keyed by
/// a 64-bit digest (foldhash, seeded per host): two identities share a bucket with a probability
/// of about one in 10^19 per pair.
#[derive(Debug)]
pub struct IdentityRates {
    /// Keyed by the digest, in a map hashed with foldhash too (the default SipHash would hash
    /// the digest again at several times the cost).
    limiter: DefaultKeyedRateLimiter<
        u64,
        governor::middleware::NoOpMiddleware<
            <governor::clock::DefaultClock as governor::clock::Clock>::Instant,
        >,
        foldhash::fast::RandomState,
    >,
    digest: foldhash::fast::RandomState,
}

impl IdentityRates {
    pub fn new(limit: RateLimit) -> IdentityRates {
        IdentityRates {
            limiter: RateLimiter::dashmap_with_hasher(
                limit.quota(),
                foldhash::fast::RandomState::default(),
            ),
            digest: foldhash::fast::RandomState::default(),
        }
    }

    /// The key of `identity`'s bucket.
    fn key(&self, identity: &str) -> u64 {
        self.digest.hash_one(identity)
    }

    fn admit(&self, key: u64) -> bool {
        self.limiter.check_key(&key).is_ok()
    }

    /// Forgets identities whose buckets are full again (called now and then).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

/// How many connections the host takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In all; past it an upgrade gets 503.
    pub total: usize,
    /// From one IP address; past it an upgrade gets 429.
    pub per_ip: usize,
    /// Of one identity; past it an upgrade gets 429.
    pub per_identity: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            total: 100_000,
            per_ip: 1_000,
            per_identity: 50,
        }
    }
}

/// Which connection limit an upgrade would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Total,
    Ip,
    Identity,
}

/// The connections of the host, counted in all, by IP address and by identity.
#[derive(Debug, Default)]
pub struct Connections {
    total: AtomicUsize,
    by_ip: DashMap<IpAddr, usize>,
    by_identity: DashMap<Arc<str>, usize>,
}

/// One connection's place in the counts, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Connections>,
    ip: IpAddr,
    identity: Arc<str>,
}

impl Connections {
    /// Counts a connection from `ip` of `identity`, or says which limit it would pass.
    pub fn admit(
        self: &Arc<Self>,
        limits: &ConnectionLimits,
        ip: IpAddr,
        identity: &Arc<str>,
    ) -> Result<Slot, Over> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= limits.total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Over::Total);
        }
        if !count_in(&self.by_ip, ip, limits.per_ip) {
            self.release(None, None);
            return Err(Over::Ip);
        }
        if !count_in(&self.by_identity, identity.clone(), limits.per_identity) {
            self.release(Some(ip), None);
            return Err(Over::Identity);
        }
        Ok(Slot {
            owner: self.clone(),
            ip,
            identity: identity.clone(),
        })
    }

    /// Gives back the total's place and the IP's and the identity's, if counted.
    fn release(&self, ip: Option<IpAddr>, identity: Option<&Arc<str>>) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = ip {
            self.by_ip.remove_if_mut(&ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
        if let Some(identity) = identity {
            self.by_identity.remove_if_mut(identity, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// How many connections are counted.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// Counts one more under `key` unless it has `limit` already.
fn count_in<K: std::hash::Hash + Eq>(map: &DashMap<K, usize>, key: K, limit: usize) -> bool {
    let mut count = map.entry(key).or_insert(0);
    if *count >= limit {
        return false;
    }
    *count += 1;
    true
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.release(Some(self.ip), Some(&self.identity));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            close_after: Duration::ZERO,
        }
    }

    #[test]
    fn a_burst_passes_then_messages_are_limited_and_a_flood_closes() {
        let limit = limit(1, 3);
        let identities = IdentityRates::new(RateLimit {
            burst: NonZeroU32::new(100).unwrap(),
            ..limit
        });
        let who: Arc<str> = "ada".into();
        let mut conn = ConnectionRate::new(limit);
        for _ in 0..3 {
            assert_eq!(conn.admit(&identities, &who), Admit::Yes);
        }
        // Past the burst: limited; past twice the burst: closed (no grace here).
        let mut verdicts = Vec::new();
        for _ in 0..4 {
            verdicts.push(conn.admit(&identities, &who));
        }
        assert_eq!(verdicts[..3], [Admit::Limited; 3]);
        assert_eq!(verdicts[3], Admit::Close);
    }

    #[test]
    fn connections_are_counted_in_all_by_ip_and_by_identity_and_given_back() {
        let limits = ConnectionLimits {
            total: 3,
            per_ip: 2,
            per_identity: 1,
        };
        let c = Arc::new(Connections::default());
        let (here, there): (IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let (ada, bob, cy): (Arc<str>, Arc<str>, Arc<str>) =
            ("ada".into(), "bob".into(), "cy".into());
        let a = c.admit(&limits, here, &ada).unwrap();
        assert_eq!(c.admit(&limits, there, &ada).unwrap_err(), Over::Identity);
        let b = c.admit(&limits, here, &bob).unwrap();
        assert_eq!(c.admit(&limits, here, &cy).unwrap_err(), Over::Ip);
        let _c = c.admit(&limits, there, &cy).unwrap();
        assert_eq!(
            c.admit(&limits, there, &"dee".into()).unwrap_err(),
            Over::Total
        );
        assert_eq!(c.total(), 3);
        drop(a);
        drop(b);
        // Refusals gave back what they took.
        assert_eq!(c.total(), 1);
        assert!(c.admit(&limits, here, &ada).is_ok());
    }

    #[test]
    fn an_identity_is_limited_across_its_connections() {
        let limit = limit(1, 2);
        let identities = IdentityRates::new(limit);
        let who: Arc<str> = "ada".into();
        let mut a = ConnectionRate::new(limit);
        let mut b = ConnectionRate::new(limit);
        assert_eq!(a.admit(&identities, &who), Admit::Yes);
        assert_eq!(b.admit(&identities, &who), Admit::Yes);
        assert_eq!(b.admit(&identities, &who), Admit::Limited);
    }

    #[test]
    fn a_connection_whose_identity_changes_counts_against_the_new_one() {
        // A resume may hand a connection a session of another identity.
        let identities = IdentityRates::new(limit(1, 1));
        let mut conn = ConnectionRate::new(limit(1, 100));
        let (ada, bob): (Arc<str>, Arc<str>) = ("ada".into(), "bob".into());
        assert_eq!(conn.admit(&identities, &ada), Admit::Yes);
        assert_eq!(conn.admit(&identities, &ada), Admit::Limited);
        assert_eq!(conn.admit(&identities, &bob), Admit::Yes);
        assert_eq!(conn.admit(&identities, &ada), Admit::Limited);
    }
}
