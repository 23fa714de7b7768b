//! Raises the open-files limit to its hard limit at start: every TCP connection costs two
//! descriptors and every UDP flow one, and the soft default (often 1024) would make the caps
//! of `limits` unreachable long before they apply.

use tracing::{info, warn};

/// Sets RLIMIT_NOFILE's soft limit to the hard limit; logs the result (never fails the start).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        info!(
            open_files = lim.rlim_cur,
            "open-files limit already at its hard limit"
        );
        return;
    }
    let was = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one
    // needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), was, "cannot raise RLIMIT_NOFILE");
        return;
    }
    info!(
        was,
        open_files = lim.rlim_cur,
        "raised the open-files limit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        raise_nofile();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}
