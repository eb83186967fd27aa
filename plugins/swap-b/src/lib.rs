//! Hot-swap test fixture, version `b`: handler `answer` replies type `answer` with
//! `{"n": <payload.n>, "version": "b"}`.

const VERSION: &str = "b";

include!("../../swap-common/answer.rs");
