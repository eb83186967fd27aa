//! Room rules: which sessions may join which rooms, by the verified claims of their tokens
//! (`[[rooms.rule]]` in `plexus.toml`; docs/operations.md, "Who may join a room"). The first rule
//! whose pattern matches a room decides; a room no rule matches is open to everyone.

use std::fmt;

use serde_json::{Map, Value};

/// A claim value a rule requires: the claim equals it, or is an array containing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimValue {
    Text(String),
    Integer(i64),
    Bool(bool),
}

impl ClaimValue {
    /// Whether `claim` is this value, or an array with this value among its elements.
    fn found_in(&self, claim: &Value) -> bool {
        match claim {
            Value::Array(items) => items.iter().any(|item| self.is(item)),
            one => self.is(one),
        }
    }

    /// Text also matches a number written the same way (`"42"` and `42`).
    fn is(&self, claim: &Value) -> bool {
        match (self, claim) {
            (ClaimValue::Text(want), Value::String(have)) => want == have,
            (ClaimValue::Text(want), Value::Number(have)) => *want == have.to_string(),
            (ClaimValue::Integer(want), Value::Number(have)) => have.as_i64() == Some(*want),
            (ClaimValue::Bool(want), Value::Bool(have)) => want == have,
            _ => false,
        }
    }
}

impl fmt::Display for ClaimValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimValue::Text(t) => write!(f, "{t:?}"),
            ClaimValue::Integer(n) => write!(f, "{n}"),
            ClaimValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// One piece of a rule's pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text the room name has here.
    Text(String),
    /// `{claim}`: one or more characters, up to the first place the text after it follows
    /// (or the end of the name), which the session's claim `claim` must equal or contain.
    Claim(String),
    /// A trailing `*`: any rest, empty included.
    Rest,
}

/// Why a rule's pattern is refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("a room pattern must not be empty")]
    Empty,
    #[error("`*` may only end a room pattern (in `{0}`)")]
    StarInside(String),
    #[error("`{{` without its `}}` in room pattern `{0}`")]
    Unclosed(String),
    #[error("`}}` without its `{{` in room pattern `{0}`")]
    Unopened(String),
    #[error("an empty placeholder `{{}}` in room pattern `{0}`: name a claim, as in `{{sub}}`")]
    EmptyClaim(String),
    #[error(
        "in room pattern `{0}`, a placeholder must be followed by text or end the pattern (`{{a}}{{b}}` and `{{a}}*` cannot be told apart)"
    )]
    Ambiguous(String),
    #[error("claim `{claim}` is required twice in the rule of room pattern `{pattern}`")]
    RequiredTwice { pattern: String, claim: String },
}

/// One rule: rooms matching `pattern` may be joined only by sessions whose claims satisfy its
/// placeholders and its `require`d values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRule {
    pattern: String,
    pieces: Vec<Piece>,
    require: Vec<(String, ClaimValue)>,
}

impl RoomRule {
    /// A rule for rooms matching `pattern` (text, `{claim}` placeholders, an optional trailing
    /// `*`), requiring each of `require` (claim name, value).
    pub fn new(
        pattern: &str,
        require: impl IntoIterator<Item = (String, ClaimValue)>,
    ) -> Result<RoomRule, RuleError> {
        let pieces = parse_pattern(pattern)?;
        let mut required: Vec<(String, ClaimValue)> = Vec::new();
        for (claim, value) in require {
            if required.iter().any(|(c, _)| *c == claim) {
                return Err(RuleError::RequiredTwice {
                    pattern: pattern.to_owned(),
                    claim,
                });
            }
            required.push((claim, value));
        }
        Ok(RoomRule {
            pattern: pattern.to_owned(),
            pieces,
            require: required,
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The claims each placeholder captured from `room`, in order, or `None` when the room does
    /// not match the pattern. A placeholder captures at least one character.
    fn captures<'r>(&self, room: &'r str) -> Option<Vec<(&str, &'r str)>> {
        let mut captured = Vec::new();
        let mut rest = room;
        for (i, piece) in self.pieces.iter().enumerate() {
            match piece {
                Piece::Text(text) => rest = rest.strip_prefix(text.as_str())?,
                Piece::Rest => return Some(captured),
                Piece::Claim(claim) => {
                    let first = rest.chars().next()?.len_utf8();
                    let end = match self.pieces.get(i + 1) {
                        Some(Piece::Text(next)) => first + rest[first..].find(next.as_str())?,
                        // Parsing refuses a placeholder followed by anything but text.
                        _ => rest.len(),
                    };
                    captured.push((claim.as_str(), &rest[..end]));
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty().then_some(captured)
    }

    /// Whether the rule needs claims (a guest fails it).
    fn needs_claims(&self) -> bool {
        !self.require.is_empty() || self.pieces.iter().any(|p| matches!(p, Piece::Claim(_)))
    }
}

/// The rules of a host, in order. Empty (the default): every room is open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomRules(Vec<RoomRule>);

/// A join a rule refused, and why; its message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("joining room `{room}` is forbidden by room rule {number} (`{pattern}`): {why}")]
pub struct Denied {
    pub room: String,
    /// The rule's place in the list, from 1.
    pub number: usize,
    pub pattern: String,
    pub why: String,
}

impl RoomRules {
    pub fn new(rules: Vec<RoomRule>) -> RoomRules {
        RoomRules(rules)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether a session whose verified claims are `claims` (`None`: a guest or a development
    /// identity) may join `room`: the first rule matching the room decides; no rule, no limit.
    pub fn check(&self, room: &str, claims: Option<&Map<String, Value>>) -> Result<(), Denied> {
        let Some((number, rule, captured)) = self
            .0
            .iter()
            .enumerate()
            .find_map(|(i, rule)| rule.captures(room).map(|captured| (i + 1, rule, captured)))
        else {
            return Ok(());
        };
        let deny = |why: String| Denied {
            room: room.to_owned(),
            number,
            pattern: rule.pattern.clone(),
            why,
        };
        let claims = match claims {
            Some(claims) => claims,
            None if rule.needs_claims() => {
                return Err(deny(
                    "it needs the claims of a token, and this connection has none".into(),
                ));
            }
            None => return Ok(()),
        };
        let captured = captured
            .into_iter()
            .map(|(claim, text)| (claim, ClaimValue::Text(text.to_owned())));
        let required = rule.require.iter().map(|(c, v)| (c.as_str(), v.clone()));
        for (claim, value) in captured.chain(required) {
            if !claims.get(claim).is_some_and(|have| value.found_in(have)) {
                return Err(deny(format!(
                    "claim `{claim}` must be {value}, or a list containing it"
                )));
            }
        }
        Ok(())
    }
}

fn parse_pattern(pattern: &str) -> Result<Vec<Piece>, RuleError> {
    if pattern.is_empty() {
        return Err(RuleError::Empty);
    }
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = pattern.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '*' if at + 1 == pattern.len() => {
                if matches!(pieces.last(), Some(Piece::Claim(_))) && text.is_empty() {
                    return Err(RuleError::Ambiguous(pattern.to_owned()));
                }
                break;
            }
            '*' => return Err(RuleError::StarInside(pattern.to_owned())),
            '}' => return Err(RuleError::Unopened(pattern.to_owned())),
            '{' => {
                let mut claim = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, '{')) | None => {
                            return Err(RuleError::Unclosed(pattern.to_owned()));
                        }
                        Some((_, '*')) => return Err(RuleError::StarInside(pattern.to_owned())),
                        Some((_, c)) => claim.push(c),
                    }
                }
                if claim.is_empty() {
                    return Err(RuleError::EmptyClaim(pattern.to_owned()));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                } else if matches!(pieces.last(), Some(Piece::Claim(_))) {
                    return Err(RuleError::Ambiguous(pattern.to_owned()));
                }
                pieces.push(Piece::Claim(claim));
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    if pattern.ends_with('*') {
        pieces.push(Piece::Rest);
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(list: &[(&str, &[(&str, ClaimValue)])]) -> RoomRules {
        RoomRules::new(
            list.iter()
                .map(|(pattern, require)| {
                    let require = require.iter().map(|(c, v)| ((*c).to_owned(), v.clone()));
                    RoomRule::new(pattern, require).unwrap()
                })
                .collect(),
        )
    }

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn text(t: &str) -> ClaimValue {
        ClaimValue::Text(t.into())
    }

    #[test]
    fn patterns_are_checked() {
        let bad = |p: &str| RoomRule::new(p, []).unwrap_err();
        assert_eq!(bad(""), RuleError::Empty);
        assert!(matches!(bad("a*b"), RuleError::StarInside(_)));
        assert!(matches!(bad("**"), RuleError::StarInside(_)));
        assert!(matches!(bad("user:{sub"), RuleError::Unclosed(_)));
        assert!(matches!(bad("user:{s{ub}"), RuleError::Unclosed(_)));
        assert!(matches!(bad("user:{s*}"), RuleError::StarInside(_)));
        assert!(matches!(bad("user:sub}"), RuleError::Unopened(_)));
        assert!(matches!(bad("user:{}"), RuleError::EmptyClaim(_)));
        assert!(matches!(bad("dm:{a}{b}"), RuleError::Ambiguous(_)));
        assert!(matches!(bad("user:{sub}*"), RuleError::Ambiguous(_)));
        let twice = RoomRule::new("a", [("r".into(), text("x")), ("r".into(), text("y"))]);
        assert!(matches!(twice, Err(RuleError::RequiredTwice { .. })));
        for good in [
            "*",
            "lobby",
            "admin:*",
            "user:{sub}",
            "{sub}",
            "dm:{a}:{b}",
            "t:{team}:*",
        ] {
            assert!(RoomRule::new(good, []).is_ok(), "{good}");
        }
    }

    #[test]
    fn placeholders_capture_up_to_the_text_after_them() {
        let rule = RoomRule::new("dm:{a}:{b}", []).unwrap();
        assert_eq!(
            rule.captures("dm:x:y:z"),
            Some(vec![("a", "x"), ("b", "y:z")])
        );
        assert_eq!(
            rule.captures("dm::y"),
            None,
            "a placeholder takes a character"
        );
        assert_eq!(rule.captures("dm:x:"), None);
        assert_eq!(rule.captures("dm:x"), None);
        let rule = RoomRule::new("t:{team}:*", []).unwrap();
        assert_eq!(rule.captures("t:red:"), Some(vec![("team", "red")]));
        assert_eq!(rule.captures("t:red"), None);
        let rule = RoomRule::new("admin:*", []).unwrap();
        assert_eq!(rule.captures("admin:"), Some(vec![]));
        assert_eq!(rule.captures("admins"), None);
        let rule = RoomRule::new("lobby", []).unwrap();
        assert_eq!(rule.captures("lobby"), Some(vec![]));
        assert_eq!(rule.captures("lobby2"), None);
        let rule = RoomRule::new("é:{x}é", []).unwrap();
        assert_eq!(rule.captures("é:éé"), Some(vec![("x", "é")]));
        // Up to the first place the text follows, never further: no match.
        assert_eq!(rule.captures("é:ééé"), None);
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = rules(&[
            ("admin:lobby", &[]),
            ("admin:*", &[("role", text("admin"))]),
            ("user:{sub}", &[]),
            (
                "paid:*",
                &[
                    ("plan", ClaimValue::Integer(2)),
                    ("verified", ClaimValue::Bool(true)),
                ],
            ),
        ]);
        let admin = claims(json!({"sub": "ada", "role": "admin"}));
        let roles = claims(json!({"sub": "bo", "role": ["user", "admin"]}));
        let user = claims(json!({"sub": "cy", "role": "user"}));
        let numeric = claims(json!({"sub": 42}));
        let paid = claims(json!({"sub": "di", "plan": 2, "verified": true}));

        assert_eq!(rules.check("admin:x", Some(&admin)), Ok(()));
        assert_eq!(rules.check("admin:x", Some(&roles)), Ok(()));
        let denied = rules.check("admin:x", Some(&user)).unwrap_err();
        assert_eq!((denied.number, denied.pattern.as_str()), (2, "admin:*"));
        assert_eq!(
            denied.to_string(),
            "joining room `admin:x` is forbidden by room rule 2 (`admin:*`): claim `role` must be \"admin\", or a list containing it"
        );
        // An earlier rule opens a room a later one would close; guests included.
        assert_eq!(rules.check("admin:lobby", None), Ok(()));
        let guest = rules.check("admin:x", None).unwrap_err();
        assert!(guest.why.contains("has none"), "{guest}");

        assert_eq!(rules.check("user:cy", Some(&user)), Ok(()));
        assert_eq!(rules.check("user:42", Some(&numeric)), Ok(()));
        let other = rules.check("user:ada", Some(&user)).unwrap_err();
        assert_eq!(other.number, 3);
        assert!(rules.check("user:cy", None).is_err());

        assert_eq!(rules.check("paid:1", Some(&paid)), Ok(()));
        let unverified = claims(json!({"sub": "e", "plan": 2, "verified": "true"}));
        assert!(rules.check("paid:1", Some(&unverified)).is_err());
        assert!(
            rules
                .check(
                    "paid:1",
                    Some(&claims(json!({"plan": "2", "verified": true})))
                )
                .is_err()
        );

        // No rule matches: open, to guests too.
        assert_eq!(rules.check("lobby", None), Ok(()));
        assert_eq!(RoomRules::default().check("admin:x", None), Ok(()));
    }
}
