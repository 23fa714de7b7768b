//! The small readers every annotation shares: strings, lists, maps, numbers, booleans,
//! CIDRs and attribute maps, each collecting its errors instead of stopping at the first.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::attributes::{self, Kind};
use super::{AnnotationError, LoadBalancerOptions, PREFIX, key};
use crate::model::Attributes;

pub(super) struct Parser<'a> {
    pub annotations: &'a BTreeMap<String, String>,
    errors: Vec<AnnotationError>,
    /// Every key the parser looked up (families as their catalog pattern), so a test can
    /// prove each one is in the catalog and the README.
    pub read: RefCell<BTreeSet<String>>,
}

/// Go's `strconv.ParseBool`, which LBC's boolean annotations use.
pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Whether `v` is an IPv4 (`a.b.c.d/n`) or IPv6 (`x::/n`) CIDR.
pub(crate) fn valid_cidr(v: &str) -> bool {
    let Some((addr, len)) = v.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => len <= 32,
        Ok(IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

impl<'a> Parser<'a> {
    pub fn new(annotations: &'a BTreeMap<String, String>) -> Self {
        Parser {
            annotations,
            errors: Vec::new(),
            read: RefCell::default(),
        }
    }

    pub fn get(&self, short: &str) -> Option<&'a str> {
        self.get_full(&key(short))
    }

    pub fn get_full(&self, full: &str) -> Option<&'a str> {
        self.read.borrow_mut().insert(full.to_string());
        self.annotations.get(full).map(|s| s.trim())
    }

    pub fn error(&mut self, short: &str, reason: String) {
        self.error_full(&key(short), reason);
    }

    pub fn error_full(&mut self, full: &str, reason: String) {
        self.errors.push(AnnotationError {
            annotation: full.to_string(),
            reason,
        });
    }

    pub fn finish(
        self,
        opts: LoadBalancerOptions,
    ) -> Result<LoadBalancerOptions, Vec<AnnotationError>> {
        if self.errors.is_empty() {
            Ok(opts)
        } else {
            Err(self.errors)
        }
    }

    /// A comma-separated list; empty items are an error.
    pub fn list(&mut self, short: &str) -> Option<Vec<String>> {
        self.list_full(&key(short))
    }

    fn list_full(&mut self, full: &str) -> Option<Vec<String>> {
        let v = self.get_full(full)?;
        let items: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
        if items.iter().any(String::is_empty) {
            self.error_full(full, format!("{v:?} has an empty item"));
            return None;
        }
        Some(items)
    }

    /// `key=value,key=value`; a pair without `=` or with an empty key is an error.
    pub fn map(&mut self, short: &str) -> BTreeMap<String, String> {
        self.map_full(&key(short))
    }

    fn map_full(&mut self, full: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(v) = self.get_full(full) else {
            return out;
        };
        for pair in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match pair.split_once('=') {
                Some((k, val)) if !k.trim().is_empty() => {
                    out.insert(k.trim().to_string(), val.trim().to_string());
                }
                _ => self.error_full(full, format!("{pair:?} is not key=value")),
            }
        }
        out
    }

    /// An attributes map whose keys and values are checked against the allowlist of `kind`.
    pub fn attributes(&mut self, short: &str, kind: Kind) -> Attributes {
        self.attributes_full(&key(short), kind, false)
    }

    fn attributes_full(&mut self, full: &str, kind: Kind, allow_empty: bool) -> Attributes {
        let mut out = self.map_full(full);
        let mut bad = Vec::new();
        for (k, v) in &out {
            if allow_empty && v.is_empty() {
                continue;
            }
            if let Err(e) = attributes::check(kind, k, v) {
                bad.push(k.clone());
                self.error_full(full, e);
            }
        }
        for k in bad {
            out.remove(&k);
        }
        out
    }

    /// `target-group-attributes.<port>` for every Service port named; an empty value keeps
    /// the global attribute (LBC's rule), so empty entries are dropped here.
    pub fn port_target_group_attributes(&mut self) -> BTreeMap<i32, Attributes> {
        let family = format!("{PREFIX}target-group-attributes.");
        self.read.borrow_mut().insert(format!("{family}${{Port}}"));
        let keys: Vec<String> = self
            .annotations
            .keys()
            .filter(|k| k.starts_with(&family) && k.len() > family.len())
            .cloned()
            .collect();
        let mut out = BTreeMap::new();
        for full in keys {
            let port = &full[family.len()..];
            match port.parse::<i32>() {
                Ok(n) if (1..=65535).contains(&n) => {
                    let mut attrs = self.attributes_full(&full, Kind::TargetGroup, true);
                    attrs.retain(|_, v| !v.is_empty());
                    out.insert(n, attrs);
                }
                _ => self.error_full(&full, format!("{port:?} is not a Service port number")),
            }
        }
        out
    }

    pub fn int_in(&mut self, short: &str, min: i32, max: i32) -> Option<i32> {
        let v = self.get(short)?;
        match v.parse::<i32>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(
                    short,
                    format!("{v:?} is not a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    /// A boolean as LBC reads it (Go's ParseBool).
    pub fn bool(&mut self, short: &str) -> Option<bool> {
        let v = self.get(short)?;
        let b = parse_bool(v);
        if b.is_none() {
            self.error(short, format!("{v:?} is not true or false"));
        }
        b
    }

    /// A list of IPv4/IPv6 CIDRs under a full key.
    pub fn cidrs(&mut self, full: &str) -> Option<Vec<String>> {
        let items = self.list_full(full)?;
        let bad: Vec<&String> = items.iter().filter(|c| !valid_cidr(c)).collect();
        if !bad.is_empty() {
            let msg = format!("{bad:?} are not CIDRs");
            self.error_full(full, msg);
            return None;
        }
        Some(items)
    }
}
