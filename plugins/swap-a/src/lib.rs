//! Hot-swap test fixture, version `a`: handler `answer` replies type `answer` with
//! `{"n": <payload.n>, "version": "a"}`.

const VERSION: &str = "a";

include!("../../swap-common/answer.rs");
