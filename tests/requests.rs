//! Requests with client answers ("emit with ack") through a real host, real clients and the
//! real `relay` plugin: a round trip, a timeout, a room request gathering answers, and the
//! `sys.reply` frames the host refuses.

mod support;

use serde_json::{Value, json};
use support::{Client, Host, assert_error, relay_manifest, str_at, wasm};

async fn relay_host() -> Host {
    Host::start(&[("relay.toml", relay_manifest(&wasm("relay"), "a", &[]))]).await
}

/// `asker` asks (`relay.ask` with `payload`); returns the request id from the ack. Nothing
/// comes before the ack (see [`ask_room`] for a room the asker is in).
async fn ask(asker: &mut Client, payload: Value) -> u64 {
    let (id, before) = ask_in(asker, payload, None).await;
    assert!(before.is_empty(), "{before:?}");
    id
}

/// `asker` asks room `room`, which it is a member of: returns the request id and the
/// reference of the question the asker got too (before its ack).
async fn ask_room(asker: &mut Client, payload: Value, room: &str) -> (u64, String) {
    let (id, before) = ask_in(asker, payload, Some(room)).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "question", "{before:?}");
    let reference = str_at(&before[0], "/messageId").to_owned();
    assert_eq!(reference, format!("h-{id}"));
    (id, reference)
}

async fn ask_in(asker: &mut Client, mut payload: Value, room: Option<&str>) -> (u64, Vec<Value>) {
    payload["q"] = json!("ready?");
    let id = asker.next_id();
    let mut frame = json!({"type": "relay.ask", "messageId": id, "payload": payload});
    if let Some(room) = room {
        frame["room"] = json!(room);
    }
    let (before, ack) = asker.request(frame).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let request = ack["payload"]["request"]
        .as_u64()
        .unwrap_or_else(|| panic!("a request id: {ack}"));
    (request, before)
}

/// The next frame, which must be the `question` of request `id`: its `messageId` is `h-<id>`.
async fn question(c: &mut Client, id: u64) -> String {
    let frame = c.recv_type("question").await;
    assert_eq!(frame["payload"], json!({"q": "ready?"}), "{frame}");
    let reference = str_at(&frame, "/messageId").to_owned();
    assert_eq!(reference, format!("h-{id}"), "{frame}");
    reference
}

/// Answers `reference` with `answer`; returns the host's answer to the `sys.reply`.
async fn reply(c: &mut Client, reference: &str, answer: Value) -> Value {
    let id = c.next_id();
    let (before, answer) = c
        .request(json!({"type": "sys.reply", "messageId": id,
                        "payload": {"ref": reference, "payload": answer}}))
        .await;
    assert!(before.is_empty(), "{before:?}");
    answer
}

/// The next frame, which must be the `outcome` the plugin sent: the outcome it got.
async fn outcome(c: &mut Client) -> Value {
    let frame = c.recv_type("outcome").await;
    assert_eq!(frame["payload"]["version"], "a", "{frame}");
    frame["payload"]["outcome"].clone()
}

/// Reads up to the answer of a `sys.ping`: only the room's news (joins, presence) came first.
async fn settle(c: &mut Client) {
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({"type": "sys.ping", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    for frame in before {
        let ty = frame["type"].as_str().unwrap_or_default();
        assert!(
            ["room.joined", "presence.changed", "sys.pong"].contains(&ty),
            "{frame}"
        );
    }
}

fn who(c: &Client) -> Value {
    json!({"connectionId": c.connection_id, "identity": c.identity})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answer_reaches_the_plugin_once() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    let id = ask(&mut a, json!({"to": b.connection_id, "timeoutMs": 60_000})).await;
    let reference = question(&mut b, id).await;
    let ack = reply(&mut b, &reference, json!({"ready": true})).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    // Long before the timeout: the only target answered.
    let mut answer = who(&b);
    answer["payload"] = json!({"ready": true});
    assert_eq!(
        outcome(&mut a).await,
        json!({"requestId": id, "room": null, "answers": [answer], "missing": []})
    );
    // Answered once: a second answer is refused.
    let again = reply(&mut b, &reference, json!(false)).await;
    assert_error(&again, "unknown_ref", again["payload"]["ref"].as_str());
    a.sync().await;
    b.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_times_out_and_a_late_answer_is_refused() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    let id = ask(&mut a, json!({"to": b.connection_id, "timeoutMs": 100})).await;
    let reference = question(&mut b, id).await;
    assert_eq!(
        outcome(&mut a).await,
        json!({"requestId": id, "room": null, "answers": [], "missing": [who(&b)]})
    );
    let late = reply(&mut b, &reference, json!(true)).await;
    assert_error(&late, "unknown_ref", late["payload"]["ref"].as_str());
    // A connection that is gone: the outcome comes at once, the connection missing.
    let id = ask(&mut a, json!({"to": "c-gone", "timeoutMs": 60_000})).await;
    assert_eq!(
        outcome(&mut a).await,
        json!({"requestId": id, "room": null, "answers": [],
               "missing": [{"connectionId": "c-gone", "identity": ""}]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_request_gathers_the_answers() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    let mut c = host.client().await;
    for client in [&mut a, &mut b, &mut c] {
        client
            .ack(json!({"type": "sys.join", "room": "vote"}))
            .await;
    }
    for client in [&mut a, &mut b, &mut c] {
        settle(client).await;
    }

    // Everyone answers: the outcome comes without waiting for the timeout.
    let (id, a_reference) = ask_room(&mut a, json!({"timeoutMs": 60_000}), "vote").await;
    for (client, answer) in [(&mut b, "yes"), (&mut c, "no")] {
        let reference = question(client, id).await;
        assert_eq!(
            reply(client, &reference, json!(answer)).await["type"],
            "sys.ack"
        );
    }
    assert_eq!(
        reply(&mut a, &a_reference, json!("yes")).await["type"],
        "sys.ack"
    );
    let got = outcome(&mut a).await;
    assert_eq!(got["room"], "vote", "{got}");
    assert_eq!(got["missing"], json!([]), "{got}");
    let mut answers: Vec<(String, String)> = got["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                str_at(x, "/connectionId").to_owned(),
                str_at(x, "/payload").to_owned(),
            )
        })
        .collect();
    answers.sort();
    let mut expected = vec![
        (a.connection_id.clone(), "yes".to_owned()),
        (b.connection_id.clone(), "yes".to_owned()),
        (c.connection_id.clone(), "no".to_owned()),
    ];
    expected.sort();
    assert_eq!(answers, expected);

    // c does not answer: one outcome at the timeout, c missing.
    let (id, a_reference) = ask_room(&mut a, json!({"timeoutMs": 300}), "vote").await;
    reply(&mut a, &a_reference, json!(1)).await;
    let reference = question(&mut b, id).await;
    reply(&mut b, &reference, json!(1)).await;
    question(&mut c, id).await;
    let got = outcome(&mut a).await;
    assert_eq!(got["answers"].as_array().map(Vec::len), Some(2), "{got}");
    assert_eq!(got["missing"], json!([who(&c)]), "{got}");
    for client in [&mut a, &mut b, &mut c] {
        client.sync().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_answer_nothing_are_refused() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    for reference in ["h-999999999", "nope", "h-"] {
        let answer = reply(&mut a, reference, json!(1)).await;
        assert_error(&answer, "unknown_ref", answer["payload"]["ref"].as_str());
    }
    // A question to b is not a's to answer.
    let id = ask(&mut a, json!({"to": b.connection_id, "timeoutMs": 60_000})).await;
    let reference = question(&mut b, id).await;
    let answer = reply(&mut a, &reference, json!(1)).await;
    assert_error(&answer, "unknown_ref", answer["payload"]["ref"].as_str());
    // Without `ref`: a bad frame. Too large an answer: too_large.
    a.expect_error(
        json!({"type": "sys.reply", "payload": {"payload": 1}}),
        "bad_frame",
    )
    .await;
    let big = "x".repeat(70 << 10);
    let answer = reply(&mut b, &reference, json!(big)).await;
    assert_error(&answer, "too_large", answer["payload"]["ref"].as_str());
    // Still pending: b can answer properly.
    assert_eq!(reply(&mut b, &reference, json!(2)).await["type"], "sys.ack");
    assert_eq!(outcome(&mut a).await["answers"][0]["payload"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resumes_answers_the_question_it_missed() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let b = host.client().await;
    let (b_session, b_token, b_seq, b_conn) = (
        b.session_id.clone(),
        b.resume_token.clone(),
        b.last_seq,
        b.connection_id.clone(),
    );
    let who_b = who(&b);
    // The question is queued to b's session before a's ack; b's connection then drops.
    let id = ask(&mut a, json!({"to": b_conn, "timeoutMs": 60_000})).await;
    b.drop_connection();
    let (mut b, replayed, answer) = Client::resume(host.addr(), &b_session, &b_token, b_seq).await;
    assert_eq!(answer["type"], "sys.ack", "{answer}");
    assert_eq!(
        b.connection_id, b_conn,
        "a resumed session keeps its connection id"
    );
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(replayed[0]["type"], "question", "{replayed:?}");
    let reference = str_at(&replayed[0], "/messageId").to_owned();
    assert_eq!(reference, format!("h-{id}"));
    assert_eq!(
        reply(&mut b, &reference, json!("back")).await["type"],
        "sys.ack"
    );
    let mut answered = who_b;
    answered["payload"] = json!("back");
    assert_eq!(
        outcome(&mut a).await,
        json!({"requestId": id, "room": null, "answers": [answered], "missing": []})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_closes_is_missing_at_once() {
    let host = relay_host().await;
    let mut a = host.client().await;
    let b = host.client().await;
    let who_b = who(&b);
    // A minute to answer; b closes instead: the outcome does not wait for the minute.
    let id = ask(&mut a, json!({"to": b.connection_id, "timeoutMs": 60_000})).await;
    b.close().await;
    assert_eq!(
        outcome(&mut a).await,
        json!({"requestId": id, "room": null, "answers": [], "missing": [who_b]})
    );
}
