//! `[run] args` templates: where a job's parameters and the guest paths of
//! its inputs and outputs go on the guest's command line.
//!
//! Each entry of `args` becomes exactly one argv entry, whatever the values
//! substituted into it hold (spaces, `--`, `=`, braces): nothing is ever
//! split, so a value can never become an extra argument. An entry may hold
//! placeholders:
//!
//! | placeholder | becomes |
//! |---|---|
//! | `{param.NAME}` | the job's value of parameter `NAME` (listed in `[run] params`) |
//! | `{input.NAME}` | `/in/NAME`, the guest path of the job's input `NAME` |
//! | `{output.NAME}` | `/out/NAME`, the guest path of an output file `NAME` |
//! | `{in}`, `{out}` | `/in`, `/out` |
//! | `{{`, `}}` | a literal `{`, `}` |
//!
//! An entry may also be an array of strings, a *group*
//! (`["-w", "{param.width}"]`): it is dropped as a whole when a parameter
//! or input it places is absent from the job. A placeholder outside a
//! group makes its parameter or input required: a job without it is
//! refused before it runs. A policy whose `args` hold no placeholder keeps
//! the plain behaviour: each parameter is appended as `--name=value`.
//!
//! Nothing here knows about wasmtime; the sandbox renders a validated
//! template with [`ArgEntry::pieces`].

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::names::ParamName;

/// One entry of `[run] args`: a string (one argv entry) or a group of them
/// (kept or dropped together).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgEntry {
    /// One argv entry.
    One(String),
    /// Entries kept only when every parameter and input they place is given.
    Group(Vec<String>),
}

impl From<&str> for ArgEntry {
    fn from(s: &str) -> Self {
        Self::One(s.to_owned())
    }
}

impl From<String> for ArgEntry {
    fn from(s: String) -> Self {
        Self::One(s)
    }
}

impl ArgEntry {
    /// The strings of this entry (one, or the group's).
    pub fn strings(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Group(g) => g,
        }
    }
}

impl Serialize for ArgEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::One(one) => s.serialize_str(one),
            Self::Group(group) => group.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ArgEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = ArgEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, or an array of strings (a group)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ArgEntry, E> {
                Ok(ArgEntry::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArgEntry, A::Error> {
                let mut group = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    group.push(s);
                }
                Ok(ArgEntry::Group(group))
            }
        }
        d.deserialize_any(EntryVisitor)
    }
}

/// A piece of one template string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Literal text (braces already unescaped).
    Lit(String),
    /// `{param.NAME}`.
    Param(String),
    /// `{input.NAME}`: `/in/NAME`.
    Input(String),
    /// `{output.NAME}`: `/out/NAME`.
    Output(String),
    /// `{in}`: `/in`.
    InDir,
    /// `{out}`: `/out`.
    OutDir,
}

impl Piece {
    /// Whether this piece is a placeholder (not literal text).
    pub fn is_placeholder(&self) -> bool {
        !matches!(self, Piece::Lit(_))
    }
}

/// Splits one template string into pieces.
///
/// # Errors
/// A message naming the argument and what is wrong with it: an unclosed
/// `{`, a stray `}`, an unknown placeholder, or a bad name.
pub fn parse(arg: &str) -> Result<Vec<Piece>, String> {
    let shown = arg.escape_debug();
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = arg.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                chars.next();
                lit.push('}');
            }
            '}' => {
                return Err(format!(
                    "argument `{shown}` has a stray `}}` at byte {i}: write `}}}}` for a literal brace"
                ));
            }
            '{' => {
                let rest = &arg[i + 1..];
                let Some(end) = rest
                    .find(['}', '{'])
                    .filter(|&e| rest.as_bytes()[e] == b'}')
                else {
                    return Err(format!(
                        "argument `{shown}` has an unclosed `{{` at byte {i}: write `{{{{` for a literal brace"
                    ));
                };
                let inner = &rest[..end];
                // Skip the placeholder's characters and its `}`.
                for _ in 0..inner.chars().count() + 1 {
                    chars.next();
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(placeholder(inner, &shown.to_string())?);
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

fn placeholder(inner: &str, shown: &str) -> Result<Piece, String> {
    let unknown = || {
        format!(
            "argument `{shown}` has an unknown placeholder `{{{}}}`: use {{param.NAME}}, {{input.NAME}}, {{output.NAME}}, {{in}} or {{out}} (and `{{{{` for a literal brace)",
            inner.escape_debug()
        )
    };
    match inner {
        "in" => return Ok(Piece::InDir),
        "out" => return Ok(Piece::OutDir),
        _ => {}
    }
    let (kind, name) = inner.split_once('.').ok_or_else(unknown)?;
    match kind {
        "param" => ParamName::new(name)
            .map(|p| Piece::Param(p.as_str().to_owned()))
            .map_err(|e| format!("argument `{shown}`: {e}")),
        "input" | "output" => {
            crate::job::validate_input_name(name)
                .map_err(|e| format!("argument `{shown}`: {kind} placeholder: {e}"))?;
            Ok(if kind == "input" {
                Piece::Input(name.to_owned())
            } else {
                Piece::Output(name.to_owned())
            })
        }
        _ => Err(unknown()),
    }
}

/// Checks `args` against the parameters the policy accepts. Returns whether
/// the args are a template (hold a placeholder).
///
/// # Errors
/// A message naming the bad entry.
pub(super) fn validate(args: &[ArgEntry], params: &[ParamName]) -> Result<bool, String> {
    let mut placed = std::collections::BTreeSet::new();
    let mut template = false;
    for entry in args {
        if let ArgEntry::Group(group) = entry
            && group.is_empty()
        {
            return Err("an empty group `[]` in args places nothing".to_owned());
        }
        let mut group_places = false;
        for arg in entry.strings() {
            if arg.contains('\0') {
                return Err(format!(
                    "argument `{}` contains a NUL byte",
                    arg.escape_debug()
                ));
            }
            for piece in parse(arg)? {
                if let Piece::Param(p) = &piece {
                    if !params.iter().any(|q| q.as_str() == p) {
                        return Err(format!(
                            "argument `{}` places parameter `{p}`, which `[run] params` does not list{}",
                            arg.escape_debug(),
                            listed(params)
                        ));
                    }
                    placed.insert(p.clone());
                }
                if matches!(piece, Piece::Param(_) | Piece::Input(_)) {
                    group_places = true;
                }
                template |= piece.is_placeholder();
            }
        }
        if let ArgEntry::Group(group) = entry
            && !group_places
        {
            return Err(format!(
                "group [{}] places no parameter or input, so it would always be kept: write its entries without the brackets",
                group
                    .iter()
                    .map(|g| format!("\"{}\"", g.escape_debug()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if template && let Some(p) = params.iter().find(|p| !placed.contains(p.as_str())) {
        return Err(format!(
            "parameter `{p}` is accepted but args never place it: add `{{param.{p}}}` to an entry (in a template, parameters are not appended as `--name=value`)"
        ));
    }
    Ok(template)
}

fn listed(params: &[ParamName]) -> String {
    if params.is_empty() {
        " (it lists none)".to_owned()
    } else {
        format!(
            " (it lists {})",
            params
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Renders `args` for one job: `param` gives a parameter's value, `input`
/// whether the job has an input of that name. Returns the argv entries in
/// order (without `argv[0]`).
///
/// # Errors
/// A message naming the required parameter or input the job lacks.
pub fn render(
    args: &[ArgEntry],
    module: &str,
    param: impl Fn(&str) -> Option<String>,
    input: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for entry in args {
        let mut rendered = Vec::new();
        let mut missing = None;
        for arg in entry.strings() {
            // Validated when the policy loaded.
            let pieces = parse(arg).unwrap_or_default();
            let mut text = String::new();
            for piece in pieces {
                match piece {
                    Piece::Lit(l) => text.push_str(&l),
                    Piece::Param(p) => match param(&p) {
                        Some(v) => text.push_str(&v),
                        None => missing = missing.or(Some(format!("parameter `{p}`"))),
                    },
                    Piece::Input(i) => {
                        if input(&i) {
                            text.push_str("/in/");
                            text.push_str(&i);
                        } else {
                            missing = missing.or(Some(format!("input `{i}`")));
                        }
                    }
                    Piece::Output(o) => {
                        text.push_str("/out/");
                        text.push_str(&o);
                    }
                    Piece::InDir => text.push_str("/in"),
                    Piece::OutDir => text.push_str("/out"),
                }
            }
            rendered.push(text);
        }
        match (entry, missing) {
            (_, None) => out.extend(rendered),
            (ArgEntry::Group(_), Some(_)) => {}
            (ArgEntry::One(arg), Some(what)) => {
                return Err(format!(
                    "{what} is required by module `{module}` (its args place it in `{}`)",
                    arg.escape_debug()
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(names: &[&str]) -> Vec<ParamName> {
        names.iter().map(|n| ParamName::new(*n).unwrap()).collect()
    }

    #[test]
    fn placeholders_and_escapes_parse() {
        assert_eq!(
            parse("--size={param.w}x{param.h}").unwrap(),
            vec![
                Piece::Lit("--size=".into()),
                Piece::Param("w".into()),
                Piece::Lit("x".into()),
                Piece::Param("h".into()),
            ]
        );
        assert_eq!(parse("{{a}}").unwrap(), vec![Piece::Lit("{a}".into())]);
        assert_eq!(
            parse("{in}/{out}").unwrap(),
            vec![Piece::InDir, Piece::Lit("/".into()), Piece::OutDir]
        );
    }

    #[test]
    fn malformed_braces_and_unknown_placeholders_name_the_argument() {
        for (bad, want) in [
            ("{param.w", "unclosed `{` at byte 0"),
            ("a}b", "stray `}` at byte 1"),
            ("{x{param.w}}", "unclosed `{` at byte 0"),
            ("{env.HOME}", "unknown placeholder `{env.HOME}`"),
            ("{}", "unknown placeholder `{}`"),
            ("{input.../x}", "input placeholder: invalid input name"),
            ("{param.Bad-Name}", "argument `{param.Bad-Name}`"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_template_must_place_every_accepted_parameter_and_only_those() {
        let args = vec![ArgEntry::from("{input.a.svg}"), ArgEntry::from("{param.w}")];
        assert!(validate(&args, &params(&["w"])).unwrap());
        let err = validate(&args, &params(&["w", "h"])).unwrap_err();
        assert!(
            err.contains("parameter `h` is accepted but args never place it"),
            "{err}"
        );
        let err = validate(&args, &params(&[])).unwrap_err();
        assert!(
            err.contains("which `[run] params` does not list (it lists none)"),
            "{err}"
        );
        let plain = vec![ArgEntry::from("resize")];
        assert!(
            !validate(&plain, &params(&["w"])).unwrap(),
            "no placeholder: not a template"
        );
        let err = validate(&[ArgEntry::Group(vec!["-v".into()])], &[]).unwrap_err();
        assert!(err.contains("places no parameter or input"), "{err}");
    }

    #[test]
    fn each_entry_is_one_argument_and_groups_drop_together() {
        let args = vec![
            ArgEntry::from("{input.in.svg}"),
            ArgEntry::from("{output.out.png}"),
            ArgEntry::Group(vec!["-w".into(), "{param.width}".into()]),
            ArgEntry::Group(vec!["-h".into(), "{param.height}".into()]),
        ];
        let value = "a b -- c=d {param.x} }{".to_owned();
        let got = render(
            &args,
            "demo",
            |p| (p == "width").then(|| value.clone()),
            |i| i == "in.svg",
        )
        .unwrap();
        assert_eq!(
            got,
            vec!["/in/in.svg", "/out/out.png", "-w", value.as_str()]
        );
        let err = render(&args, "demo", |_| None, |_| false).unwrap_err();
        assert_eq!(
            err,
            "input `in.svg` is required by module `demo` (its args place it in `{input.in.svg}`)"
        );
    }
}
