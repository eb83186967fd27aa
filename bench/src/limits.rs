//! Raising this process's open-file limit so that it can hold tens of thousands of sockets.

use rlimit::Resource;

/// Raises RLIMIT_NOFILE to at least `want` descriptors when possible and returns the soft limit
/// in force afterwards. The hard limit is raised too when the process may (root, or
/// CAP_SYS_RESOURCE); otherwise the soft limit goes up to the hard one.
pub fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if hard < want && rlimit::setrlimit(Resource::NOFILE, want, want).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(want).unwrap_or(soft)
}
