//! What a client may do, over real sockets with real tokens: room rules of the configuration
//! (`[[rooms.rule]]`) deciding joins by verified claims, a plugin's `room.join` hook deciding
//! joins of its rooms (and refusing when it traps), both applying to the joins plugins make too,
//! and a plugin reading a connection's verified claims through the `identity` capability.

mod support;

use std::path::Path;

use plexus::auth::KeySource;
use plexus::{Config, Server, StartError};
use serde_json::{Value, json};
use support::{
    Client, Host, SECRET, TempDir, assert_error, claims, hs256, relay_manifest, toml_str, wasm,
};

/// The rules of these tests, as an operator writes them in `plexus.toml`.
const RULES: &str = r#"
[[rooms.rule]]
pattern = "admin:*"
require = { role = "admin" }

[[rooms.rule]]
pattern = "user:{sub}"

[[rooms.rule]]
pattern = "vault:crown"
require = { role = "queen" }
"#;

/// A host verifying HS256 tokens, admitting guests, with [`RULES`].
async fn host(manifests: &[(&str, String)]) -> Host {
    Host::start_with(manifests, |c: &mut Config| {
        c.auth.key = Some(KeySource::Hs256Secret(SECRET.to_vec()));
        c.auth.allow_guests = true;
        let settings = plexus::config_file::parse(RULES, Path::new("/"))
            .unwrap_or_else(|(line, e)| panic!("RULES line {line:?}: {e}"));
        settings.apply(c).expect("applying RULES");
    })
    .await
}

/// A client with a token for `sub` carrying `extra` claims.
async fn with_token(host: &Host, sub: &str, extra: Value) -> Client {
    let token = hs256(&claims(sub, extra));
    let c = Client::connect_to(host.addr(), &format!("/ws?token={token}")).await;
    assert_eq!(c.identity, sub);
    c
}

fn join(room: &str) -> Value {
    json!({"type": "sys.join", "room": room})
}

/// Asserts that `c` is not a member of `room` (its `sys.presence` gets `not_in_room`).
async fn assert_not_in(c: &mut Client, room: &str) {
    c.expect_error(json!({"type": "sys.presence", "room": room}), "not_in_room")
        .await;
}

/// Asserts a join of `room` is refused with `forbidden`; returns the error's message.
async fn forbidden(c: &mut Client, join: Value) -> String {
    let room = join["room"].as_str().unwrap_or_default().to_owned();
    let error = c.expect_error(join, "forbidden").await;
    assert_not_in(c, &room).await;
    error["payload"]["message"].as_str().unwrap().to_owned()
}

/// The `gate` fixture's manifest: plugin `id` hooking `room.join` of `rooms` with `handler`,
/// routes `gate.claims` and `gate.last`, granted `host` interfaces and the hooked rooms.
fn gate_manifest(id: &str, handler: &str, rooms: &str, host: &str) -> String {
    format!(
        r#"manifest_version = 1

[plugin]
id = "{id}"

[source]
wasm = {wasm}

[[route]]
type = "{id}.claims"
handler = "claims"

[[route]]
type = "{id}.last"
handler = "last"

[[hook]]
on = "room.join"
handler = "{handler}"
rooms = {rooms}

[capabilities]
host = {host}
rooms = {rooms}

[config]
key = "open sesame"
"#,
        wasm = toml_str(&wasm("gate").display().to_string()),
    )
}

const GATE_CAPS: &str = r#"["messaging", "kv", "config", "identity"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_rules_decide_joins_by_verified_claims() {
    let host = host(&[("relay.toml", relay_manifest(&wasm("relay"), "a", &[]))]).await;
    let mut admin = with_token(&host, "ada", json!({"role": "admin"})).await;
    let mut user = with_token(&host, "ursula", json!({"role": "user"})).await;
    let mut both = with_token(&host, "bo", json!({"role": ["user", "admin"]})).await;
    let mut guest = host.client().await;

    admin.ack(join("admin:ops")).await;
    // `admin:*` without the role: refused, naming the rule; nothing changed, so the member
    // is told nothing.
    let message = forbidden(&mut user, join("admin:ops")).await;
    assert!(
        message.contains("room rule 1") && message.contains("`admin:*`"),
        "{message}"
    );
    assert!(message.contains("claim `role`"), "{message}");
    let message = forbidden(&mut guest, join("admin:ops")).await;
    assert!(message.contains("room rule 1"), "{message}");
    admin.sync().await;
    // With the role, or a list containing it: joined.
    let ack = both.ack(join("admin:ops")).await;
    assert_eq!(
        ack["payload"]["members"].as_array().unwrap().len(),
        2,
        "{ack}"
    );
    let joined = admin.recv_type("room.joined").await;
    assert_eq!(joined["payload"]["identity"], "bo", "{joined}");
    admin.recv_type("presence.changed").await;

    // `user:{sub}`: one's own room only.
    user.ack(join("user:ursula")).await;
    let message = forbidden(&mut user, join("user:ada")).await;
    assert!(
        message.contains("room rule 2") && message.contains("`user:{sub}`"),
        "{message}"
    );
    forbidden(&mut guest, join("user:ursula")).await;

    // A room no rule matches is open, to guests too.
    guest.ack(join("lobby")).await;

    // A plugin's join on behalf of a client obeys the rules too: the call succeeds, the join
    // is not made.
    user.ack(json!({"type": "relay.join", "payload": {"room": "admin:ops"}}))
        .await;
    assert_not_in(&mut user, "admin:ops").await;
    user.ack(json!({"type": "relay.join", "payload": {"room": "user:ursula2"}}))
        .await;
    assert_not_in(&mut user, "user:ursula2").await;
    admin.sync().await;
    admin
        .ack(json!({"type": "relay.join", "payload": {"room": "admin:ops2"}}))
        .await;
    admin
        .ack(json!({"type": "sys.presence", "room": "admin:ops2"}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_hook_decides_for_its_rooms_and_a_failing_one_refuses() {
    let host = host(&[
        (
            "gate.toml",
            gate_manifest("gate", "may-join", r#"["vault:*"]"#, GATE_CAPS),
        ),
        (
            "trapdoor.toml",
            gate_manifest("trapdoor", "trap-join", r#"["trap:*"]"#, GATE_CAPS),
        ),
        ("relay.toml", relay_manifest(&wasm("relay"), "a", &[])),
    ])
    .await;
    let mut guest = host.client().await;
    let mut vip = with_token(&host, "vi", json!({"vip": true})).await;

    // Refused with the plugin's message; what the hook recorded (a reply, a store write) is
    // discarded: no frame before the error, nothing stored.
    let message = forbidden(&mut guest, join("vault:1")).await;
    assert_eq!(message, "the door is shut: bring the key");
    let keyed = json!({"type": "sys.join", "room": "vault:1", "payload": {"key": "nope"}});
    forbidden(&mut guest, keyed).await;
    // Allowed: by the join's payload, or by the joiner's verified claims.
    let keyed = json!({"type": "sys.join", "room": "vault:1", "payload": {"key": "open sesame"}});
    guest.ack(keyed).await;
    vip.ack(join("vault:2")).await;
    let ack = guest.ack(json!({"type": "gate.last"})).await;
    assert_eq!(ack["payload"]["lastJoin"], Value::Null, "{ack}");

    // The configuration's rules decide first: a VIP without the rule's role is refused by
    // the rule, not asked about by the hook.
    let message = forbidden(&mut vip, join("vault:crown")).await;
    assert!(message.contains("room rule 3"), "{message}");

    // A hook that traps refuses (fails closed), and only that join.
    let message = forbidden(&mut vip, join("trap:1")).await;
    assert!(
        message.contains("guarded by plugin `trapdoor`") && message.contains("trapped"),
        "{message}"
    );
    vip.ack(join("lobby")).await;

    // A plugin's join of a hooked room asks the hook too (with a `null` payload).
    guest
        .ack(json!({"type": "relay.join", "payload": {"room": "vault:3"}}))
        .await;
    assert_not_in(&mut guest, "vault:3").await;
    vip.ack(json!({"type": "relay.join", "payload": {"room": "vault:3"}}))
        .await;
    vip.ack(json!({"type": "sys.presence", "room": "vault:3"}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reads_the_verified_claims_it_is_granted() {
    let host = host(&[(
        "gate.toml",
        gate_manifest("gate", "may-join", r#"["vault:*"]"#, GATE_CAPS),
    )])
    .await;
    let mut ada = with_token(&host, "ada", json!({"role": "admin", "teams": ["red"]})).await;
    let mut guest = host.client().await;

    let ack = ada.ack(json!({"type": "gate.claims"})).await;
    assert_eq!(ack["payload"]["role"], "admin", "{ack}");
    let read = &ack["payload"]["claims"];
    assert_eq!(read["sub"], "ada", "{ack}");
    assert_eq!(read["teams"], json!(["red"]), "{ack}");
    assert!(read["exp"].as_u64().is_some(), "{ack}");

    // A guest has none; another connection's claims are read by its id; an unknown id has none.
    let ack = guest.ack(json!({"type": "gate.claims"})).await;
    assert_eq!(
        ack["payload"],
        json!({"ref": ack["payload"]["ref"], "claims": null, "role": null})
    );
    let ack = guest
        .ack(json!({"type": "gate.claims", "payload": {"of": ada.connection_id}}))
        .await;
    assert_eq!(ack["payload"]["role"], "admin", "{ack}");
    let ack = guest
        .ack(json!({"type": "gate.claims", "payload": {"of": "c-nobody"}}))
        .await;
    assert_eq!(ack["payload"]["claims"], Value::Null, "{ack}");

    // `sys.refresh` replaces the claims a plugin reads.
    let token = hs256(&claims("ada", json!({"role": "user"})));
    ada.ack(json!({"type": "sys.refresh", "payload": {"token": token}}))
        .await;
    let ack = ada.ack(json!({"type": "gate.claims"})).await;
    assert_eq!(ack["payload"]["role"], "user", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_claims_needs_the_identity_capability() {
    let dir = TempDir::new();
    let no_identity = r#"["messaging", "kv", "config"]"#;
    dir.write(
        "gate.toml",
        gate_manifest("gate", "may-join", r#"["vault:*"]"#, no_identity),
    );
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.build = false;
    config.watch = plexus::WatchMode::Off;
    match Server::start(config).await {
        Err(StartError::Manifests(errors)) => {
            let text = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                text.contains("plexus:plugin/identity@0.3.4")
                    && text.contains("needs capability `identity`"),
                "{text}"
            );
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a plugin importing `identity` without the grant was loaded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_is_answered_even_without_a_message_id() {
    let host = host(&[]).await;
    let mut guest = host.client().await;
    guest.send(join("admin:ops")).await;
    let error = guest.recv().await;
    assert_error(&error, "forbidden", None);
    guest.sync().await;
}
