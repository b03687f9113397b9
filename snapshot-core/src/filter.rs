//! containerd's filter language for `walk` (SEMANTICS.md §1.5).
//!
//! A filter string is a comma-separated list of selectors `<fieldpath>[<op><value>]`, all of which
//! must match (AND); the several strings given to `walk` are OR-ed. Operators are `==`, `!=` and
//! `~=` (an unanchored regular expression); a selector without an operator tests presence.
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath [operator value]
//! fieldpath := field ("." field)*
//! field     := [A-Za-z0-9_]+ | "..."
//! operator  := "==" | "!=" | "~="
//! value     := [^\s,]+ | "..." | /.../ (~= only) | |...| (~= only)
//! ```
//!
//! Quoted strings use Go's escapes (`\n`, `\\`, `\"`, `\x41`, `\101`, `\u00e9`, `\U0001F600`, ...);
//! inside `/.../` and `|...|` the delimiter is escaped instead of `"`. Whitespace between tokens
//! is skipped.

use regex::Regex;

use crate::{Error, Info, Result};

/// A parsed set of filter strings: matches when any string matches (OR); within one string all
/// comma-separated selectors must match (AND).
#[derive(Debug, Clone)]
pub struct Filter {
    /// One entry per filter string, each the selectors that must all match. No entries, or an
    /// entry without selectors (the empty string), match everything.
    alternatives: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses `filters`; no strings, or an empty string, match everything. A syntax error is
    /// `Error::InvalidArgument` whose message names the position and the offending filter.
    pub fn parse(filters: &[&str]) -> Result<Filter> {
        let alternatives = filters
            .iter()
            .map(|input| Parser { input, pos: 0 }.parse())
            .collect::<Result<_>>()?;
        Ok(Filter { alternatives })
    }

    /// True if `info` matches.
    pub fn matches(&self, info: &Info) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|selectors| selectors.iter().all(|s| s.matches(info)))
    }
}

/// One `<fieldpath>[<op><value>]` term.
#[derive(Debug, Clone)]
struct Selector {
    field: Field,
    op: Op,
}

/// A field path resolved against the snapshot adaptor (containerd's `adaptSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    /// `kind`: absent for an Unknown kind.
    Kind,
    /// `name`: always present.
    Name,
    /// `parent`: always present, possibly empty.
    Parent,
    /// `labels.<key>`: the rest of the path joined with `.`.
    Label(String),
    /// Anything else: never present.
    Unknown,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    /// `None` when the expression does not compile: such a selector never matches.
    Matches(Option<Regex>),
}

impl Field {
    /// Like containerd, only the first part of the path matters except under `labels`.
    fn resolve(path: &[String]) -> Field {
        match path.first().map(String::as_str) {
            Some("kind") => Field::Kind,
            Some("name") => Field::Name,
            Some("parent") => Field::Parent,
            Some("labels") => Field::Label(path[1..].join(".")),
            _ => Field::Unknown,
        }
    }

    fn value<'a>(&self, info: &'a Info) -> Option<&'a str> {
        match self {
            Field::Kind => info.kind.filter_name(),
            Field::Name => Some(&info.name),
            Field::Parent => Some(&info.parent),
            Field::Label(key) => info.labels.get(key).map(String::as_str),
            Field::Unknown => None,
        }
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = self.field.value(info);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value == Some(want.as_str()),
            Op::NotEqual(want) => value.unwrap_or("") != want,
            Op::Matches(re) => re
                .as_ref()
                .is_some_and(|re| re.is_match(value.unwrap_or(""))),
        }
    }
}

/// A recursive-descent parser over one filter string; `pos` is a byte offset into `input`.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn parse(mut self) -> Result<Vec<Selector>> {
        if self.input.is_empty() {
            return Ok(Vec::new());
        }
        let mut selectors = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.bump();
                    selectors.push(self.selector()?);
                }
                Some(c) => return Err(self.error(format!("unexpected input {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.bump();
            path.push(self.field()?);
        }
        let field = Field::resolve(&path);

        let op_start = match self.peek() {
            None | Some(',') => {
                return Ok(Selector {
                    field,
                    op: Op::Present,
                });
            }
            Some(c) if is_operator_char(c) => self.pos,
            Some(_) => return Err(self.error(r#"expected an operator ("==", "!=" or "~=")"#)),
        };
        // Like containerd's scanner, the operator is the longest run of `=`, `!` and `~`.
        let op = self.take_while(is_operator_char);
        let op = match op {
            "==" => Op::Equal(self.value(false)?),
            "!=" => Op::NotEqual(self.value(false)?),
            "~=" => Op::Matches(Regex::new(&self.value(true)?).ok()),
            other => {
                self.pos = op_start;
                return Err(self.error(format!("unsupported operator {other:?}")));
            }
        };
        Ok(Selector { field, op })
    }

    fn field(&mut self) -> Result<String> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field_char(c) => Ok(self.take_while(is_field_char).to_owned()),
            Some('/' | '|') => Err(self.error("`/` and `|` quote only `~=` values")),
            _ => Err(self.error("expected field or quoted")),
        }
    }

    fn value(&mut self, regex: bool) -> Result<String> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) if regex => self.quoted(q),
            Some('/' | '|') => Err(self.error("`/` and `|` quote only `~=` values")),
            None | Some(',') => Err(self.error("expected value or quoted")),
            Some(_) => Ok(self
                .take_while(|c| c != ',' && !c.is_whitespace())
                .to_owned()),
        }
    }

    /// Reads a string delimited by `quote` (the current character) with Go's escapes.
    fn quoted(&mut self, quote: char) -> Result<String> {
        let start = self.pos;
        self.bump();
        let mut bytes = Vec::new();
        loop {
            let escape_at = self.pos;
            match self.bump() {
                None | Some('\n') => {
                    self.pos = start;
                    return Err(self.error("quoted literal not terminated"));
                }
                Some(c) if c == quote => break,
                Some('\\') => {
                    if self.escape(quote, &mut bytes).is_none() {
                        self.pos = escape_at;
                        return Err(self.error("illegal escape sequence"));
                    }
                }
                Some(c) => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        String::from_utf8(bytes).map_err(|_| {
            self.pos = start;
            self.error("quoted literal is not valid UTF-8")
        })
    }

    /// Decodes the escape after a backslash into `out`; `None` if it is not a legal Go escape.
    fn escape(&mut self, quote: char, out: &mut Vec<u8>) -> Option<()> {
        let c = self.bump()?;
        let byte = match c {
            'a' => 0x07,
            'b' => 0x08,
            'f' => 0x0c,
            'n' => b'\n',
            'r' => b'\r',
            't' => b'\t',
            'v' => 0x0b,
            '\\' => b'\\',
            _ if c == quote => u8::try_from(c).ok()?,
            '0'..='7' => {
                self.pos -= 1; // the first of three octal digits
                u8::try_from(self.digits(8, 3)?).ok()?
            }
            'x' => u8::try_from(self.digits(16, 2)?).ok()?,
            'u' | 'U' => {
                let ch = char::from_u32(self.digits(16, if c == 'u' { 4 } else { 8 })?)?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                return Some(());
            }
            _ => return None,
        };
        out.push(byte);
        Some(())
    }

    /// Reads exactly `n` digits of `radix`.
    fn digits(&mut self, radix: u32, n: usize) -> Option<u32> {
        let digits = self.input.get(self.pos..self.pos + n)?;
        if !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        self.pos += n;
        u32::from_str_radix(digits, radix).ok()
    }

    /// Skips whitespace and returns the next character without consuming it.
    fn peek(&mut self) -> Option<char> {
        let rest = &self.input[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
        self.input[self.pos..].chars().next()
    }

    /// Consumes and returns the next character (whitespace included).
    fn bump(&mut self) -> Option<char> {
        let c = self.input[self.pos..].chars().next()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        let rest = &self.input[start..];
        self.pos += rest.find(|c| !f(c)).unwrap_or(rest.len());
        &self.input[start..self.pos]
    }

    fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!(
            "filters: parse error at position {} of {:?}: {msg}",
            self.pos, self.input
        ))
    }
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, Kind};

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        let mut info = Info::named(name);
        info.parent = parent.to_owned();
        info.kind = kind;
        info.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        info
    }

    fn matches(filters: &[&str], info: &Info) -> bool {
        Filter::parse(filters)
            .unwrap_or_else(|e| panic!("{filters:?}: {e}"))
            .matches(info)
    }

    fn parse_error(filter: &str) -> String {
        let err = Filter::parse(&[filter]).expect_err(filter);
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{filter}: {err}");
        err.to_string()
    }

    fn active(name: &str) -> Info {
        info(name, "", Kind::Active, &[])
    }

    // --- containerd's snapshot testsuite `checkWalk` ---

    const GC_ROOT: &str = "containerd.io/gc.root";

    fn check_walk_snapshots() -> Vec<Info> {
        let gc = (GC_ROOT, "check-walk");
        vec![
            info("a-np", "", Kind::Active, &[gc]),
            info("p", "", Kind::Committed, &[gc]),
            info("a", "p", Kind::Active, &[gc]),
            info("v", "p", Kind::View, &[gc]),
            info("p-wl", "", Kind::Committed, &[("l", "1"), gc]),
            info("a-wl", "p-wl", Kind::Active, &[("l", "2"), gc]),
            info("v-wl", "p-wl", Kind::View, &[("l", "3"), gc]),
            info("a-np-wl", "", Kind::Active, &[("l", "2"), gc]),
        ]
    }

    fn walk(filters: &[&str]) -> Vec<String> {
        let filter = Filter::parse(filters).expect("valid filter");
        let mut names: Vec<String> = check_walk_snapshots()
            .into_iter()
            .filter(|i| filter.matches(i))
            .map(|i| i.name)
            .collect();
        names.sort();
        names
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn check_walk_quoted_label_key_equality_matches_all() {
        assert_eq!(
            walk(&[r#"labels."containerd.io/gc.root"==check-walk"#]),
            sorted(&["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"])
        );
    }

    #[test]
    fn check_walk_kind_active_and_label() {
        assert_eq!(
            walk(&[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#]),
            sorted(&["a-np", "a", "a-wl", "a-np-wl"])
        );
    }

    #[test]
    fn check_walk_kind_view_and_label() {
        assert_eq!(
            walk(&[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#]),
            sorted(&["v", "v-wl"])
        );
    }

    #[test]
    fn check_walk_kind_committed_and_label() {
        assert_eq!(
            walk(&[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#]),
            sorted(&["p", "p-wl"])
        );
    }

    #[test]
    fn check_walk_names_or_across_strings() {
        assert_eq!(
            walk(&["name==p", "name==a-np-wl"]),
            sorted(&["p", "a-np-wl"])
        );
    }

    #[test]
    fn check_walk_name_and_label_presence() {
        assert_eq!(walk(&["name==a-wl,labels.l"]), sorted(&["a-wl"]));
    }

    #[test]
    fn check_walk_parent_equality() {
        assert_eq!(walk(&["parent==p"]), sorted(&["a", "v"]));
    }

    #[test]
    fn check_walk_parent_not_empty_and_label() {
        assert_eq!(
            walk(&[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#]),
            sorted(&["a", "v", "a-wl", "v-wl"])
        );
    }

    #[test]
    fn check_walk_label_presence() {
        assert_eq!(
            walk(&["labels.l"]),
            sorted(&["p-wl", "a-wl", "v-wl", "a-np-wl"])
        );
    }

    #[test]
    fn check_walk_label_equality() {
        assert_eq!(walk(&["labels.l==2"]), sorted(&["a-wl", "a-np-wl"]));
    }

    // --- empty filters, OR and AND ---

    #[test]
    fn no_filter_strings_match_everything() {
        assert!(matches(&[], &Info::named("x")));
    }

    #[test]
    fn empty_filter_string_matches_everything() {
        assert!(matches(&[""], &Info::named("x")));
        assert!(matches(&["name==other", ""], &Info::named("x")));
    }

    #[test]
    fn strings_are_ored() {
        let i = active("x");
        assert!(matches(&["name==x", "name==y"], &i));
        assert!(matches(&["name==y", "kind==active"], &i));
        assert!(!matches(&["name==y", "kind==view"], &i));
    }

    #[test]
    fn selectors_within_a_string_are_anded() {
        let i = info("x", "p", Kind::Active, &[("l", "1")]);
        assert!(matches(&["name==x,parent==p,labels.l==1,kind==active"], &i));
        assert!(!matches(&["name==x,parent==q"], &i));
        assert!(!matches(&["name==y,parent==p"], &i));
    }

    // --- operators and the snapshot adaptor ---

    #[test]
    fn equal_needs_presence_and_equality() {
        let i = info("x", "", Kind::Unknown, &[("l", "v")]);
        assert!(matches(&["name==x"], &i));
        assert!(!matches(&["name==X"], &i));
        assert!(matches(&["labels.l==v"], &i));
        assert!(!matches(&["labels.missing==\"\""], &i));
        assert!(!matches(&["kind==unknown"], &i));
        assert!(matches(&["parent==\"\""], &i));
    }

    #[test]
    fn not_equal_treats_absent_as_empty() {
        let i = info("x", "", Kind::Unknown, &[]);
        assert!(matches(&["name!=y"], &i));
        assert!(!matches(&["name!=x"], &i));
        assert!(matches(&["labels.l!=v"], &i));
        assert!(!matches(&[r#"labels.l!="""#], &i));
        assert!(matches(&["kind!=active"], &i));
        assert!(!matches(&[r#"parent!="""#], &i));
    }

    #[test]
    fn regex_matches_unanchored() {
        let i = info("abc", "", Kind::Committed, &[("l", "v1.2")]);
        assert!(matches(&["name~=b"], &i));
        assert!(matches(&["name~=^a.c$"], &i));
        assert!(!matches(&["name~=^b"], &i));
        assert!(matches(&["kind~=^comm"], &i));
        assert!(matches(&[r"labels.l~=v\d\.\d"], &i));
    }

    #[test]
    fn regex_matches_absent_field_as_empty() {
        let i = active("x");
        assert!(matches(&["labels.l~=^$"], &i));
        assert!(!matches(&["labels.l~=."], &i));
    }

    #[test]
    fn invalid_regex_parses_but_never_matches() {
        let i = active("(");
        let filter = Filter::parse(&["name~=("]).expect("invalid regex parses");
        assert!(!filter.matches(&i));
        assert!(!matches(&["name~=[a-"], &active("")));
        assert!(matches(&["name~=(", "name==("], &i));
    }

    #[test]
    fn presence_requires_the_field() {
        let unknown = info("x", "", Kind::Unknown, &[("l", "v")]);
        assert!(matches(&["name"], &unknown));
        assert!(matches(&["parent"], &unknown));
        assert!(!matches(&["kind"], &unknown));
        assert!(matches(&["kind"], &active("x")));
        assert!(matches(&["labels.l"], &unknown));
        assert!(!matches(&["labels.m"], &unknown));
        assert!(!matches(&["labels"], &unknown));
    }

    #[test]
    fn unknown_fields_are_absent() {
        let i = active("x");
        assert!(!matches(&["id"], &i));
        assert!(!matches(&["created==x"], &i));
        assert!(matches(&["id!=x"], &i));
        assert!(!matches(&[r#"id!="""#], &i));
    }

    #[test]
    fn only_the_first_path_part_selects_non_label_fields() {
        assert!(matches(&["name.extra==x"], &active("x")));
    }

    #[test]
    fn label_key_is_rest_of_path_joined_with_dots() {
        let i = info("x", "", Kind::Active, &[("a.b.c", "1")]);
        assert!(matches(&["labels.a.b.c==1"], &i));
        assert!(matches(&[r#"labels."a.b".c==1"#], &i));
        assert!(!matches(&["labels.a"], &i));
    }

    // --- quoting ---

    #[test]
    fn quoted_key_with_go_escapes() {
        let i = info("x", "", Kind::Active, &[(r#"say "hi" \ bye"#, "1")]);
        assert!(matches(&[r#"labels."say \"hi\" \\ bye"==1"#], &i));
        assert!(matches(&[r#""name"=="x""#], &i));
    }

    #[test]
    fn quoted_value_keeps_commas_and_spaces() {
        let i = info("x", "", Kind::Active, &[("l", "a, b")]);
        assert!(matches(&[r#"labels.l=="a, b",name==x"#], &i));
    }

    #[test]
    fn quoted_value_decodes_go_escapes() {
        let i = active("A\u{e9}\t\n\"\\\u{1F600}A");
        assert!(matches(
            &[r#"name=="\x41\u00e9\t\n\"\\\U0001F600\101""#],
            &i
        ));
    }

    #[test]
    fn single_quotes_are_not_quotes() {
        assert!(matches(&["name=='x'"], &active("'x'")));
        parse_error("labels.'x'");
    }

    #[test]
    fn unquoted_value_runs_to_comma_or_whitespace() {
        let i = info("a-np.wl/x=y", "", Kind::Active, &[]);
        assert!(matches(&["name==a-np.wl/x=y,kind==active"], &i));
        assert!(matches(&["name==é"], &active("é")));
        assert!(matches(&["name==.x"], &active(".x")));
    }

    #[test]
    fn regex_slash_and_pipe_quoting() {
        let i = active("a,b/c|d");
        assert!(matches(&["name~=/a,b/"], &i));
        assert!(matches(&[r"name~=/b\/c/"], &i));
        assert!(matches(&["name~=|^a,b/c|"], &i));
        assert!(matches(&[r"name~=|c\|d$|"], &i));
        assert!(matches(&[r#"name~="^a,b""#], &i));
        assert!(!matches(&["name~=/^b/"], &i));
        assert!(matches(&[r#"name~=/"/"#], &active(r#"a"b"#)));
        parse_error(r#"name~=/\"/"#);
    }

    #[test]
    fn slash_and_pipe_quoting_only_for_regex_values() {
        parse_error("name==/x/");
        parse_error("name!=|x|");
        parse_error("labels.|foo|==x");
        assert!(matches(&[r#"name=="/x/""#], &active("/x/")));
    }

    #[test]
    fn whitespace_between_tokens_is_skipped() {
        let i = info("p", "", Kind::Committed, &[("l", "1")]);
        assert!(matches(&[" name == p , kind ==committed "], &i));
        assert!(matches(&["labels . l\t==\t1"], &i));
        assert!(matches(&["labels.l , name"], &i));
    }

    // --- malformed filters ---

    #[test]
    fn malformed_filters_are_invalid_argument() {
        for bad in [
            "name==",
            "name== ",
            "==x",
            ",",
            r#"labels."unterminated"#,
            "labels.\"new\nline\"",
            "name=x",
            "name===x",
            "name==!x",
            "name!",
            "name==a,",
            "name==a b",
            "name==a,,kind",
            "labels.",
            "labels..x",
            "name==,kind==active",
            "name~=",
            "name x",
            r#"name"x""#,
            r#"name=="a"b"#,
            r#"name=="\q""#,
            r#"name=="\'""#,
            r#"name=="\x4""#,
            r#"name=="\12""#,
            r#"name=="\400""#,
            r#"name=="\uD800""#,
            r#"name=="\xff""#,
            r"name~=/\d/",
            "labels.-x",
        ] {
            parse_error(bad);
        }
    }

    #[test]
    fn error_names_position_and_filter() {
        let msg = parse_error("name=x");
        assert!(msg.contains("position 4"), "{msg}");
        assert!(msg.contains(r#""name=x""#), "{msg}");
        assert!(msg.contains(r#"unsupported operator "=""#), "{msg}");

        let msg = parse_error("name==a b");
        assert!(msg.contains("position 8"), "{msg}");
    }

    #[test]
    fn one_bad_string_fails_the_whole_parse() {
        let err = Filter::parse(&["name==x", "name=="]).expect_err("second string is bad");
        assert!(err.is(ErrorKind::InvalidArgument));
    }
}
