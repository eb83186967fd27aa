//! Plugin manifests: strict TOML parsing, validation, and errors that name the file, the line
//! and the route (see `docs/manifest.md`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// The longest time limit a manifest may give a call, in milliseconds: a call runs on one of
/// the host's runtime threads, which it keeps for that long.
pub const MAX_TIMEOUT_MS: u64 = 10_000;

/// The manifest format version this host reads.
pub const MANIFEST_VERSION: u32 = 1;

/// One problem in one manifest file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// A host interface a plugin may import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostCap {
    Messaging,
    Rooms,
    Kv,
    Logging,
    Config,
    /// Since plugin interface 0.3.2.
    Timers,
    /// Reading connections' verified token claims. Since plugin interface 0.3.3.
    Identity,
}

impl HostCap {
    pub const ALL: [HostCap; 7] = [
        HostCap::Messaging,
        HostCap::Rooms,
        HostCap::Kv,
        HostCap::Logging,
        HostCap::Config,
        HostCap::Timers,
        HostCap::Identity,
    ];

    /// The name used in manifests and in the WIT package.
    pub fn name(self) -> &'static str {
        match self {
            HostCap::Messaging => "messaging",
            HostCap::Rooms => "rooms",
            HostCap::Kv => "kv",
            HostCap::Logging => "logging",
            HostCap::Config => "config",
            HostCap::Timers => "timers",
            HostCap::Identity => "identity",
        }
    }
}

/// A host event a plugin can subscribe to. The event's call has the connection it is about
/// as its origin; `room.*` and `presence.changed` name the room too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum HostEvent {
    /// A session started: `{"connectionId", "identity"}`.
    #[serde(rename = "connect")]
    Connect,
    /// A session ended: `{"connectionId", "identity"}`.
    #[serde(rename = "disconnect")]
    Disconnect,
    #[serde(rename = "room.joined")]
    RoomJoined,
    #[serde(rename = "room.left")]
    RoomLeft,
    /// An identity came online or went offline in a room, or changed its status:
    /// `{"room", "identity", "state", "status"}`.
    #[serde(rename = "presence.changed")]
    PresenceChanged,
}

impl HostEvent {
    pub const ALL: [HostEvent; 5] = [
        HostEvent::Connect,
        HostEvent::Disconnect,
        HostEvent::RoomJoined,
        HostEvent::RoomLeft,
        HostEvent::PresenceChanged,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostEvent::Connect => "connect",
            HostEvent::Disconnect => "disconnect",
            HostEvent::RoomJoined => "room.joined",
            HostEvent::RoomLeft => "room.left",
            HostEvent::PresenceChanged => "presence.changed",
        }
    }
}

/// A point where the host asks a plugin before it does something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum HookPoint {
    /// Before a session joins a room the hook names: the handler allows the join by returning
    /// `ok`, and refuses it by returning an error (the joiner gets `forbidden`).
    #[serde(rename = "room.join")]
    RoomJoin,
}

impl HookPoint {
    pub fn name(self) -> &'static str {
        match self {
            HookPoint::RoomJoin => "room.join",
        }
    }
}

/// A hook: handler `handler` decides `on` for the rooms `rooms` (no two plugins' hooks of one
/// point may share a room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub on: HookPoint,
    pub handler: String,
    pub rooms: Vec<RoomPattern>,
    pub line: usize,
}

/// Handlers compiled into the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    /// The `echo` plugin's handlers (`echo`, `broadcast`), natively.
    Echo,
}

/// Where a plugin's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Wasm { path: PathBuf, build: Option<Build> },
    Builtin(Builtin),
}

/// How to rebuild a plugin's component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub command: String,
    pub dir: PathBuf,
    pub watch: Vec<PathBuf>,
}

/// How a route's calls are ordered against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerializeBy {
    /// The plugin's calls for one room (the envelope's `room`) run one at a time, in arrival
    /// order, each call's effects and answer applied before the next call starts.
    Room,
}

/// A route from a message type to a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub ty: String,
    pub handler: String,
    pub allow_outside_room: bool,
    /// `None`: calls run in parallel (the default).
    pub serialize: Option<SerializeBy>,
    pub line: usize,
}

/// A subscription to a host event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRoute {
    pub event: HostEvent,
    pub handler: String,
}

/// A room name or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(String);

impl RoomPattern {
    pub fn matches(&self, room: &str) -> bool {
        match self.prefix() {
            Some(prefix) => room.starts_with(prefix),
            None => self.0 == room,
        }
    }

    /// The prefix of a pattern ending in `*`.
    fn prefix(&self) -> Option<&str> {
        self.0.strip_suffix('*')
    }

    /// Whether some room matches both patterns.
    pub fn overlaps(&self, other: &RoomPattern) -> bool {
        match (self.prefix(), other.prefix()) {
            (Some(a), Some(b)) => a.starts_with(b) || b.starts_with(a),
            (Some(_), None) => self.matches(&other.0),
            (None, _) => other.matches(&self.0),
        }
    }

    /// Whether every room this pattern matches, `outer` matches too.
    pub fn within(&self, outer: &RoomPattern) -> bool {
        match (self.prefix(), outer.prefix()) {
            (Some(inner), Some(outer)) => inner.starts_with(outer),
            (Some(_), None) => false,
            (None, _) => outer.matches(&self.0),
        }
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a plugin is allowed to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub host: BTreeSet<HostCap>,
    pub rooms: Vec<RoomPattern>,
}

impl Capabilities {
    pub fn allows_room(&self, room: &str) -> bool {
        self.rooms.iter().any(|p| p.matches(room))
    }
}

/// Per-call limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeout_ms: u64,
    pub memory_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 100,
            memory_mb: 16,
        }
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub file: PathBuf,
    pub id: String,
    pub description: Option<String>,
    pub source: Source,
    pub routes: Vec<Route>,
    pub events: Vec<EventRoute>,
    pub hooks: Vec<Hook>,
    pub capabilities: Capabilities,
    pub limits: Limits,
    pub config: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    manifest_version: Spanned<u32>,
    plugin: RawPlugin,
    source: Spanned<RawSource>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    event: Vec<Spanned<RawEvent>>,
    #[serde(default)]
    hook: Vec<Spanned<RawHook>>,
    #[serde(default)]
    capabilities: RawCapabilities,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    id: Spanned<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    wasm: Option<String>,
    builtin: Option<Builtin>,
    build: Option<RawBuild>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: String,
    dir: Option<String>,
    #[serde(default)]
    watch: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "type")]
    ty: String,
    handler: String,
    #[serde(default)]
    allow_outside_room: bool,
    serialize: Option<SerializeBy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    on: HostEvent,
    handler: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    on: HookPoint,
    handler: String,
    rooms: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    host: Vec<HostCap>,
    #[serde(default)]
    rooms: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    timeout_ms: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses and validates one manifest's text; `file` is used for messages and relative paths.
pub fn parse(file: &Path, text: &str) -> Result<Manifest, Vec<ManifestError>> {
    let err = |line: Option<usize>, message: String| ManifestError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let raw: RawManifest = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        vec![err(line, e.message().trim_end().to_owned())]
    })?;
    let mut errors = Vec::new();
    let line = |span: std::ops::Range<usize>| Some(line_of(text, span.start));

    if *raw.manifest_version.get_ref() != MANIFEST_VERSION {
        errors.push(err(
            line(raw.manifest_version.span()),
            format!(
                "unsupported manifest_version {}; this host reads version {MANIFEST_VERSION}",
                raw.manifest_version.get_ref()
            ),
        ));
    }
    let id = raw.plugin.id.get_ref().clone();
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        errors.push(err(
            line(raw.plugin.id.span()),
            format!("plugin id `{id}` must be non-empty and use only a-z, 0-9 and `-`"),
        ));
    }

    let base = file.parent().unwrap_or(Path::new("."));
    let source_line = line(raw.source.span());
    let raw_source = raw.source.into_inner();
    let source = match (raw_source.wasm, raw_source.builtin) {
        (Some(wasm), None) => Some(Source::Wasm {
            path: base.join(wasm),
            build: raw_source.build.map(|b| Build {
                command: b.command,
                dir: base.join(b.dir.unwrap_or_else(|| ".".into())),
                watch: b.watch.iter().map(|w| base.join(w)).collect(),
            }),
        }),
        (None, Some(builtin)) => {
            if raw_source.build.is_some() {
                errors.push(err(
                    source_line,
                    "a builtin source takes no [source.build]".into(),
                ));
            }
            Some(Source::Builtin(builtin))
        }
        (Some(_), Some(_)) => {
            errors.push(err(
                source_line,
                "[source] takes `wasm` or `builtin`, not both".into(),
            ));
            None
        }
        (None, None) => {
            errors.push(err(
                source_line,
                "[source] needs `wasm` or `builtin`".into(),
            ));
            None
        }
    };

    let mut routes = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for spanned in raw.route {
        let route_line = line_of(text, spanned.span().start);
        let r = spanned.into_inner();
        if r.ty.is_empty() {
            errors.push(err(
                Some(route_line),
                "route `type` must not be empty".into(),
            ));
            continue;
        }
        if r.ty.starts_with("sys.") {
            errors.push(err(
                Some(route_line),
                format!(
                    "route `{}`: types starting with `sys.` are reserved for the host",
                    r.ty
                ),
            ));
            continue;
        }
        if let Some(first) = seen.insert(r.ty.clone(), route_line) {
            errors.push(err(
                Some(route_line),
                format!("route `{}` is declared twice (first on line {first})", r.ty),
            ));
            continue;
        }
        if r.handler.is_empty() {
            errors.push(err(
                Some(route_line),
                format!("route `{}`: empty handler", r.ty),
            ));
        }
        routes.push(Route {
            ty: r.ty,
            handler: r.handler,
            allow_outside_room: r.allow_outside_room,
            serialize: r.serialize,
            line: route_line,
        });
    }
    let mut events = Vec::new();
    for spanned in raw.event {
        let event_line = line_of(text, spanned.span().start);
        let e = spanned.into_inner();
        if events.iter().any(|x: &EventRoute| x.event == e.on) {
            errors.push(err(
                Some(event_line),
                format!("event `{}` is declared twice", e.on.name()),
            ));
            continue;
        }
        events.push(EventRoute {
            event: e.on,
            handler: e.handler,
        });
    }
    let grant: Vec<RoomPattern> = raw
        .capabilities
        .rooms
        .into_iter()
        .map(RoomPattern)
        .collect();
    let mut hooks: Vec<Hook> = Vec::new();
    for spanned in raw.hook {
        let hook_line = line_of(text, spanned.span().start);
        let h = spanned.into_inner();
        let name = h.on.name();
        let mut problem = |message: String| errors.push(err(Some(hook_line), message));
        if let Some(first) = hooks.iter().find(|x| x.on == h.on) {
            problem(format!(
                "hook `{name}` is declared twice (first on line {})",
                first.line
            ));
            continue;
        }
        if h.handler.is_empty() {
            problem(format!("hook `{name}`: empty handler"));
        }
        if h.rooms.is_empty() {
            problem(format!(
                "hook `{name}`: `rooms` must name at least one room, or a prefix ending in `*`"
            ));
        }
        let mut rooms = Vec::new();
        for room in h.rooms {
            let star = room.find('*');
            if room.is_empty() || star.is_some_and(|at| at + 1 != room.len()) {
                problem(format!(
                    "hook `{name}`: room `{room}` must be a room name, or a prefix ending in `*` (and no other `*`)"
                ));
                continue;
            }
            let pattern = RoomPattern(room);
            if !grant.iter().any(|g| pattern.within(g)) {
                problem(format!(
                    "hook `{name}`: room `{pattern}` is outside the plugin's capabilities.rooms; grant it there"
                ));
                continue;
            }
            rooms.push(pattern);
        }
        hooks.push(Hook {
            on: h.on,
            handler: h.handler,
            rooms,
            line: hook_line,
        });
    }
    if routes.is_empty() && events.is_empty() && hooks.is_empty() && errors.is_empty() {
        errors.push(err(
            None,
            "the manifest declares no [[route]], no [[event]] and no [[hook]]".into(),
        ));
    }
    // A limit given and its line; the default (always in range) has none.
    let limit = |given: Option<Spanned<u64>>, default: u64| match given {
        Some(v) => (*v.get_ref(), line(v.span())),
        None => (default, None),
    };
    let (timeout_ms, timeout_line) = limit(raw.limits.timeout_ms, Limits::default().timeout_ms);
    let (memory_mb, memory_line) = limit(raw.limits.memory_mb, Limits::default().memory_mb);
    let limits = Limits {
        timeout_ms,
        memory_mb,
    };
    if limits.timeout_ms == 0 || limits.timeout_ms > MAX_TIMEOUT_MS {
        errors.push(err(
            timeout_line,
            format!("[limits] timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"),
        ));
    }
    if limits.memory_mb == 0 || limits.memory_mb > 4096 {
        errors.push(err(
            memory_line,
            "[limits] memory_mb must be between 1 and 4096".into(),
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Manifest {
        file: file.to_path_buf(),
        id,
        description: raw.plugin.description,
        source: source.expect("checked above"),
        routes,
        events,
        hooks,
        capabilities: Capabilities {
            host: raw.capabilities.host.into_iter().collect(),
            rooms: grant,
        },
        limits,
        config: raw.config,
    })
}

/// Reads and parses one manifest file.
pub fn load(file: &Path) -> Result<Manifest, Vec<ManifestError>> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        vec![ManifestError {
            file: file.to_path_buf(),
            line: None,
            message: format!("cannot read: {e}"),
        }]
    })?;
    parse(file, &text)
}

/// The manifest files (`*.toml`) of a directory, sorted by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ManifestError {
        file: dir.to_path_buf(),
        line: None,
        message: format!("cannot read the manifests directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Checks what no single manifest can see: duplicate plugin ids, routes claimed twice, and
/// hooks of two plugins on a room they share.
pub fn check_set<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> Vec<ManifestError> {
    let mut errors = Vec::new();
    let mut ids: HashMap<&str, &Path> = HashMap::new();
    let mut types: HashMap<&str, (&Path, usize)> = HashMap::new();
    let mut hooked: Vec<(&Hook, &RoomPattern, &Path)> = Vec::new();
    for m in manifests {
        for hook in &m.hooks {
            for room in &hook.rooms {
                let taken = hooked
                    .iter()
                    .find(|(h, r, _)| h.on == hook.on && r.overlaps(room));
                if let Some((other, other_room, other_file)) = taken {
                    errors.push(ManifestError {
                        file: m.file.clone(),
                        line: Some(hook.line),
                        message: format!(
                            "hook `{}` on room `{room}` overlaps the hook on room `{other_room}` of {}:{} (one plugin decides a room's joins)",
                            hook.on.name(),
                            other_file.display(),
                            other.line
                        ),
                    });
                }
            }
        }
        for hook in &m.hooks {
            hooked.extend(hook.rooms.iter().map(|r| (hook, r, m.file.as_path())));
        }
        if let Some(other) = ids.insert(&m.id, &m.file) {
            errors.push(ManifestError {
                file: m.file.clone(),
                line: None,
                message: format!("plugin id `{}` is also used by {}", m.id, other.display()),
            });
        }
        for r in &m.routes {
            if let Some((other, other_line)) = types.insert(&r.ty, (&m.file, r.line)) {
                errors.push(ManifestError {
                    file: m.file.clone(),
                    line: Some(r.line),
                    message: format!(
                        "route `{}` is also routed by {}:{} (two plugins cannot route the same type)",
                        r.ty,
                        other.display(),
                        other_line
                    ),
                });
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
manifest_version = 1
[plugin]
id = "chat"
[source]
wasm = "chat.wasm"
[[route]]
type = "chat.send"
handler = "send"
[[event]]
on = "room.joined"
handler = "joined"
[capabilities]
host = ["messaging", "kv"]
rooms = ["lobby", "game:*"]
[limits]
timeout_ms = 50
[config]
k = "v"
"#;

    #[test]
    fn the_time_limit_has_a_ceiling() {
        let at = GOOD.replace("timeout_ms = 50", "timeout_ms = 10000");
        assert!(parse(Path::new("m/chat.toml"), &at).is_ok());
        let past = GOOD.replace("timeout_ms = 50", "timeout_ms = 10001");
        let errors = parse(Path::new("m/chat.toml"), &past).unwrap_err();
        assert!(
            errors[0].message.contains("between 1 and 10000"),
            "{errors:?}"
        );
    }

    #[test]
    fn limits_out_of_range_name_their_line() {
        // The largest integer the toml crate reads into a `u64` field, past TOML's own `i64`
        // (a property of the `manifest_parse` fuzz target: these errors had no line).
        let text = GOOD.replace(
            "timeout_ms = 50",
            "timeout_ms = 18446744073709551615\nmemory_mb = 0",
        );
        let errors = parse(Path::new("m/chat.toml"), &text).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].line, Some(17), "{errors:?}");
        assert!(errors[0].message.contains("timeout_ms"), "{errors:?}");
        assert_eq!(errors[1].line, Some(18), "{errors:?}");
        assert!(errors[1].message.contains("memory_mb"), "{errors:?}");
    }

    #[test]
    fn parses_a_good_manifest() {
        let m = parse(Path::new("m/chat.toml"), GOOD).unwrap();
        assert_eq!(m.id, "chat");
        assert_eq!(m.routes[0].ty, "chat.send");
        assert_eq!(m.routes[0].line, 7);
        assert_eq!(m.events[0].event, HostEvent::RoomJoined);
        assert!(m.capabilities.allows_room("game:42"));
        assert!(!m.capabilities.allows_room("gam"));
        assert_eq!(
            m.limits,
            Limits {
                timeout_ms: 50,
                memory_mb: 16
            }
        );
        assert_eq!(
            m.source,
            Source::Wasm {
                path: PathBuf::from("m/chat.wasm"),
                build: None
            }
        );
    }

    #[test]
    fn unknown_fields_name_the_line() {
        let text = GOOD.replace("handler = \"send\"", "handler = \"send\"\nmethod = \"x\"");
        let errs = parse(Path::new("chat.toml"), &text).unwrap_err();
        assert_eq!(errs[0].line, Some(10), "{errs:?}");
        assert!(
            errs[0].message.contains("unknown field `method`"),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_routes_across_manifests_name_both() {
        let a = parse(Path::new("a.toml"), GOOD).unwrap();
        let mut b = parse(Path::new("b.toml"), GOOD).unwrap();
        b.id = "other".into();
        let errs = check_set([&a, &b]);
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "b.toml:7: route `chat.send` is also routed by a.toml:7 (two plugins cannot route the same type)"
        );
    }

    #[test]
    fn serialize_takes_room_only() {
        let text = GOOD.replace(
            "handler = \"send\"",
            "handler = \"send\"\nserialize = \"room\"",
        );
        let m = parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(m.routes[0].serialize, Some(SerializeBy::Room));
        assert_eq!(
            parse(Path::new("c.toml"), GOOD).unwrap().routes[0].serialize,
            None
        );
        let text = GOOD.replace(
            "handler = \"send\"",
            "handler = \"send\"\nserialize = \"plugin\"",
        );
        let errs = parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!(errs[0].line, Some(10), "{errs:?}");
        assert!(
            errs[0].message.contains("unknown variant `plugin`"),
            "{errs:?}"
        );
    }

    #[test]
    fn every_host_event_and_the_timers_capability_parse() {
        for event in HostEvent::ALL {
            let text = GOOD
                .replace(
                    "on = \"room.joined\"",
                    &format!("on = \"{}\"", event.name()),
                )
                .replace("\"messaging\", \"kv\"", "\"messaging\", \"timers\"");
            let m = parse(Path::new("c.toml"), &text).unwrap();
            assert_eq!(m.events[0].event, event);
            assert!(m.capabilities.host.contains(&HostCap::Timers));
        }
        let text = GOOD.replace("on = \"room.joined\"", "on = \"connected\"");
        let errs = parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(
            errs[0].message.contains("unknown variant `connected`"),
            "{errs:?}"
        );
    }

    #[test]
    fn room_patterns_overlap_and_nest() {
        let p = |s: &str| RoomPattern(s.into());
        assert!(p("game:*").overlaps(&p("game:1")));
        assert!(p("game:1").overlaps(&p("game:*")));
        assert!(p("game:*").overlaps(&p("ga*")));
        assert!(p("*").overlaps(&p("x")));
        assert!(!p("game:*").overlaps(&p("chat:*")));
        assert!(!p("game:1").overlaps(&p("game:2")));
        assert!(p("game:1").overlaps(&p("game:1")));
        assert!(p("game:*").within(&p("*")));
        assert!(p("game:*").within(&p("game:*")));
        assert!(p("game:1").within(&p("game:*")));
        assert!(p("game:1").within(&p("game:1")));
        assert!(!p("game:*").within(&p("game:1")));
        assert!(!p("ga*").within(&p("game:*")));
    }

    #[test]
    fn hooks_parse_strictly() {
        let with_hook = |hook: &str| {
            GOOD.replace(
                "[capabilities]",
                &format!("[[hook]]\n{hook}\n[capabilities]"),
            )
        };
        let m = parse(
            Path::new("c.toml"),
            &with_hook("on = \"room.join\"\nhandler = \"may\"\nrooms = [\"game:*\", \"lobby\"]"),
        )
        .unwrap();
        assert_eq!(m.hooks.len(), 1);
        assert_eq!(m.hooks[0].on, HookPoint::RoomJoin);
        assert_eq!(m.hooks[0].line, 13);
        assert!(m.hooks[0].rooms[0].matches("game:7"));

        let problem = |hook: &str| {
            let errs = parse(Path::new("c.toml"), &with_hook(hook)).unwrap_err();
            assert_eq!(errs[0].line, Some(13), "{errs:?}");
            errs[0].message.clone()
        };
        let outside = problem("on = \"room.join\"\nhandler = \"may\"\nrooms = [\"chat:*\"]");
        assert!(
            outside.contains("outside the plugin's capabilities.rooms"),
            "{outside}"
        );
        let empty = problem("on = \"room.join\"\nhandler = \"may\"\nrooms = []");
        assert!(empty.contains("at least one room"), "{empty}");
        let star = problem("on = \"room.join\"\nhandler = \"may\"\nrooms = [\"game:*:x\"]");
        assert!(star.contains("no other `*`"), "{star}");
        let errs = parse(
            Path::new("c.toml"),
            &with_hook("on = \"room.leave\"\nhandler = \"may\"\nrooms = [\"lobby\"]"),
        )
        .unwrap_err();
        assert_eq!(errs[0].line, Some(14), "{errs:?}");
        assert!(
            errs[0].message.contains("unknown variant `room.leave`"),
            "{errs:?}"
        );
        let twice = with_hook(
            "on = \"room.join\"\nhandler = \"a\"\nrooms = [\"lobby\"]\n[[hook]]\non = \"room.join\"\nhandler = \"b\"\nrooms = [\"game:1\"]",
        );
        let errs = parse(Path::new("c.toml"), &twice).unwrap_err();
        assert!(
            errs[0]
                .message
                .contains("declared twice (first on line 13)"),
            "{errs:?}"
        );
    }

    #[test]
    fn two_plugins_cannot_hook_one_room() {
        let hooked = |id: &str, rooms: &str| {
            let text = GOOD.replace("id = \"chat\"", &format!("id = \"{id}\"")).replace(
                "[capabilities]",
                &format!("[[hook]]\non = \"room.join\"\nhandler = \"may\"\nrooms = {rooms}\n[capabilities]"),
            ).replace("[[route]]\ntype = \"chat.send\"\nhandler = \"send\"\n", "");
            parse(Path::new(&format!("{id}.toml")), &text).unwrap()
        };
        let a = hooked("a", "[\"game:*\"]");
        let b = hooked("b", "[\"game:9\"]");
        let c = hooked("c", "[\"lobby\"]");
        let errs = check_set([&a, &b, &c]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].to_string(),
            "b.toml:10: hook `room.join` on room `game:9` overlaps the hook on room `game:*` of a.toml:10 (one plugin decides a room's joins)"
        );
        assert!(check_set([&a, &c]).is_empty());
    }

    #[test]
    fn reserved_types_are_refused() {
        let text = GOOD.replace("type = \"chat.send\"", "type = \"sys.join\"");
        let errs = parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(errs[0].message.contains("reserved"), "{errs:?}");
    }
}
