//! Checks a parsed TOML document against the schema: unknown sections and keys, wrong
//! types, values out of range. Records where each key's value sits for later checks.

use std::collections::HashMap;
use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use super::diagnostics::{Reporter, suggest};
use super::schema::{self, Kind, Section};

/// Where each value sits in the source: "model.text_shards", "node[1].port", "model" (header).
#[derive(Debug, Clone, Default)]
pub struct Spans(HashMap<String, Range<usize>>);

/// A part of the document that failed its check: a whole section, or one key of a
/// section (or of the i-th `[[node]]`). Dropped before the typed read, so the rules that
/// tie keys together can still run and every problem is reported at once.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub section: String,
    pub index: Option<usize>,
    pub key: Option<String>,
}

/// The source without the rejected parts.
pub fn without(source: &str, rejected: &[Rejected]) -> String {
    let Ok(mut doc) = source.parse::<toml_edit::DocumentMut>() else {
        return source.to_string();
    };
    for r in rejected {
        let root = doc.as_table_mut();
        let Some(key) = &r.key else {
            root.remove(&r.section);
            continue;
        };
        let table: Option<&mut dyn TableLike> = match (root.get_mut(&r.section), r.index) {
            (Some(Item::ArrayOfTables(a)), Some(i)) => {
                a.get_mut(i).map(|t| t as &mut dyn TableLike)
            }
            (Some(Item::Value(Value::Array(a))), Some(i)) => a
                .get_mut(i)
                .and_then(|v| v.as_inline_table_mut())
                .map(|t| t as &mut dyn TableLike),
            (Some(item), None) => item.as_table_like_mut(),
            _ => None,
        };
        if let Some(table) = table {
            table.remove(key);
        }
    }
    doc.to_string()
}

impl Spans {
    pub fn get(&self, path: &str) -> Option<Range<usize>> {
        self.0.get(path).cloned()
    }
    /// The value's span if the key was written, else its section's.
    pub fn key_or_section(&self, section: &str, key: &str) -> Option<Range<usize>> {
        self.get(&format!("{section}.{key}"))
            .or_else(|| self.get(section))
    }
}

/// Walk the document against the schema; returns where each value sits and what failed.
pub fn check_document(
    doc: &toml_edit::Document<&str>,
    report: &mut Reporter,
) -> (Spans, Vec<Rejected>) {
    let mut checker = Checker {
        report,
        spans: Spans::default(),
        rejected: Vec::new(),
    };
    for (name, item) in doc.as_table().iter() {
        let key_span = doc.as_table().key(name).and_then(|k| k.span());
        checker.section(name, item, key_span);
    }
    (checker.spans, checker.rejected)
}

struct Checker<'r, 'a> {
    report: &'r mut Reporter<'a>,
    spans: Spans,
    rejected: Vec<Rejected>,
}

impl Checker<'_, '_> {
    fn reject(&mut self, section: &str, index: Option<usize>, key: Option<&str>) {
        self.rejected.push(Rejected {
            section: section.to_string(),
            index,
            key: key.map(str::to_string),
        });
    }

    fn section(&mut self, name: &str, item: &Item, key_span: Option<Range<usize>>) {
        let Some(section) = schema::section(name) else {
            let hint = suggest(name, schema::SECTIONS.iter().map(|s| s.name))
                .map(|s| format!(" (did you mean [{s}]?)"))
                .unwrap_or_default();
            let what = if item.is_value() {
                "top-level key"
            } else {
                "section"
            };
            self.report.at(
                key_span,
                format!(
                    "unknown {what} '{name}'{hint}; known sections: {}",
                    schema::section_names()
                ),
            );
            self.reject(name, None, None);
            return;
        };
        self.spans
            .0
            .insert(name.to_string(), key_span.clone().unwrap_or_default());
        if section.array {
            self.array(section, item, key_span);
        } else if let Some(table) = item.as_table_like() {
            self.table(section, table, None);
        } else {
            self.report.at(
                item_span(item).or(key_span),
                format!(
                    "'{name}' must be a table ({}), found {}",
                    section.header(),
                    type_name(item)
                ),
            );
            self.reject(name, None, None);
        }
    }

    fn array(&mut self, section: &Section, item: &Item, key_span: Option<Range<usize>>) {
        let tables: Vec<&dyn TableLike> = match item {
            Item::ArrayOfTables(a) => a.iter().map(|t| t as &dyn TableLike).collect(),
            Item::Value(Value::Array(a)) if a.iter().all(|v| v.is_inline_table()) => a
                .iter()
                .filter_map(|v| v.as_inline_table())
                .map(|t| t as &dyn TableLike)
                .collect(),
            other => {
                self.report.at(
                    item_span(other).or(key_span),
                    format!(
                        "'{}' must be written as {} tables, found {}",
                        section.name,
                        section.header(),
                        type_name(other)
                    ),
                );
                self.reject(section.name, None, None);
                return;
            }
        };
        for (i, table) in tables.into_iter().enumerate() {
            if let Some(span) = table_span(table) {
                self.spans.0.insert(format!("{}[{i}]", section.name), span);
            }
            self.table(section, table, Some(i));
        }
    }

    fn table(&mut self, section: &Section, table: &dyn TableLike, index: Option<usize>) {
        let path = match index {
            Some(i) => format!("{}[{i}]", section.name),
            None => section.name.to_string(),
        };
        for (name, item) in table.iter() {
            let key_span = table.get_key_value(name).and_then(|(k, _)| k.span());
            let Some(key) = section.key(name) else {
                let hint = suggest(name, section.keys.iter().map(|k| k.name))
                    .map(|k| format!(" (did you mean '{k}'?)"))
                    .unwrap_or_default();
                self.report.at(
                    key_span,
                    format!(
                        "unknown key '{name}' in {}{hint}; known keys: {}",
                        section.header(),
                        section.key_names()
                    ),
                );
                self.reject(section.name, index, Some(name));
                continue;
            };
            let value_span = item_span(item).or(key_span.clone());
            self.spans.0.insert(
                format!("{path}.{name}"),
                value_span.clone().unwrap_or_default(),
            );
            let full = format!("{}.{name}", section.name);
            let problem = match item.as_value() {
                Some(value) => check_value(key.kind, value, &full).err(),
                None => Some(format!(
                    "wrong type for '{full}': expected {}, found {}",
                    key.kind.describe(),
                    type_name(item)
                )),
            };
            if let Some(problem) = problem {
                self.report.at(value_span, problem);
                self.reject(section.name, index, Some(name));
            }
        }
    }
}

fn check_value(kind: Kind, value: &Value, key: &str) -> Result<(), String> {
    let wrong = || {
        format!(
            "wrong type for '{key}': expected {}, found {}",
            kind.describe(),
            value_type(value)
        )
    };
    match kind {
        Kind::Str => value.as_str().map(drop).ok_or_else(wrong),
        Kind::Bool => value.as_bool().map(drop).ok_or_else(wrong),
        Kind::Int { min, max } => {
            let n = value.as_integer().ok_or_else(wrong)?;
            if n < min || n > max {
                return Err(if max == i64::MAX {
                    format!("'{key}' must be at least {min}, found {n}")
                } else {
                    format!("'{key}' must be between {min} and {max}, found {n}")
                });
            }
            Ok(())
        }
        Kind::Enum(allowed) => {
            let s = value.as_str().ok_or_else(wrong)?;
            if allowed.contains(&s) {
                return Ok(());
            }
            let hint = suggest(s, allowed.iter().copied())
                .map(|a| format!(" (did you mean \"{a}\"?)"))
                .unwrap_or_default();
            Err(format!(
                "unknown value \"{s}\" for '{key}'{hint}; expected {}",
                schema::quoted_list(allowed)
            ))
        }
        Kind::Amount => match value {
            Value::Integer(n) if *n.value() >= 0 => Ok(()),
            Value::Integer(n) => Err(format!("'{key}' must not be negative, found {}", n.value())),
            Value::String(s) => s
                .value()
                .parse::<super::amount::TokenAmount>()
                .map(drop)
                .map_err(|e| format!("bad value for '{key}': {e}")),
            _ => Err(wrong()),
        },
        Kind::Seconds => {
            let f = match value {
                Value::Float(f) => *f.value(),
                Value::Integer(i) => *i.value() as f64,
                _ => return Err(wrong()),
            };
            if (0.0..=3600.0).contains(&f) {
                Ok(())
            } else {
                Err(format!(
                    "'{key}' must be between 0 and 3600 seconds, found {f}"
                ))
            }
        }
        Kind::Fraction => {
            let f = match value {
                Value::Float(f) => *f.value(),
                Value::Integer(i) => *i.value() as f64,
                Value::String(s) => s.value().parse::<f64>().map_err(|_| wrong())?,
                _ => return Err(wrong()),
            };
            if (0.0..=1.0).contains(&f) {
                Ok(())
            } else {
                Err(format!("'{key}' must be between 0 and 1, found {f}"))
            }
        }
    }
}

fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        other => other.span(),
    }
}

fn table_span(table: &dyn TableLike) -> Option<Range<usize>> {
    table
        .iter()
        .filter_map(|(k, _)| table.get_key_value(k).and_then(|(k, _)| k.span()))
        .next()
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => value_type(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}
