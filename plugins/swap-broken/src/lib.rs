//! Hot-swap test fixture, version `broken`: the handlers of `swap-a` and `swap-b`, except that
//! `answer` traps on every call (a bad deploy, for the rollback tests).

const VERSION: &str = "broken";

include!("../../swap-common/answer.rs");
