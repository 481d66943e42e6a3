//! Exit codes (sysexits.h, so scripts can tell failure kinds apart) and the error type that
//! carries one to `main`.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// `audit` found stale mappings, `holders` found none, … : a finding, not a failure.
    Findings = 1,
    /// Bad command line (clap uses 2 as well).
    Usage = 2,
    /// A file that cannot be read as what it should be (a corrupt incident history).
    DataErr = 65,
    /// Unknown device/target, or no DAX device at all; no incident history.
    NoInput = 66,
    /// The kernel lacks what we need: no BTF, no usable hook.
    Unavailable = 69,
    /// Internal error.
    Software = 70,
    /// A resource is busy now; retrying later may work (the incident history is locked).
    TempFail = 75,
    /// A file written by a newer dax-probe (an incident history of a newer schema).
    Protocol = 76,
    /// `--metrics`: the address is malformed, in use or not this machine's (EX_NOHOST's
    /// number). The monitor only warns with it and runs on without metrics: it never exits
    /// with this code.
    MetricsAddress = 68,
    /// `drain` of a member of a stack (dm device, XFS realtime device) without `--unbind`:
    /// the stack above is in use (EX_CANTCREAT's number; sysexits has no better one).
    Stacked = 73,
    /// Not root / missing capabilities.
    NoPermission = 77,
    /// Malformed configuration.
    Config = 78,
}

/// An error that knows its exit code. Everything else maps to [`Code::Software`].
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Exit code for any error reaching `main`.
pub fn code_of(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map(|f| f.code as i32)
        .unwrap_or(Code::Software as i32)
}
