//! What nodes tell each other through Redis: one publication per fan-out or membership change
//! of a room, and one direct frame per send to a connection of another node. The format is
//! text fields separated by the unit separator (0x1F), the last field taking the rest, so that
//! a frame's body (JSON text, in which a raw 0x1F cannot occur) travels as it is, never encoded
//! again.

/// The field separator.
pub const SEP: char = '\u{1f}';

/// What a publication to a room says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A frame for the room's members except `except`.
    Frame {
        except: Option<&'a str>,
        volatile: bool,
        /// Delivered in the room's order on every node, its origin's included (a non-volatile
        /// frame while Redis answers); otherwise its origin delivered it at once.
        ordered: bool,
        body: &'a str,
    },
    /// A member joined on the origin node.
    Joined {
        connection_id: &'a str,
        identity: &'a str,
    },
    /// A member left on the origin node (or its node died: `origin` is then that node's id,
    /// and `number` 0).
    Left { connection_id: &'a str },
    /// An identity went offline in the room because its node died (published on the dead
    /// node's behalf, number 0): each node tells its own members.
    Offline { identity: &'a str },
}

/// One publication to a room, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication<'a> {
    /// The node that published it.
    pub origin: &'a str,
    /// Its number among the origin's publications (increasing; 0 for publications made on a
    /// dead node's behalf, which are not deduplicated).
    pub number: u64,
    pub kind: Kind<'a>,
}

impl Publication<'_> {
    /// The text form, as the publish script stores and relays it.
    pub fn encode(&self) -> String {
        let (tag, a, b) = match &self.kind {
            Kind::Frame {
                except,
                volatile,
                ordered,
                body,
            } => (
                match (*volatile, *ordered) {
                    (true, _) => 'V',
                    (false, true) => 'R',
                    (false, false) => 'F',
                },
                except.unwrap_or(""),
                *body,
            ),
            Kind::Joined {
                connection_id,
                identity,
            } => ('J', *connection_id, *identity),
            Kind::Left { connection_id } => ('L', *connection_id, ""),
            Kind::Offline { identity } => ('O', *identity, ""),
        };
        let mut out = String::with_capacity(b.len() + a.len() + self.origin.len() + 32);
        out.push(tag);
        for field in [self.origin, &self.number.to_string(), a] {
            out.push(SEP);
            out.push_str(field);
        }
        out.push(SEP);
        out.push_str(b);
        out
    }
}

/// Why a publication could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a malformed publication: {0}")]
pub struct Malformed(&'static str);

/// Reads a publication's text form.
pub fn decode(text: &str) -> Result<Publication<'_>, Malformed> {
    let mut fields = text.splitn(5, SEP);
    let tag = fields.next().ok_or(Malformed("empty"))?;
    let origin = fields.next().ok_or(Malformed("no origin"))?;
    let number = fields
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(Malformed("no number"))?;
    let a = fields.next().ok_or(Malformed("no third field"))?;
    let b = fields.next().ok_or(Malformed("no fourth field"))?;
    let kind = match tag {
        "F" | "V" | "R" => Kind::Frame {
            except: Some(a).filter(|a| !a.is_empty()),
            volatile: tag == "V",
            ordered: tag == "R",
            body: b,
        },
        "J" => Kind::Joined {
            connection_id: a,
            identity: b,
        },
        "L" => Kind::Left { connection_id: a },
        "O" => Kind::Offline { identity: a },
        _ => return Err(Malformed("unknown kind")),
    };
    Ok(Publication {
        origin,
        number,
        kind,
    })
}

/// A relayed publication's header, added by the publish script: the room stream's epoch and
/// the publication's offset in it.
pub fn split_relayed(text: &str) -> Result<(&str, u64, &str), Malformed> {
    let mut fields = text.splitn(3, SEP);
    let epoch = fields.next().ok_or(Malformed("no epoch"))?;
    let offset = fields
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(Malformed("no offset"))?;
    let rest = fields.next().ok_or(Malformed("no publication"))?;
    Ok((epoch, offset, rest))
}

/// A member as the room's member hash stores it: its node, then its identity.
pub fn member_value(node: &str, identity: &str) -> String {
    format!("{node}{SEP}{identity}")
}

/// Reads a member hash value: (node, identity).
pub fn split_member(value: &str) -> Option<(&str, &str)> {
    value.split_once(SEP)
}

/// A frame for one connection of another node: the connection id, then the body.
pub fn direct(connection_id: &str, body: &str) -> String {
    format!("{connection_id}{SEP}{body}")
}

/// The connection id field of a direct message that carries a client's answer to a request of
/// the receiving node.
pub const REPLY: &str = "!reply";

/// A client's answer to a request of another node: the request's `ref`, the answering
/// connection, the answer (JSON text).
pub fn reply(reference: &str, connection_id: &str, answer: &str) -> String {
    format!("{REPLY}{SEP}{reference}{SEP}{connection_id}{SEP}{answer}")
}

/// Reads the body of a forwarded answer: (ref, connection id, answer).
pub fn split_reply(body: &str) -> Option<(&str, &str, &str)> {
    let (reference, rest) = body.split_once(SEP)?;
    let (connection_id, answer) = rest.split_once(SEP)?;
    Some((reference, connection_id, answer))
}

/// Reads a direct frame: (connection id, body).
pub fn split_direct(text: &str) -> Option<(&str, &str)> {
    text.split_once(SEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publications_read_back_as_written() {
        let cases = [
            Publication {
                origin: "0a0b0c0d",
                number: 7,
                kind: Kind::Frame {
                    except: Some("c-0a0b0c0d-1"),
                    volatile: false,
                    ordered: true,
                    body: r#"{"type":"x","payload":"a\u001fb"}"#,
                },
            },
            Publication {
                origin: "n",
                number: 1,
                kind: Kind::Frame {
                    except: None,
                    volatile: true,
                    ordered: false,
                    body: "{}",
                },
            },
            Publication {
                origin: "n",
                number: 2,
                kind: Kind::Joined {
                    connection_id: "c-n-1",
                    identity: "odd\u{1f}identity",
                },
            },
            Publication {
                origin: "n",
                number: 0,
                kind: Kind::Left {
                    connection_id: "c-n-1",
                },
            },
            Publication {
                origin: "n",
                number: 0,
                kind: Kind::Offline { identity: "ada" },
            },
        ];
        for p in cases {
            let text = p.encode();
            assert_eq!(decode(&text), Ok(p));
        }
        assert!(decode("X\u{1f}n\u{1f}1\u{1f}a\u{1f}b").is_err());
        assert!(decode("F\u{1f}n\u{1f}one\u{1f}a\u{1f}b").is_err());
        assert_eq!(
            split_relayed("e1\u{1f}42\u{1f}F\u{1f}rest"),
            Ok(("e1", 42, "F\u{1f}rest"))
        );
        assert_eq!(split_member(&member_value("n", "id")), Some(("n", "id")));
        assert_eq!(split_direct(&direct("c-n-1", "{}")), Some(("c-n-1", "{}")));
    }
}
